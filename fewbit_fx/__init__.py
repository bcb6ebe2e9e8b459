"""fewbit-fx: cut the activation memory of training by rewriting pointwise nonlinearities.

    model = fewbit_fx.optimize(model)          # eager, one line
    torch.compile(model, backend="fewbit")     # the same pass inside the compiler
    print(fewbit_fx.report(model, example_inputs=(x,)))   # dry run, per-site savings
"""
from fewbit_fx import _compat

_compat.check_torch()

from fewbit_fx import nn, ops  # noqa: E402,F401  (ops registers the custom ops)
from fewbit_fx.api import optimize, report  # noqa: E402
from fewbit_fx.passes.capture import CaptureError  # noqa: E402
from fewbit_fx.reporting import Report  # noqa: E402
from fewbit_fx.compile_backend import backend, register as _register_backend  # noqa: E402

_register_backend()

__version__ = "0.1.0"
__all__ = ["optimize", "report", "backend", "nn", "Report", "CaptureError", "__version__"]
