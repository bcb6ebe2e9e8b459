"""Norm sites: LayerNorm / RMSNorm calls whose backward can keep their output y (which the
next Linear keeps anyway) and per-row statistics instead of their input. The same
duplication as an activation's, often larger: an RMSNorm written as aten ops keeps x and
x*rstd, and F.rms_norm on CPU keeps x (an fp32 copy for half x) and x*rstd in fp32.

Found in eager captures only, where the module objects are at hand:
- module sites, swapped for fewbit_fx.nn.InvertedNorm: nn.LayerNorm, nn.RMSNorm, and any
  module that `fewbit_fx.nn.norm_kind` finds computing the aten-op RMSNorm bit for bit on
  probe inputs (Hugging Face's, T5's), whatever its class is called; a look-alike that
  computes something else (Gemma's 1 + weight) stays as it is;
- functional sites, `F.layer_norm(x, shape, w, b, eps)` / `F.rms_norm(x, shape, w, eps)`
  (also torch.layer_norm / torch.rms_norm) in some module's own forward, dispatched at run
  time to fewbit_fx.nn.InvertedNormCall with the call's own weight and bias
  (passes/source_rewrite), only when the call matches the plan (`norm_of_call`).

Found in the compiler's graph too (`find_compiled_norm_sites`, the "fewbit" backend with
norms=True), where no module object exists: F.layer_norm / F.rms_norm nodes (nn.LayerNorm
and nn.RMSNorm trace to them), and aten-op RMSNorms recognised by pattern (a module call
with one input, a 1-D weight, an epsilon and an rsqrt) and confirmed by running its nodes
on probe inputs against each formula, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from fewbit_fx.passes.capture import example_value, innermost_module


@dataclass(frozen=True)
class NormCall:
    """A functional norm call as planned: the dispatcher rewrites only calls equal to it."""

    normalized_shape: tuple[int, ...]
    weight: bool   # called with a weight
    bias: bool     # called with a bias (layer_norm)


@dataclass(frozen=True)
class Operands:
    """A norm in the compiler's graph as the inverted op takes it: its weight and bias
    nodes (None where absent), normalized_shape and eps."""

    weight: fx.Node | None
    bias: fx.Node | None
    normalized_shape: tuple[int, ...]
    eps: float | None


@dataclass(frozen=True)
class Norm:
    """What a norm site computes, in the place a site's Activation takes (report, names)."""

    name: str  # fewbit_fx.ops.norm's kind: layer_norm, rms_norm, hf_rms_norm, t5_rms_norm
    invertible: bool = True
    call: NormCall | None = None  # functional sites: the call as planned
    operands: Operands | None = field(default=None, compare=False)  # compiled graph sites

    def saves_mask(self, dtype: torch.dtype) -> bool:
        return False

    def __str__(self) -> str:
        return self.name


# kind -> the callables that compute it and their parameters after the input, in order
_FUNCTIONS = {
    F.layer_norm: ("layer_norm", ("normalized_shape", "weight", "bias", "eps")),
    torch.layer_norm: ("layer_norm", ("normalized_shape", "weight", "bias", "eps", "cudnn_enable")),
    torch.rms_norm: ("rms_norm", ("normalized_shape", "weight", "eps")),
}
if F.rms_norm is not torch.rms_norm:
    _FUNCTIONS[F.rms_norm] = ("rms_norm", ("normalized_shape", "weight", "eps"))
_DEFAULT_EPS = {"layer_norm": 1e-5, "rms_norm": None}


def norm_of_call(fn, args, kwargs) -> tuple[Norm, torch.Tensor, object, object, float | None] | None:
    """(Norm with its NormCall, x, weight, bias, eps) for a call `fn(*args, **kwargs)` of a
    functional norm the inverted op computes bitwise, else None (then the call runs as
    written): a float tensor x whose trailing dims are normalized_shape, weight and bias
    None or float tensors of that shape, eps a number (or None for rms_norm). Serves the
    captured graph's nodes and, at run time, the rewritten call sites."""
    try:
        if fn not in _FUNCTIONS:
            return None
    except TypeError:  # an unhashable callable
        return None
    kind, names = _FUNCTIONS[fn]
    names = ("input", *names)
    if len(args) > len(names) or not set(kwargs) <= set(names):
        return None
    named = dict(zip(names, args))
    if any(k in named for k in kwargs) or "input" not in {*named, *kwargs}:
        return None
    named.update(kwargs)
    x = named["input"]
    if x is None:
        return None
    shape = named.get("normalized_shape")
    shape = (shape,) if isinstance(shape, int) else shape
    if not isinstance(shape, (tuple, list, torch.Size)):
        return None
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return None
    shape = tuple(shape)
    weight, bias = named.get("weight"), named.get("bias")
    eps = named.get("eps", _DEFAULT_EPS[kind])
    if not (eps is None and kind == "rms_norm") and not (
            isinstance(eps, (int, float)) and not isinstance(eps, bool)):
        return None
    values = [example_value(t) if isinstance(t, fx.Node) else t for t in (x, weight, bias)]
    for t, v in zip((x, weight, bias), values):
        if t is not None and not (isinstance(v, torch.Tensor) and v.dtype in _FLOATS):
            return None
    xv = values[0]
    if xv.dim() < len(shape) or tuple(xv.shape[xv.dim() - len(shape):]) != shape:
        return None
    if any(v is not None and tuple(v.shape) != shape for v in values[1:]):
        return None
    return (Norm(kind, call=NormCall(shape, weight is not None, bias is not None)), x, weight, bias,
            None if eps is None else float(eps))


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def find_norm_sites(graphs: list[fx.GraphModule], model: nn.Module) -> list:
    """One site per call of a supported norm module and per functional norm call outside
    such modules, in graph order."""
    from fewbit_fx.nn import norm_kind
    from fewbit_fx.passes.detect import Site, _module_groups

    modules = dict(model.named_modules())
    kinds: dict[int, str | None] = {}  # id(module) -> kind, probed once per module
    occurrences: dict[str, int] = {}   # owner -> functional norm calls numbered so far
    sites = []
    for gi, gm in enumerate(graphs):
        covered: set[fx.Node] = set()
        for nodes, (path, _) in _module_groups(gm.graph, accept=lambda cls: True):
            module = modules.get(path)
            inputs = {a for n in nodes for a in n.all_input_nodes
                      if a not in nodes and _is_float_tensor(a) and not _is_parameter(a, module)}
            if len(inputs) != 1 or not isinstance(module, nn.Module):
                continue
            if _calls_a_functional_norm(nodes) and not isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                continue  # a user's module around F.layer_norm / F.rms_norm: a functional site
            if id(module) not in kinds:
                kinds[id(module)] = norm_kind(module)
            if kinds[id(module)] is None:
                continue
            (x,) = inputs
            sites.append(Site(Norm(kinds[id(module)]), nodes, x, gi, path, path))
            covered.update(nodes)
        sites += _functional_sites(gm, gi, covered, occurrences)
    return sites


def _functional_sites(gm: fx.GraphModule, gi: int, covered: set[fx.Node],
                      occurrences: dict[str, int]) -> list:
    """F.layer_norm / F.rms_norm nodes outside the module sites, numbered per owner across
    the graphs (the site's name: `owner:layer_norm#0`). Not inside torch's own norm
    modules: those are module sites or stay."""
    from fewbit_fx.passes.detect import Site, call_site

    sites = []
    for node, found, scope in _functional_norm_nodes(gm, covered):
        if scope is not None and issubclass(scope[1], (nn.LayerNorm, nn.RMSNorm)):
            continue
        owner = scope[0] if scope else ""
        k = occurrences.get(owner, 0)
        occurrences[owner] = k + 1
        sites.append(Site(found[0], [node], found[1], gi, owner, None, k, call_site=call_site(node)))
    return sites


def _functional_norm_nodes(gm: fx.GraphModule, covered: set[fx.Node]):
    """(node, norm_of_call's result, innermost module scope) per functional norm call on a
    float tensor, outside `covered`."""
    for node in gm.graph.nodes:
        if node in covered or node.op != "call_function":
            continue
        found = norm_of_call(node.target, node.args, node.kwargs)
        if found is not None and _is_float_tensor(found[1]):
            yield node, found, innermost_module(node)


def _calls_a_functional_norm(nodes: list[fx.Node]) -> bool:
    return any(n.op == "call_function" and norm_of_call(n.target, n.args, n.kwargs) is not None
               for n in nodes)


def _is_float_tensor(node) -> bool:
    v = example_value(node) if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _is_parameter(node: fx.Node, module) -> bool:
    """The norm's own weight/bias: an attribute read, or a graph input Dynamo lifted from
    a module's parameters (named from its source, `..._parameters_weight_`)."""
    return node.op == "get_attr" or (node.op == "placeholder" and "_parameters_" in node.name)


def find_compiled_norm_sites(graphs: list[fx.GraphModule]) -> list:
    """Norm sites in the compiler's graphs, in graph order: aten-op RMSNorm module calls
    (_probed_group) and F.layer_norm / F.rms_norm nodes. A node inside torch's LayerNorm /
    RMSNorm module is that module's site (named by its path); others are functional sites
    of their owner, numbered like the eager ones."""
    from fewbit_fx.passes.detect import Site, _module_groups, call_site, parent_path

    sites = []
    occurrences: dict[str, int] = {}
    for gi, gm in enumerate(graphs):
        covered: set[fx.Node] = set()
        for nodes, (path, _) in _module_groups(gm.graph, accept=lambda cls: True):
            if _calls_a_functional_norm(nodes):
                continue
            found = _probed_group(nodes)
            if found is not None:
                kind, x, weight, eps = found
                n = example_value(x).shape[-1]
                operands = Operands(weight, None, (n,), eps)
                sites.append(Site(Norm(kind, operands=operands), nodes, x, gi, parent_path(path), path))
                covered.update(nodes)
        for node, found, scope in _functional_norm_nodes(gm, covered):
            norm, x, weight, bias, eps = found
            if any(t is not None and not isinstance(t, fx.Node) for t in (weight, bias)):
                continue
            norm = Norm(norm.name, operands=Operands(weight, bias, norm.call.normalized_shape, eps))
            if scope is not None and issubclass(scope[1], (nn.LayerNorm, nn.RMSNorm)):
                sites.append(Site(norm, [node], x, gi, parent_path(scope[0]), scope[0]))
                continue
            owner = scope[0] if scope else ""
            k = occurrences.get(owner, 0)
            occurrences[owner] = k + 1
            sites.append(Site(norm, [node], x, gi, owner, None, k, call_site=call_site(node)))
    return sites


def _probed_group(nodes: list[fx.Node]) -> tuple[str, fx.Node, fx.Node, float] | None:
    """(kind, x, weight, eps) if one module call's nodes compute an aten-op RMSNorm
    (fewbit_fx.ops.norm's hf/t5/uncast formulas) of its one input x with its 1-D weight,
    else None. Candidates have that shape, an rsqrt and a float constant (the eps); each
    is confirmed by running the nodes on two probe inputs in x's traced dtype with a
    random weight, against each formula and candidate eps, bit for bit."""
    from fewbit_fx.nn import probed_kind

    inside = set(nodes)
    tensors = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    weights = [a for a in tensors if _is_parameter(a, None)]
    xs = [a for a in tensors if a not in weights]
    if len(weights) != 1 or len(xs) != 1 or not _is_float_tensor(xs[0]) or not _is_float_tensor(weights[0]):
        return None
    (x,), (weight,) = xs, weights
    xv, wv = example_value(x), example_value(weight)
    if wv.dim() != 1 or xv.dim() < 1 or xv.shape[-1] != wv.shape[0] or not isinstance(wv.shape[0], int):
        return None
    if not any(_is_rsqrt(n) for n in nodes) or [n for n in nodes if _used_outside(n, inside)] != [nodes[-1]]:
        return None
    eps_candidates = sorted({a for n in nodes for a in (*n.args, *n.kwargs.values())
                             if isinstance(a, float)})
    if not eps_candidates:
        return None
    probe = _probe_module(nodes, x, weight)
    if probe is None:
        return None
    n = wv.shape[0]
    gen = torch.Generator().manual_seed(0)
    shape = (2,) * (xv.dim() - 1) + (n,)
    probes = [((torch.randn(shape, generator=gen) * scale).to(xv.dtype),
               (torch.rand(n, generator=gen) * 2 - 0.5).to(wv.dtype)) for scale in (3.0, 0.01)]
    try:
        with torch.no_grad():
            got = [probe(px, pw) for px, pw in probes]
            found = probed_kind(got, probes, eps_candidates)
    except Exception:  # noqa: BLE001 - nodes that do not run on probe inputs: not this formula
        return None
    return None if found is None else (found[0], x, weight, found[1])


def _probe_module(nodes: list[fx.Node], x: fx.Node, weight: fx.Node) -> fx.GraphModule | None:
    """The nodes as a graph of their own taking (x, weight), returning the last node."""
    graph = fx.Graph()
    env = {x: graph.placeholder("x"), weight: graph.placeholder("weight")}
    for node in nodes:
        if node.op not in ("call_function", "call_method") or any(a not in env for a in node.all_input_nodes):
            return None
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[nodes[-1]])
    return fx.GraphModule(nn.Module(), graph)


def _is_rsqrt(node: fx.Node) -> bool:
    return node.target in (torch.rsqrt, "rsqrt", torch.Tensor.rsqrt)


def _used_outside(node: fx.Node, inside: set[fx.Node]) -> bool:
    return any(u not in inside for u in node.users)
