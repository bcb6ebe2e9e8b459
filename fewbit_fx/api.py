"""optimize() and report(): the pipeline model -> capture -> sites -> decisions -> rewrite/report."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fewbit_fx import calibration
from fewbit_fx.example_inputs import analysis_copy, normalise
from fewbit_fx.measure import measure_peak, measure_step
from fewbit_fx.nn import REFIT_EVERY, REFIT_INTERVAL_CAP, FewBit
from fewbit_fx.packing import check_bits
from fewbit_fx.passes import capture, decide, detect, rewrite
from fewbit_fx.passes.plan import Planned, plan_graphs
from fewbit_fx.reporting import Report, Row


@dataclass
class Analysis:
    planned: list[Planned]
    mode: str
    bits: int
    unrecognised: list[str]  # activation-like modules that are not sites, with why


def analyse(model: nn.Module, args: tuple, kwargs: dict, mode: str, bits: int,
           overrides: dict[str, str] | None, norms: bool = False) -> Analysis:
    """Capture the model once and decide every site (no change to the model)."""
    decide.check_mode(mode)
    check_bits(bits)
    cap = capture.capture(model, args, kwargs)
    planned = plan_graphs(cap.graphs, mode, bits, overrides, links=cap.links,
                          model=model if norms else None)
    _warn_unmatched_overrides(overrides, [p.site.name for p in planned])
    return Analysis(planned, mode, bits,
                cap.notes + detect.unseen_activation_modules(model, cap.graphs)
                + detect.unrecognised_activations(cap.graphs, [p.site for p in planned]))


def _warn_unmatched_overrides(overrides, names: list[str]) -> None:
    """An override that matches no site is a typo more often than not: say so, with the
    closest site names."""
    import difflib
    import fnmatch

    for pattern in overrides or {}:
        if isinstance(pattern, str) and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            hint = f"; close: {', '.join(close)}" if close else f"; the sites are: {', '.join(names[:6])}"
            warnings.warn(f"fewbit_fx: override {pattern!r} matches no site{hint if names else ''}",
                          UserWarning, stacklevel=4)


def optimize(model: nn.Module, *, example_inputs=None, example_kwargs=None, mode: str = "auto",
             bits: int = 3, overrides: dict[str, str] | None = None,
             tables: str = "fitted", norms: bool = False) -> nn.Module:
    """Rewrite the model's activations in place and return it.

    With example inputs the analysis runs now; without, on the first call (on copies of
    that call's inputs, so a cache passed in is not advanced twice). mode: "auto"
    (inverted where a consumer keeps the output, few-bit elsewhere), "exact" (inverted
    only), "fewbit" (few-bit everywhere). `bits` is the few-bit default; `overrides` maps
    module-path patterns (fnmatch) to "auto", "exact", "fewbit", "fewbit-<b>" or "keep".
    `tables`: "fitted" fits each few-bit table to the inputs that site sees on the example
    inputs (one extra no-grad forward) and refits it to its inputs during eager training
    (FewBit.schedule_refits); "normal" uses the tables fitted for N(0, 1) inputs.
    `norms`: also rewrite LayerNorm/RMSNorm modules whose output a consumer keeps
    (InvertedNorm): a large further saving on transformers, but eager CPU steps are slower
    today (README), so off by default.
    A model that was optimized before is decided afresh (its earlier rewrites undone first).
    """
    decide.check_mode(mode)
    check_bits(bits)
    decide.check_overrides(overrides)
    calibration.check_tables(tables)
    _check_norms(norms)
    _check_model(model, "optimize")
    if example_inputs is None and example_kwargs is None:
        _AnalyseOnFirstCall.install(model, dict(mode=mode, bits=bits, overrides=overrides, tables=tables,
                                                      norms=norms))
        return model
    args, kwargs = normalise(example_inputs, example_kwargs)
    rewrite.undo(model)
    p = analyse(model, *analysis_copy(args, kwargs), mode, bits, overrides, norms)
    applied = rewrite.apply(model, p.planned)
    fits = _calibrate(model, applied, *analysis_copy(args, kwargs), tables)
    model._fewbit_report = _report_from(p, applied.failures, fits, tables)  # noqa: SLF001 - read by report()
    _TrainabilityWatch.install(model)
    if not p.planned:
        warnings.warn(f"fewbit_fx: {type(model).__name__} has no supported activation on these inputs, "
                      "so nothing was rewritten" + (f" ({'; '.join(p.unrecognised)})" if p.unrecognised
                                                    else ""), UserWarning, stacklevel=2)
    return model


def _check_norms(norms) -> None:
    if not isinstance(norms, bool):
        raise TypeError(f"norms must be True or False (rewrite LayerNorm/RMSNorm modules too), got {norms!r}")


def _check_model(model, verb: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb}() takes a torch.nn.Module, got {type(model).__name__}; pass the "
                        "model itself (for a function, wrap it in an nn.Module)")


class _AnalyseOnFirstCall:
    """optimize() without example inputs: installed as the instance's forward, it analyses
    and rewrites on the first call, then runs the call. An object, not a closure, so a deep
    copy or a pickle of the model taken before the first call carries it, bound to the copy.
    (Not a pre-hook: torch looks up forward before pre-hooks run, and the rewrite may
    replace the root's own forward.)"""

    def __init__(self, model: nn.Module, settings: dict, previous):
        self.model, self.settings, self.previous = model, settings, previous

    @classmethod
    def install(cls, model: nn.Module, settings: dict) -> None:
        current = model.__dict__.get("forward")
        if isinstance(current, cls):
            current.settings = settings
            return
        model.__dict__["forward"] = cls(model, settings, current)

    def __call__(self, *args, **kwargs):
        model = self.model
        if self.previous is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = self.previous
        optimize(model, example_inputs=tuple(args), example_kwargs=kwargs, **self.settings)
        return model.forward(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self.previous or type(self.model).forward.__get__(self.model))


class _TrainabilityWatch:
    """A forward pre-hook that notices when parameters' requires_grad changed since the
    decisions were taken (LoRA added, adapters merged, layers unfrozen), and warns once
    with the fix: what a consumer keeps depends on whether its weight trains."""

    def __init__(self, model: nn.Module):
        self.flags = _trainability(model)
        self.warned = False

    @classmethod
    def install(cls, model: nn.Module) -> None:
        watch = model.__dict__.get("_fewbit_watch")
        if watch is not None:
            watch.flags, watch.warned = _trainability(model), False
            return
        watch = cls(model)
        model.__dict__["_fewbit_watch"] = watch
        model.register_forward_pre_hook(watch)

    def stale(self, model: nn.Module) -> list[str]:
        now = _trainability(model)
        return [n for n, f in now.items() if self.flags.get(n, f) != f]

    def __call__(self, model: nn.Module, args):
        if self.warned or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return None
        changed = self.stale(model)
        if changed:
            self.warned = True
            warnings.warn(
                f"fewbit_fx: requires_grad changed for {len(changed)} parameters since optimize() "
                f"(first: {changed[0]}), e.g. adapters added or merged or layers unfrozen. The "
                "rewrites were decided for the old setting and may save less than they could, or "
                "use few-bit gradients where an exact variant is now free. Fix: call "
                "fewbit_fx.optimize(model, example_inputs=...) again to re-decide.",
                RuntimeWarning, stacklevel=2)
        return None


def _trainability(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _calibrate(model, applied: rewrite.Applied, args, kwargs, tables: str) -> dict | None:
    """{rewrite_key: Calibration} of the new FewBit modules; None if the fit failed."""
    if tables != "fitted":
        return {}
    fewbit = {k: m for k, m in applied.modules.items() if isinstance(m, FewBit)}
    if not fewbit:
        return {}
    try:
        return calibration.calibrate(model, fewbit, args, kwargs)
    except Exception as e:  # noqa: BLE001 - the rewrite stands; only the fit is lost
        warnings.warn(f"fewbit_fx: could not run the model to fit the few-bit tables "
                      f"({type(e).__name__}: {e}); they stay fitted for N(0, 1) inputs",
                      RuntimeWarning, stacklevel=3)
        return None


def report(model: nn.Module, *, example_inputs=None, example_kwargs=None, mode: str = "auto",
           bits: int = 3, overrides: dict[str, str] | None = None, measure: bool = True,
           compiled: bool = False, tables: str = "fitted", norms: bool = False) -> Report:
    """Dry run: what optimize() would do, per site, without touching the model.

    With `measure`, one real forward/backward of the original and of the rewritten model
    gives the measured saved bytes (parameters excluded); the rewrite is applied in place
    for the measurement and taken out again, gradients are not accumulated into the model,
    and buffers and RNG are restored. With `compiled`, the rows compare
    torch.compile's default with the fewbit backend, read from the partitioned graphs
    (copies of the model are compiled; the model itself is untouched; the backend's
    tables are the N(0, 1) ones). `tables` and `norms` as in optimize() (compiled: the
    backend's norms=True).
    """
    calibration.check_tables(tables)
    _check_norms(norms)
    decide.check_overrides(overrides)
    _check_model(model, "report")
    if compiled:
        from fewbit_fx.compiled_report import compiled_report

        decide.check_mode(mode)
        check_bits(bits)
        return compiled_report(model, example_inputs=example_inputs, example_kwargs=example_kwargs,
                               mode=mode, bits=bits, overrides=overrides, norms=norms)
    if example_inputs is None and example_kwargs is None:
        inner = model
        while getattr(inner, "_fewbit_report", None) is None and isinstance(
                getattr(inner, "module", None), nn.Module):  # DDP and friends hold it as .module
            inner = inner.module
        existing = getattr(inner, "_fewbit_report", None)
        if existing is not None:
            return _with_staleness(inner, existing)
        raise ValueError("report() needs example_inputs and/or example_kwargs to run the model "
                         "(or a model that fewbit_fx.optimize has rewritten, to show what it did)")
    args, kwargs = normalise(example_inputs, example_kwargs)
    # In place, then put back: no copy of the model (FSDP refuses deepcopy, and a copy of a
    # large model is memory the user may not have). An optimized model is measured as it
    # was before optimize, and its rewrites are restored afterwards.
    undone = rewrite.undo(model)
    try:
        return _dry_run(model, args, kwargs, mode, bits, overrides, measure, tables, len(undone), norms)
    finally:
        undone.redo()


def _dry_run(model, args, kwargs, mode, bits, overrides, measure, tables, done: int,
             norms: bool = False) -> Report:
    p = analyse(model, *analysis_copy(args, kwargs), mode, bits, overrides, norms)
    checkpointed = any(item.site.checkpointed for item in p.planned)
    if measure:
        before = measure_step(model, *analysis_copy(args, kwargs))
        peak_before = measure_peak(model, *analysis_copy(args, kwargs)) if checkpointed else None
    applied = rewrite.apply(model, p.planned)
    try:
        fits = _calibrate(model, applied, *analysis_copy(args, kwargs), tables)
        rep = _report_from(p, applied.failures, fits, tables)
        if measure:
            rep.measured_before, rep.measured_after = before, measure_step(model, *analysis_copy(args, kwargs))
            if checkpointed:  # their saving shows at the peak only
                rep.peak_before = peak_before
                rep.peak_after = measure_peak(model, *analysis_copy(args, kwargs))
    finally:
        rewrite.undo(model)
    if done:
        rep.notes.insert(0, f"this model is already optimized ({done} sites rewritten): the rows "
                            "are what optimize() would decide now for the model as it was before "
                            "(call optimize again to apply them); report(model) shows what was done")
    return rep


def _with_staleness(model: nn.Module, rep: Report) -> Report:
    """The stored report of an optimized model, with a note if its decisions are stale."""
    watch = model.__dict__.get("_fewbit_watch")
    changed = watch.stale(model) if watch is not None else []
    if not changed:
        return rep
    rep = copy.copy(rep)
    rep.notes = [f"stale: requires_grad changed for {len(changed)} parameters since optimize() "
                 f"(first: {changed[0]}); these decisions were taken for the old setting. Call "
                 "fewbit_fx.optimize(model, example_inputs=...) again to re-decide.", *rep.notes]
    return rep


def _report_from(p: Analysis, failures: dict[tuple, str], fits: dict | None, tables: str) -> Report:
    rows = []
    for item in p.planned:
        s, d, before = item.site, item.decision, item.saves.saved_before
        variant, after, reason = d.label, d.saved_after, d.reason
        if s.rewrite_key in failures and d.variant != "kept":
            variant, after, reason = "kept", before, f"not rewritten: {failures[s.rewrite_key]}"
        elif fits and s.rewrite_key in fits:
            reason = f"{reason}; {fits[s.rewrite_key].describe()}"
        v = capture.example_value(s.output)
        rows.append(Row(s.name, s.kind, variant, reason, tuple(v.shape),
                        str(v.dtype).replace("torch.", ""), before, after, s.checkpointed))
    found = [] if rows else ["no supported activation found on these inputs: nothing to rewrite "
                             "(README: Supported activations)"]
    return Report(rows, p.mode, p.bits,
                  notes=found + _checkpoint_notes(rows) + _table_notes(p, fits, tables) + p.unrecognised)


def _checkpoint_notes(rows: list[Row]) -> list[str]:
    inside = sum(r.checkpointed for r in rows)
    if not inside:
        return []
    return [f"{inside} of {len(rows)} sites are inside activation-checkpointed regions "
            "(torch.utils.checkpoint): their tensors are saved only while backward recomputes "
            "their region, so rewriting them can lower the step's peak but not the bytes saved "
            "across the step; by how much depends on what else the region keeps at its peak "
            "(the measured peak line)"]


def _table_notes(p: Analysis, fits: dict | None, tables: str) -> list[str]:
    if not any(item.decision.variant == "fewbit" for item in p.planned):
        return []
    if tables == "normal":
        return ["few-bit tables: fitted for N(0, 1) inputs (tables='normal')"]
    if fits is None:
        return ["few-bit tables: N(0, 1) (fitting failed, see the warning)"]
    done = [f for f in fits.values() if f.fitted]
    if not done:
        return ["few-bit tables: N(0, 1) (too few inputs observed to fit)"] if fits else []
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return [f"few-bit tables: fitted to the example inputs at {len(done)} of {len(fits)} sites; "
            f"mean f' error on those inputs {mean([f.error_fitted for f in done]):.3f} "
            f"(N(0,1) tables: {mean([f.error_normal for f in done]):.3f}); refitted to the "
            f"training inputs after {REFIT_EVERY} training calls, then at doubling intervals "
            f"up to {REFIT_INTERVAL_CAP * REFIT_EVERY} (eager)"]
