"""Command line: `python -m fewbit_fx report|demo|bench|bench-ops ...` (also `fewbit-fx ...`).

Mistakes (an unknown model, bits out of range, a bad override, a model that does not run
on its example inputs) end in one line on stderr naming the problem and the fix, exit
code 2; `--verbose` adds the underlying error.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


FACTORY_CONTRACT = ("a module:factory target is a callable taking no arguments that returns "
                    "(model, args) or (model, args, kwargs): an nn.Module, its positional example "
                    "inputs (a tensor or a tuple) and optionally a dict of keyword inputs")


def load_model(spec: str, scale: str):
    """A model and example inputs from a catalog name (fewbit_fx.evidence.models), `hf:<model_type>`
    (any Hugging Face config type, random weights, no download) or `module:factory`
    (FACTORY_CONTRACT)."""
    from fewbit_fx.evidence import models

    if spec in models.names():
        return models.build(spec, scale)
    if spec.startswith("hf:"):
        _check_hf_type(spec[3:])
        return models.build_hf(spec[3:], scale)
    if ":" in spec:
        return _from_factory(spec)
    raise CliError(
        f"unknown model {spec!r}: use one of {', '.join(models.names())}, hf:<model_type> "
        "(e.g. hf:gpt2), or module:factory"
    )


def _check_hf_type(model_type: str) -> None:
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        raise CliError("hf:<model_type> needs transformers: pip install transformers") from None
    if model_type not in CONFIG_MAPPING:
        import difflib

        close = difflib.get_close_matches(model_type, [k for k in CONFIG_MAPPING.keys() if k.islower()], n=3, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CliError(f"unknown Hugging Face model type {model_type!r}{hint}; use a config "
                       "model_type such as hf:gpt2, hf:llama or hf:bert")


def _from_factory(spec: str):
    from torch import nn

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"cannot import module {module_name!r} for {spec!r} ({e}); check that it is "
                       "on the Python path (run from its folder, or set PYTHONPATH)") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"{module_name} has no callable {attr!r}; {FACTORY_CONTRACT}")
    try:
        built = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: say where it failed
        raise CliError(f"the factory {spec} raised {type(e).__name__}: {e}") from e
    if not isinstance(built, (tuple, list)) or len(built) not in (2, 3) or not isinstance(built[0], nn.Module):
        raise CliError(f"{spec} returned {type(built).__name__}; {FACTORY_CONTRACT}")
    model, args, kwargs = (*built, {}) if len(built) == 2 else built
    if not isinstance(kwargs, dict):
        raise CliError(f"{spec} returned {type(kwargs).__name__} as keyword inputs; {FACTORY_CONTRACT}")
    return model, tuple(args) if isinstance(args, (tuple, list)) else (args,), kwargs


def _overrides(items: list[str], bits: int) -> dict[str, str]:
    """--override PATTERN=VARIANT, checked before any model is built."""
    from fewbit_fx.passes import decide

    overrides = {}
    for item in items:
        pattern, sep, value = item.partition("=")
        if not sep or not pattern:
            raise CliError(f"--override {item!r}: write PATTERN=VARIANT, e.g. 'encoder.*=fewbit-4'")
        try:
            decide.parse_override(value, bits)
        except (ValueError, TypeError):
            raise CliError(f"--override {item!r}: {value!r} is not a variant; use auto, exact, fewbit, "
                           "fewbit-<b> with b in 1..8, or keep") from None
        overrides[pattern] = value
    return overrides


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        bits = 0
    if not 1 <= bits <= 8:
        raise argparse.ArgumentTypeError(f"{text!r}: bits must be an integer from 1 to 8 (3 is the usual choice)")
    return bits


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    import torch

    def one(v):
        return "x".join(map(str, v.shape)) + f" {str(v.dtype).replace('torch.', '')}" if isinstance(
            v, torch.Tensor) else type(v).__name__
    parts = [one(v) for v in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "none"


def cmd_report(a) -> int:
    """Dry run: per site, what optimize() would do and the measured saving of one step."""
    import fewbit_fx

    overrides = _overrides(a.override, a.bits)
    model, args, kwargs = load_model(a.model, a.scale)
    if a.checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise CliError(f"--checkpointing needs a Hugging Face model (one with "
                             f"gradient_checkpointing_enable); {type(model).__name__} has none")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not a.json:
        n = sum(p.numel() for p in model.parameters())
        print(f"model: {a.model} ({type(model).__name__}, scale {a.scale}, {n / 1e6:.2f}M parameters); "
              f"inputs: {_describe_inputs(args, kwargs)}\n")
    t = time.perf_counter()
    rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode=a.mode,
                           bits=a.bits, overrides=overrides, measure=not a.no_measure,
                           compiled=a.compiled, tables=a.tables, norms=a.norms)
    print(rep.to_json(indent=2) if a.json else rep)
    if not a.json:
        print(f"(analysis and measurement took {time.perf_counter() - t:.1f} s)")
    return 0


def cmd_demo(a) -> int:
    """Optimize a real model (GPT-2 architecture, random weights), print its report, and
    check that one training step of the optimized model runs with unchanged outputs."""
    import torch

    import fewbit_fx
    from fewbit_fx.measure import measure_step, scalar_loss

    torch.manual_seed(0)
    model, args, kwargs = load_model(a.model, a.scale)
    print(f"model: {a.model} ({a.scale}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode=a.mode,
                           bits=a.bits, tables=a.tables, norms=a.norms)
    print(rep)
    with torch.no_grad():
        model.eval()
        before = scalar_loss(model(*args, **kwargs))
    model.train()
    fewbit_fx.optimize(model, example_inputs=args, example_kwargs=kwargs, mode=a.mode,
                       bits=a.bits, tables=a.tables, norms=a.norms)
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
    passthrough = {"bench": "fewbit_fx.evidence.bench", "bench-ops": "fewbit_fx.evidence.ops_bench"}
    if argv and argv[0] in passthrough:
        return importlib.import_module(passthrough[argv[0]]).main(argv[1:])
    from fewbit_fx import calibration
    from fewbit_fx.passes import decide

    p = argparse.ArgumentParser(prog="fewbit-fx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, default_model in (("report", cmd_report, None), ("demo", cmd_demo, "gpt2")):
        s = sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0],
                           description=(fn.__doc__ or "").split("\n")[0])
        model_help = ("catalog name (gpt2, bert, llama, mistral, vit, ...), hf:<model_type> (any "
                      f"Hugging Face config type, random weights), or module:factory ({FACTORY_CONTRACT})")
        if default_model:
            s.add_argument("model", nargs="?", default=default_model, help=model_help)
        else:
            s.add_argument("model", help=model_help)
        s.add_argument("--scale", default="base" if name == "demo" else "small",
                       choices=["tiny", "small", "base"],
                       help="model size: tiny and small are shrunk configs; base is the real "
                            "architecture's size (default: %(default)s)")
        s.add_argument("--mode", default="auto", choices=decide.MODES,
                       help="auto: inverted where a consumer keeps the output, few-bit elsewhere; "
                            "exact: inverted only; fewbit: few-bit everywhere (default: %(default)s)")
        s.add_argument("--bits", type=_bits, default=3, help="few-bit bits per element, 1 to 8 (default: 3)")
        s.add_argument("--tables", default="fitted", choices=calibration.TABLES,
                       help="few-bit tables fitted to the example inputs, or the N(0, 1) ones")
        s.add_argument("--norms", action="store_true",
                       help="also rewrite LayerNorm/RMSNorm (InvertedNorm; with --compiled, the backend's norms=True)")
        s.add_argument("--verbose", action="store_true", help="on an error, show the underlying one too")
        if name == "report":
            s.add_argument("--override", action="append", default=[], metavar="PATTERN=VARIANT",
                           help="per-site variant by site-name pattern (fnmatch): auto, exact, "
                                "fewbit, fewbit-<b> or keep; repeatable")
            s.add_argument("--json", action="store_true", help="print the report as JSON")
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
    return _run(a)


def _run(a) -> int:
    """Run a command; a user mistake becomes one line on stderr and exit code 2."""
    import logging

    from fewbit_fx.passes.capture import CaptureError

    dynamo_log = logging.getLogger("torch._dynamo")
    level = dynamo_log.level
    if not a.verbose:  # Dynamo logs its own tracing failure at length before ours
        dynamo_log.setLevel(logging.CRITICAL)
    try:
        return a.fn(a)
    except (CliError, CaptureError, ValueError, TypeError) as e:
        if isinstance(e, CaptureError):
            message = (f"could not run {a.model} on its example inputs ({_describe_inputs_of(e)}). "
                       "Fix: check the model runs eagerly on them; --verbose shows Dynamo's error")
        else:
            message = str(e)
        print(f"fewbit-fx: error: {message}", file=sys.stderr)
        if a.verbose and e.__cause__ is not None:
            import traceback

            traceback.print_exception(e.__cause__, file=sys.stderr)
        return 2
    finally:
        dynamo_log.setLevel(level)


def _describe_inputs_of(e: Exception) -> str:
    cause = e.__cause__
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]}" if cause else str(e)


if __name__ == "__main__":
    sys.exit(main())
