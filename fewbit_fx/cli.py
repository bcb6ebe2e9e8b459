"""Command line: `python -m fewbit_fx report|demo|bench-ops ...` (also `fewbit-fx ...`)."""
from __future__ import annotations

import argparse
import importlib
import sys
import time


def load_model(spec: str, scale: str):
    """A model and example inputs from a catalog name (fewbit_fx.models), `hf:<model_type>`
    (any Hugging Face config type, random weights, no download) or `module:factory`
    (a callable returning (model, args) or (model, args, kwargs))."""
    from fewbit_fx import models

    if spec in models.names():
        return models.build(spec, scale)
    if spec.startswith("hf:"):
        return models.build_hf(spec[3:], scale)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        built = getattr(importlib.import_module(module_name), attr)()
        model, args, kwargs = (*built, {}) if len(built) == 2 else built
        return model, tuple(args) if isinstance(args, (tuple, list)) else (args,), kwargs
    raise SystemExit(
        f"unknown model {spec!r}: use one of {', '.join(models.names())}, hf:<model_type> "
        "(e.g. hf:gpt2), or module:factory"
    )


def cmd_report(a) -> int:
    import fewbit_fx

    model, args, kwargs = load_model(a.model, a.scale)
    if a.checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise SystemExit(f"--checkpointing needs a Hugging Face model (one with "
                             f"gradient_checkpointing_enable); {type(model).__name__} has none")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    overrides = dict(o.split("=", 1) for o in a.override)
    t = time.perf_counter()
    rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode=a.mode,
                           bits=a.bits, overrides=overrides, measure=not a.no_measure,
                           compiled=a.compiled, tables=a.tables)
    print(rep.to_json(indent=2) if a.json else rep)
    if not a.json:
        print(f"(analysis and measurement took {time.perf_counter() - t:.1f} s)")
    return 0


def cmd_demo(a) -> int:
    """Optimize a real model (GPT-2 architecture, random weights), print its report, and
    check that one training step of the optimized model runs with unchanged outputs."""
    import torch

    import fewbit_fx
    from fewbit_fx.api import measure_step, scalar_loss

    torch.manual_seed(0)
    model, args, kwargs = load_model(a.model, a.scale)
    print(f"model: {a.model} ({a.scale}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode=a.mode,
                           bits=a.bits, tables=a.tables)
    print(rep)
    with torch.no_grad():
        model.eval()
        before = scalar_loss(model(*args, **kwargs))
    model.train()
    fewbit_fx.optimize(model, example_inputs=args, example_kwargs=kwargs, mode=a.mode,
                       bits=a.bits, tables=a.tables)
    with torch.no_grad():
        model.eval()
        after = scalar_loss(model(*args, **kwargs))
    model.train()
    print(f"\nforward unchanged after optimize: {bool(torch.equal(before, after))}")
    print(f"saved for backward in one step of the optimized model: {measure_step(model, args, kwargs) / 2**20:.2f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Commands with parsers of their own get their arguments untouched.
    passthrough = {"bench": "fewbit_fx.bench", "bench-ops": "fewbit_fx.bench_ops"}
    if argv and argv[0] in passthrough:
        return importlib.import_module(passthrough[argv[0]]).main(argv[1:])
    p = argparse.ArgumentParser(prog="fewbit-fx", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, default_model in (("report", cmd_report, None), ("demo", cmd_demo, "gpt2")):
        s = sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0])
        if default_model:
            s.add_argument("model", nargs="?", default=default_model)
        else:
            s.add_argument("model", help="catalog name, hf:<model_type>, or module:factory")
        s.add_argument("--scale", default="small", choices=["tiny", "small", "base"])
        s.add_argument("--mode", default="auto", choices=["auto", "exact", "fewbit"])
        s.add_argument("--bits", type=int, default=3)
        s.add_argument("--tables", default="fitted", choices=["fitted", "normal"],
                       help="few-bit tables fitted to the example inputs, or the N(0, 1) ones")
        if name == "report":
            s.add_argument("--override", action="append", default=[], metavar="PATTERN=VARIANT")
            s.add_argument("--json", action="store_true")
            s.add_argument("--no-measure", action="store_true", help="skip the measured step")
            s.add_argument("--compiled", action="store_true",
                           help="compare torch.compile's default with the fewbit backend")
            s.add_argument("--checkpointing", action="store_true",
                           help="turn on the model's gradient checkpointing first (Hugging Face)")
        s.set_defaults(fn=fn)
    sub.add_parser("bench-ops", help="micro-benchmark of the ops against plain activations",
                   add_help=False)
    sub.add_parser("bench", help="regenerate reports/ (python -m fewbit_fx bench --help)",
                   add_help=False)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
