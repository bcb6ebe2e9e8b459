"""Drop-in modules: wrap a torch activation module so backward keeps fewer bytes.

    FewBit(nn.GELU(), bits=3)   # backward keeps 3 bits per element (approximate gradient)
    FewBit(nn.GELU()).fit(x)    # the same, with the table fitted to inputs like x
    Inverted(nn.GELU())         # backward keeps the output y (+1 bit); exact to the floor
    Inverted(nn.LayerNorm(d))   # backward keeps y and per-row statistics, not x (also
                                # nn.RMSNorm and aten-op RMSNorms: Hugging Face's, T5's;
                                # the same Parameters)
    InvertedNormCall("layer_norm", (d,))  # one F.layer_norm / F.rms_norm call site, with
                                          # the call's own weight and bias (passes use it)

Both return exactly what the wrapped module returns. Like it, they write into their
input only with inplace=True (the default follows the wrapped module's own `inplace`):
then y lands in x's storage and x is returned, as `nn.SiLU(inplace=True)` does, and
backward keeps only what the out-of-place variant keeps (fewbit_fx.ops.inplace).
Under torch.func transforms (grad, jacrev, vmap, functional_call) they run the same
backward through fewbit_fx.ops.transforms.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fewbit_fx import ops
from fewbit_fx.activations import Activation, from_module
from fewbit_fx.ops import inplace as inplace_ops
from fewbit_fx.ops import transforms
from fewbit_fx.ops._common import check_input
from fewbit_fx.ops.norm import plain_norm
from fewbit_fx.packing import check_bits


FIT_SAMPLES = 1 << 18  # random input elements a table is fitted to
MIN_FIT_SAMPLES = 256  # fewer inputs than this say too little to fit a table to
REFIT_EVERY = 100      # optimize(tables="fitted"): first refit after this many training calls
REFIT_INTERVAL_CAP = 10
_SAMPLING = torch.Generator().manual_seed(0x5EED)  # private: the user's RNG stream is untouched


def _activation(act: nn.Module | Activation) -> Activation:
    return act if isinstance(act, Activation) else from_module(act)


def _needs_saving(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _inplace(act: nn.Module | Activation, inplace: bool | None) -> bool:
    """inplace=None: as the wrapped module (nn.SiLU(inplace=True) writes into x)."""
    if inplace is None:
        return isinstance(act, nn.Module) and getattr(act, "inplace", False) is True
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True, False or None (as the wrapped module), got {inplace!r}")
    return inplace


class FewBit(nn.Module):
    """Few-bit backward: stores the b-bit interval of x, backward uses the optimal level."""

    def __init__(
        self,
        act: nn.Module | Activation,
        bits: int = 3,
        density: Callable | None = None,
        refit_every: int | None = None,
        inplace: bool | None = None,
    ) -> None:
        super().__init__()
        from fewbit_fx.tables import optimal_table

        self.activation = _activation(act)
        self.inplace = _inplace(act, inplace)
        self.bits = check_bits(bits)
        self.fitted_on: int | None = None  # how many observed inputs the table was fitted to
        self.schedule_refits(refit_every)
        table = optimal_table(self.activation, self.bits, density)
        # Non-persistent: swapping an activation must not change the model's state_dict.
        self.register_buffer("borders", table.borders.float(), persistent=False)
        self.register_buffer("levels", table.levels.float(), persistent=False)

    def fit(self, samples: Tensor) -> "FewBit":
        """Refit the table to inputs this activation actually sees (any shape; at most
        FIT_SAMPLES random elements are used). The default table assumes N(0, 1) inputs;
        trained networks drift far from that, and a table fitted to the wrong range biases
        every gradient."""
        from fewbit_fx.tables import SampleDensity, optimal_table, random_subset

        density = SampleDensity(random_subset(samples, FIT_SAMPLES, _SAMPLING))
        return self.set_table(optimal_table(self.activation, self.bits, density), density.samples)

    def set_table(self, table, fitted_on: int | None = None) -> "FewBit":
        """Use `table` (a fewbit_fx.tables.Table with 2^bits levels) from now on. New
        tensors, not in-place copies: a step in flight keeps the table it saved."""
        if table.levels.numel() != 2**self.bits:
            raise ValueError(f"table has {table.levels.numel()} levels; bits={self.bits} needs {2**self.bits}")
        self.borders = table.borders.to(self.borders.device, torch.float32)
        self.levels = table.levels.to(self.levels.device, torch.float32)
        self.fitted_on = fitted_on
        return self

    def schedule_refits(self, every: int | None) -> "FewBit":
        """Refit to the input of the training call `every` calls from now, then at doubling
        intervals up to REFIT_INTERVAL_CAP x `every` (None: never). The inputs' distribution
        moves while a network trains, fastest early on, and a table fitted once goes stale
        (reports/convergence_fitted_once/ measures what that costs). Eager only: under
        torch.compile the module keeps the table it has."""
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"refit_every must be a positive integer or None, got {every!r}")
        self.refit_every = every
        self._calls = 0  # training calls counted toward the next refit
        self._interval = every
        self._next_refit = every
        return self

    def _maybe_refit(self, x: Tensor) -> None:
        if self.refit_every is None or torch.compiler.is_compiling() or transforms.active():
            return
        self._calls += 1
        if self._calls >= self._next_refit and x.numel() >= MIN_FIT_SAMPLES:
            self.fit(x)
            self._interval = min(2 * self._interval, REFIT_INTERVAL_CAP * self.refit_every)
            self._next_refit = self._calls + self._interval

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "FewBit")  # also without grad: the same inputs work in both modes
        if not _needs_saving(x):
            return self.activation.forward_(x) if self.inplace else self.activation.forward(x)
        self._maybe_refit(x)
        if self.inplace:
            return inplace_ops.fewbit_forward_(x, self.activation.name, self.activation.param_list,
                                               self.borders, self.levels, self.bits)
        op = transforms.fewbit_forward if transforms.active() else ops.fewbit_forward
        y, _ = op(x, self.activation.name, self.activation.param_list, self.borders, self.levels, self.bits)
        return y

    def extra_repr(self) -> str:
        fitted = f", fitted_on={self.fitted_on}" if self.fitted_on else ""
        refit = f", refit_every={self.refit_every}" if self.refit_every else ""
        inplace = ", inplace=True" if self.inplace else ""
        return f"{self.activation}, bits={self.bits}{fitted}{refit}{inplace}"


class Inverted(nn.Module):
    """Inverted activation: backward keeps the output (shared with the next layer).
    Given a norm module (see InvertedNorm), builds an InvertedNorm."""

    def __new__(cls, act=None, *args, **kwargs):
        if cls is Inverted and norm_kind(act) is not None:
            cls = InvertedNorm
        return super().__new__(cls)

    def __init__(self, act: nn.Module | Activation, inplace: bool | None = None) -> None:
        super().__init__()
        self.activation = _activation(act)
        self.inplace = _inplace(act, inplace)
        if not self.activation.invertible:
            raise ValueError(
                f"Inverted does not support {self.activation} with alpha <= 0 (torch's "
                "result-based ELU backward rejects it); use FewBit or keep the module"
            )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "Inverted")  # also without grad: the same inputs work in both modes
        if not _needs_saving(x):
            return self.activation.forward_(x) if self.inplace else self.activation.forward(x)
        if self.inplace:
            return inplace_ops.inverted_forward_(x, self.activation.name, self.activation.param_list)
        op = transforms.inverted_forward if transforms.active() else ops.inverted_forward
        y, _ = op(x, self.activation.name, self.activation.param_list)
        return y

    def extra_repr(self) -> str:
        return f"{self.activation}, inplace=True" if self.inplace else str(self.activation)


def norm_kind(module) -> str | None:
    """The fewbit_fx.ops.norm formula a norm module computes, or None for other modules:
    nn.LayerNorm, nn.RMSNorm, and any module written as the aten-op RMSNorm, recognised by
    what it computes, not by its name (see _probed_rms_kind): Hugging Face's RMSNorm
    (Llama, Mistral, Qwen2) is hf_rms_norm, T5's T5LayerNorm t5_rms_norm, the formula
    written without casts uncast_rms_norm; Gemma's
    (1 + weight) and other look-alikes compute something else and are None."""
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, nn.RMSNorm):
        return "rms_norm"
    if _rms_candidate(module):
        return _probed_rms_kind(module)
    return None


# torch's own norms with a 1-D weight and an eps, which compute something else
_OTHER_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
_PROBED_KINDS = ("hf_rms_norm", "t5_rms_norm", "uncast_rms_norm")


def _eps(module) -> float | None:
    """The epsilon an aten-op RMSNorm adds: its `variance_epsilon` (Hugging Face) or `eps`."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _rms_candidate(module) -> bool:
    """Shaped like an aten-op RMSNorm: a leaf module with a 1-D float `weight` Parameter
    and an epsilon, not one of torch's other norms. Only such modules are probed."""
    if not isinstance(module, nn.Module) or isinstance(module, _OTHER_TORCH_NORMS) or module._modules:
        return False
    weight = module._parameters.get("weight")
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1 and weight.is_floating_point()
            and _eps(module) is not None)


def probed_kind(got: list, probes: list[tuple[Tensor, Tensor]], eps_values) -> tuple[str, float] | None:
    """(kind, eps) of the first aten-op RMSNorm formula and epsilon that give `got` on the
    (x, weight) `probes` bit for bit (same dtype and shape too), else None. Serves module
    probing here and graph probing (passes/norms)."""
    for kind in _PROBED_KINDS:
        for eps in eps_values:
            want = [plain_norm(x, kind, [w.shape[0]], w, None, eps) for x, w in probes]
            if all(isinstance(g, torch.Tensor) and g.dtype == v.dtype and g.shape == v.shape
                   and torch.equal(g, v) for g, v in zip(got, want)):
                return kind, eps
    return None


def _probed_rms_kind(module: nn.Module) -> str | None:
    """The kind whose formula the module's forward reproduces bit for bit on probe inputs,
    or None. Probed with x in fp32 and in bf16 and a random weight of the module's weight
    dtype put in place of its own for the probe (a weight of ones would hide a forward
    that ignores it or adds 1 to it), no autograd, buffers and RNG restored. fp32 and bf16
    x tell the kinds apart: they agree where x and weight are fp32 and differ in bf16."""
    from fewbit_fx._state import preserved_state

    own = module._parameters["weight"]
    n, eps = own.shape[0], _eps(module)
    if n == 0:
        return None
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter((torch.rand(n, generator=gen) * 2 - 0.5).to(own.dtype), requires_grad=own.requires_grad)
    xs = [(torch.randn(3, n, generator=gen) * 3).to(dt) for dt in (torch.float32, torch.bfloat16)]
    module._parameters["weight"] = w
    try:
        with torch.no_grad(), preserved_state(module):
            w.data = w.data.to(own.device)
            xs = [x.to(own.device) for x in xs]
            got = [module.forward(x) for x in xs]
            found = probed_kind(got, [(x, w) for x in xs], [eps])
            return None if found is None else found[0]
    except Exception:  # noqa: BLE001 - any other signature, device or behaviour: not this formula
        return None
    finally:
        module._parameters["weight"] = own


class InvertedNorm(Inverted):
    """A LayerNorm / RMSNorm whose backward keeps its output y (which the next layer keeps
    anyway) and per-row statistics instead of its input (fewbit_fx.ops.norm; channels y
    cannot tell, such as gamma = 0, keep x's columns). Built by Inverted(norm).

    It holds the norm's own Parameter objects under the norm's names, and nothing else, so
    optimizers, state_dict keys and loading are unchanged by the swap."""

    def __init__(self, norm: nn.Module) -> None:
        nn.Module.__init__(self)
        self.kind = norm_kind(norm)
        if self.kind is None:
            raise TypeError(f"fewbit-fx: Inverted norms take nn.LayerNorm, nn.RMSNorm or an RMSNorm "
                            f"written as aten ops (Hugging Face's, T5's), got {type(norm).__name__}")
        if self.kind in _PROBED_KINDS:
            shape, eps = tuple(norm.weight.shape), _eps(norm)
        else:
            shape, eps = tuple(norm.normalized_shape), norm.eps
        self.normalized_shape, self.eps = shape, eps
        names = ("weight", "bias") if self.kind == "layer_norm" else ("weight",)
        for name in names:
            p = getattr(norm, name, None)
            if p is not None and not isinstance(p, nn.Parameter):
                raise TypeError(f"fewbit-fx: the norm's {name} is a {type(p).__name__}, not a Parameter")
            self.register_parameter(name, p)
        if self.kind != "layer_norm":
            self.bias = None  # a plain attribute: no state_dict entry

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "Inverted")
        if not (torch.is_grad_enabled() and (x.requires_grad or any(
                p is not None and p.requires_grad for p in (self.weight, self.bias)))):
            return plain_norm(x, self.kind, list(self.normalized_shape), self.weight, self.bias,
                              self.eps)
        if transforms.active():
            raise RuntimeError(
                "fewbit-fx: Inverted norms do not support torch.func transforms (grad, vmap, "
                "functional_call under a transform): their saved side tensor has a data-dependent "
                "size; keep the original norm module there")
        y, *_ = ops.inverted_norm_forward(x, self.kind, list(self.normalized_shape), self.weight,
                                          self.bias, self.eps, not torch.compiler.is_compiling())
        return y

    def extra_repr(self) -> str:
        return f"{self.kind}, {tuple(self.normalized_shape)}, eps={self.eps}"


class InvertedNormCall(nn.Module):
    """The inverted norm of one functional call site, `F.layer_norm(x, shape, w, b, eps)`
    or `F.rms_norm(x, shape, w, eps)` in some module's forward (passes/source_rewrite
    dispatches the planned call here). It has no parameters of its own: weight, bias and
    eps are the call's, passed at call time, so the owner's state_dict, optimizer and any
    computed weight (`1 + self.weight`) work as written. Under torch.func transforms it runs
    the plain call (the inverted op's saved side tensor has a data-dependent size)."""

    def __init__(self, kind: str, normalized_shape) -> None:
        super().__init__()
        if kind not in ("layer_norm", "rms_norm"):
            raise ValueError(f"fewbit-fx: functional norms are layer_norm or rms_norm, got {kind!r}")
        self.kind, self.normalized_shape = kind, tuple(normalized_shape)

    def forward(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float | None = None) -> Tensor:
        shape = list(self.normalized_shape)
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        if not grads or transforms.active():
            return plain_norm(x, self.kind, shape, weight, bias, eps)
        y, *_ = ops.inverted_norm_forward(x, self.kind, shape, weight, bias, eps,
                                          not torch.compiler.is_compiling())
        return y

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.normalized_shape}"


__all__ = ["FewBit", "Inverted"]
