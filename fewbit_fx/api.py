"""optimize() and report(): the pipeline model -> capture -> sites -> decisions -> rewrite/report."""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fewbit_fx import calibration
from fewbit_fx._state import preserved_state
from fewbit_fx.measure import allocated_peak, saved_bytes
from fewbit_fx.nn import REFIT_EVERY, REFIT_INTERVAL_CAP, FewBit
from fewbit_fx.packing import check_bits
from fewbit_fx.passes import capture, decide, detect, rewrite
from fewbit_fx.passes.plan import plan_graphs
from fewbit_fx.report import Report, Row


@dataclass
class Plan:
    planned: list[rewrite.Planned]
    mode: str
    bits: int
    unrecognised: list[str]  # activation-like modules that are not sites, with why


def plan(model: nn.Module, args: tuple, kwargs: dict, mode: str, bits: int,
         overrides: dict[str, str] | None) -> Plan:
    """Capture the model once and decide every site (no change to the model)."""
    decide.check_mode(mode)
    check_bits(bits)
    cap = capture.capture(model, args, kwargs)
    planned = plan_graphs(cap.graphs, mode, bits, overrides)
    return Plan(planned, mode, bits, detect.unrecognised_activations(cap.graphs, [p.site for p in planned]))


def _inputs(example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if example_inputs is None:
        args = ()
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    elif isinstance(example_inputs, list):
        args = tuple(example_inputs)
    else:
        args = (example_inputs,)
    return args, dict(example_kwargs or {})


def optimize(model: nn.Module, *, example_inputs=None, example_kwargs=None, mode: str = "auto",
             bits: int = 3, overrides: dict[str, str] | None = None,
             tables: str = "fitted") -> nn.Module:
    """Rewrite the model's activations in place and return it.

    With example inputs the analysis runs now; without, on the first call (the first
    call's own inputs are used). mode: "auto" (inverted where a consumer keeps the output,
    few-bit elsewhere), "exact" (inverted only), "fewbit" (few-bit everywhere). `bits` is
    the few-bit default; `overrides` maps module-path patterns (fnmatch) to "auto",
    "exact", "fewbit", "fewbit-<b>" or "keep". `tables`: "fitted" fits each few-bit
    table to the inputs that site sees on the example inputs (one extra no-grad forward)
    and refits it to its inputs during eager training (FewBit.schedule_refits); "normal"
    uses the tables fitted for N(0, 1) inputs.
    """
    decide.check_mode(mode)
    check_bits(bits)
    calibration.check_tables(tables)
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize takes a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None and example_kwargs is None:
        return _optimize_on_first_call(model, mode, bits, overrides, tables)
    args, kwargs = _inputs(example_inputs, example_kwargs)
    p = plan(model, args, kwargs, mode, bits, overrides)
    applied = rewrite.apply(model, p.planned)
    fits = _calibrate(model, applied, args, kwargs, tables)
    model._fewbit_report = _report_from(p, applied.failures, fits, tables)  # noqa: SLF001 - read by report()
    return model


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


def _optimize_on_first_call(model, mode, bits, overrides, tables):
    """Analyse on the first call, with its own inputs. The instance's forward is replaced
    (not a pre-hook: torch looks up forward before pre-hooks run, and the rewrite may
    replace the root's own forward), then restored before the rewrite."""
    previous = model.__dict__.get("forward")

    def analyse_then_run(*args, **kwargs):
        if previous is None:
            del model.forward
        else:
            model.forward = previous
        optimize(model, example_inputs=tuple(args), example_kwargs=kwargs, mode=mode,
                 bits=bits, overrides=overrides, tables=tables)
        return model.forward(*args, **kwargs)

    model.forward = analyse_then_run
    return model


def report(model: nn.Module, *, example_inputs=None, example_kwargs=None, mode: str = "auto",
           bits: int = 3, overrides: dict[str, str] | None = None, measure: bool = True,
           compiled: bool = False, tables: str = "fitted") -> Report:
    """Dry run: what optimize() would do, per site, without touching the model.

    With `measure`, one real forward/backward of the original and of a rewritten copy
    gives the measured saved bytes (parameters excluded); gradients are not accumulated
    into the model and buffers and RNG are restored. With `compiled`, the rows compare
    torch.compile's default with the fewbit backend, read from the partitioned graphs
    (copies of the model are compiled; the model itself is untouched; the backend's
    tables are the N(0, 1) ones). `tables` as in optimize().
    """
    calibration.check_tables(tables)
    if compiled:
        from fewbit_fx.compiled_report import compiled_report

        decide.check_mode(mode)
        check_bits(bits)
        return compiled_report(model, example_inputs=example_inputs, example_kwargs=example_kwargs,
                               mode=mode, bits=bits, overrides=overrides)
    if example_inputs is None and example_kwargs is None:
        existing = getattr(model, "_fewbit_report", None)
        if existing is not None:
            return existing
        raise ValueError("report() needs example_inputs and/or example_kwargs to run the model")
    args, kwargs = _inputs(example_inputs, example_kwargs)
    p = plan(model, args, kwargs, mode, bits, overrides)
    rewritten = copy.deepcopy(model)
    applied = rewrite.apply(rewritten, p.planned)
    rep = _report_from(p, applied.failures, _calibrate(rewritten, applied, args, kwargs, tables), tables)
    if measure:
        rep.measured_before = measure_step(model, args, kwargs)
        rep.measured_after = measure_step(rewritten, args, kwargs)
        if any(r.checkpointed for r in rep.rows):  # their saving shows at the peak only
            rep.peak_before = measure_peak(model, args, kwargs)
            rep.peak_after = measure_peak(rewritten, args, kwargs)
    return rep


def _report_from(p: Plan, failures: dict[tuple, str], fits: dict | None, tables: str) -> Report:
    rows = []
    for item in p.planned:
        s, d, before = item.site, item.decision, item.saves.saved_before
        variant, after, reason = d.label, d.saved_after, d.reason
        if s.rewrite_key in failures and d.variant != "kept":
            variant, after, reason = "kept", before, f"not rewritten: {failures[s.rewrite_key]}"
        elif fits and s.rewrite_key in fits:
            reason = f"{reason}; {fits[s.rewrite_key].describe()}"
        v = capture.example_value(s.output)
        rows.append(Row(s.name, str(s.activation), variant, reason, tuple(v.shape),
                        str(v.dtype).replace("torch.", ""), before, after, s.checkpointed))
    return Report(rows, p.mode, p.bits, notes=_checkpoint_notes(rows) + _table_notes(p, fits, tables) + p.unrecognised)


def _checkpoint_notes(rows: list[Row]) -> list[str]:
    inside = sum(r.checkpointed for r in rows)
    if not inside:
        return []
    return [f"{inside} of {len(rows)} sites are inside activation-checkpointed regions "
            "(torch.utils.checkpoint): their tensors are saved only while backward recomputes "
            "their region, so rewriting them can lower the step's peak but not the bytes saved "
            "across the step; by how much depends on what else the region keeps at its peak "
            "(the measured peak line)"]


def _table_notes(p: Plan, fits: dict | None, tables: str) -> list[str]:
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


def measure_step(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Saved bytes of one forward+backward (parameters and buffers excluded), no side effects.

    A plain backward() runs the step (torch.autograd.grad is refused by reentrant
    checkpointing); the gradients it leaves are put back as they were.
    """
    with preserved_state(model), torch.enable_grad(), _gradients_restored(model, args, kwargs):
        record = saved_bytes(lambda: scalar_loss(model(*args, **kwargs)),
                             exclude=list(model.parameters()) + list(model.buffers()))
        if record.loss.requires_grad:
            record.loss.backward()
    return record.bytes


def measure_peak(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Most bytes of tensors allocated during one forward+backward that are live at once
    (CUDA: torch.cuda.max_memory_allocated above the start; CPU: the profiler's allocator
    timeline), after a warm-up step; no side effects."""
    def step():
        loss = scalar_loss(model(*args, **kwargs))
        if loss.requires_grad:
            loss.backward()

    with preserved_state(model), torch.enable_grad(), _gradients_restored(model, args, kwargs):
        step()  # warm-up: first-call allocations and kernel builds stay out of the figure
        for t in _grad_leaves(model, args, kwargs):
            t.grad = None
        cuda = next((t.device for t in model.parameters() if t.is_cuda), None)
        if cuda is None:
            return allocated_peak(step).bytes
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        base = torch.cuda.memory_allocated(cuda)
        step()
        torch.cuda.synchronize(cuda)
        return torch.cuda.max_memory_allocated(cuda) - base


def _grad_leaves(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a step's backward() leaves gradients on: parameters and inputs."""
    return [t for t in [*model.parameters(), *args, *kwargs.values()]
            if isinstance(t, torch.Tensor) and t.requires_grad]


@contextlib.contextmanager
def _gradients_restored(model: nn.Module, args: tuple, kwargs: dict):
    leaves = _grad_leaves(model, args, kwargs)
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    try:
        yield
    finally:
        for t, g in zip(leaves, grads):
            t.grad = g


def float_tensors(output) -> list[torch.Tensor]:
    """The floating-point tensors in any model output (tensor, tuple, dict, HF ModelOutput)."""
    found: list[torch.Tensor] = []

    def collect(o):
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                found.append(o)
        elif isinstance(o, dict) or hasattr(o, "to_tuple"):
            for v in (o.values() if isinstance(o, dict) else o.to_tuple()):
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(output)
    return found


def scalar_loss(output) -> torch.Tensor:
    """A scalar from any model output: the mean square of each floating-point tensor, summed
    (squares, so no gradient is trivially constant)."""
    tensors = float_tensors(output)
    if not tensors:
        raise ValueError("the model output holds no floating-point tensor to take a loss of")
    return sum((t.float() ** 2).mean() for t in tensors)
