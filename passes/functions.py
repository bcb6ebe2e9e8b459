"""Activations computed by a custom torch.autograd.Function (memory-efficient Swish and
Mish implementations save x and write their own backward), recognised by their forward.

Dynamo traces `Fn.apply(x)` into one `autograd_function_apply` node whose forward body is
a graph of its own. Candidates for what it computes: the body's output read as a registry
call or formula (passes/formulas, so constants such as a swish's beta are found), then
every supported activation at its defaults. A candidate is accepted only if the body
gives its output bit for bit on probe inputs in the traced dtype: the rewrite then runs
the candidate's forward instead of the user's, so the forward stays the same. A candidate
within a few ulp but not bit for bit is named in the report, and the call left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fewbit_fx import activations
from fewbit_fx.activations import Activation
from fewbit_fx.passes import formulas
from fewbit_fx.passes.capture import example_value

NEAR_ULPS = 8.0  # a forward this close to an activation is named in the report as nearly it
APPLY = getattr(getattr(torch.ops, "higher_order", None), "autograd_function_apply", None)


@dataclass(frozen=True)
class Probed:
    """What probing a Function's forward found: `activation` when bit for bit, else
    `near`, the activation it is closest to within NEAR_ULPS (`ulps` apart), or neither.
    A Function whose backward is not the activation's derivative (a straight-through
    estimator, a gradient reversal) is not one: swapping it would change the gradients."""

    activation: Activation | None
    near: Activation | None = None
    ulps: float | None = None
    other_backward: bool = False  # its forward is `near`'s bit for bit, its backward is not f'



def is_apply(node: fx.Node) -> bool:
    return APPLY is not None and node.op == "call_function" and node.target is APPLY


def body(node: fx.Node) -> fx.GraphModule | None:
    """The forward body of an autograd_function_apply node."""
    return _subgraph(node, 0)


def _subgraph(node: fx.Node, i: int) -> fx.GraphModule | None:
    """The node's i-th argument, a subgraph held by its graph module (0: forward, 1: backward)."""
    ref = node.args[i] if len(node.args) > i else None
    if not (isinstance(ref, fx.Node) and ref.op == "get_attr"):
        return None
    try:
        gm = ref.graph.owning_module.get_submodule(ref.target)
    except AttributeError:
        return None
    return gm if isinstance(gm, fx.GraphModule) else None


def body_outputs(gm: fx.GraphModule) -> tuple[list, list] | None:
    """(outputs, saved for backward) as nodes of the body's graph: the body returns both."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    value = out.args[0] if out is not None and out.args else None
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        return None
    outputs, saved = value
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    saved = list(saved) if isinstance(saved, (tuple, list)) else [saved]
    return outputs, saved


_PROBED = "fewbit_function_probe"  # node.meta key: probe's answer, found once per node


def probe(node: fx.Node) -> Probed | None:
    """What the Function at `node` computes of its one tensor input, or None when it is
    not one-input, one-output (a parameter passed in, several outputs)."""
    if _PROBED not in node.meta:
        node.meta[_PROBED] = _probe(node)
    return node.meta[_PROBED]


def _probe(node: fx.Node) -> Probed | None:
    gm = body(node)
    inputs = [a for a in node.args[2:]]
    if gm is None or len(inputs) != 1 or not isinstance(inputs[0], fx.Node) or node.kwargs.get("dirty_idx"):
        return None
    x = example_value(inputs[0])
    outs = body_outputs(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or outs is None
            or len(outs[0]) != 1 or len(placeholders) != 1):
        return None
    probes = _probe_inputs(x.dtype)
    try:
        with torch.no_grad():
            got = [_first_tensor(gm(p)) for p in probes]
    except Exception:  # noqa: BLE001 - a body that does not run on probe inputs: not recognised
        return None
    if any(g is None or g.shape != p.shape or g.dtype != p.dtype for g, p in zip(got, probes)):
        return None
    near, near_ulps = None, NEAR_ULPS
    for act in _candidates(outs[0][0], placeholders[0]):
        try:
            with torch.no_grad():
                want = [act.forward(p) for p in probes]
        except Exception:  # noqa: BLE001 - an activation undefined for this dtype
            continue
        if all(torch.equal(g, w) for g, w in zip(got, want)):
            if not _backward_is_the_derivative(node, act, probes):
                return Probed(None, act, 0.0, other_backward=True)
            return Probed(act)
        ulps = max(_ulps(g, w) for g, w in zip(got, want))
        if ulps <= near_ulps and (near is None or ulps < near_ulps):
            near, near_ulps = act, ulps
    return Probed(None, near, near_ulps if near is not None else None)


def _backward_is_the_derivative(node: fx.Node, act: Activation, probes: list[torch.Tensor]) -> bool:
    """Whether the Function's own backward body gives grad * f'(x) on the probes, to the
    rounding of a derivative written another way (f' from float64 autograd of f)."""
    fwd, bwd = body(node), _subgraph(node, 1)
    if bwd is None:
        return False
    gen = torch.Generator().manual_seed(1)
    try:
        for p in probes:
            grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                outs, saved = fwd(p)
                got = _first_tensor(bwd(grad.to(p.dtype), *saved))
            x64 = p.double().requires_grad_(True)
            with torch.enable_grad():
                want = torch.autograd.grad(act.forward(x64), x64, grad)[0]
            if got is None or got.shape != p.shape:
                return False
            tol = max(1e-3, 8 * torch.finfo(p.dtype).eps)
            scale = float(want.abs().max())
            if not torch.allclose(got.double(), want, rtol=tol, atol=tol * scale, equal_nan=True):
                return False
    except Exception:  # noqa: BLE001 - a backward that does not run on probes: not this activation
        return False
    return True


def _candidates(out: fx.Node, x: fx.Node):
    """The body's own reading first (it carries the constants), then the registry."""
    from fewbit_fx.passes.detect import activation_of_node

    if isinstance(out, fx.Node):
        m = formulas.match_at(out, set())
        if m is not None and m.input is x:
            yield m.activation
        found = activation_of_node(out)
        if found is not None and not found[1] and out.args and out.args[0] is x:
            yield found[0]
    for name in activations.SUPPORTED:
        yield activations.get(name)


def _probe_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    wide = torch.linspace(-30.0, 30.0, 6001, dtype=torch.float64)
    near_zero = torch.linspace(-1e-3, 1e-3, 201, dtype=torch.float64)
    random = torch.randn(4096, generator=gen, dtype=torch.float64) * 3
    return [t.to(dtype) for t in (wide, near_zero, random)]


def _first_tensor(out):
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of want's dtype's eps * |want| (about an ulp)."""
    g, w = got.double(), want.double()
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    ulp = torch.finfo(want.dtype).eps * w.abs().clamp(min=torch.finfo(want.dtype).tiny)
    d = torch.where(same, 0.0, (g - w).abs() / ulp)
    return float(d.max()) if d.numel() else 0.0
