"""Analyse saves: which tensors each op keeps for backward, per PyTorch's derivative formulas
(torchgen's derivatives.yaml) and requires_grad, and what that means for one site.

Tensors are grouped into storage families: a view, reshape, permute, eval-mode dropout or
same-dtype cast shares its input's storage, so "the next Linear saves y" is seen through
them. An in-place activation (`F.silu(x, inplace=True)`, `x.sigmoid_()`, a module with
inplace=True) puts a new value into that storage: uses of x after it read y, and what it
keeps itself (autograd's copy of the original x) is x's old value, so the two are separate
families ("values") of one storage.

An op the table does not know is run once on meta tensors under saved_tensors_hooks
(`_probed_saves`): what autograd's derivative formula actually keeps, for any torch op
(adaptive_avg_pool2d's global pooling keeps nothing, max_pool2d its input). Where even
that fails it is assumed to keep all its tensor inputs: that errs toward exact gradients
(inverted) and toward leaving a site alone, never toward a loss.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from fewbit_fx.passes import functions
from fewbit_fx.passes.capture import example_value
from fewbit_fx.passes.detect import Site, activation_of_node

# --- ops that return (a view of) their first argument ---------------------------------
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "t", "expand", "expand_as", "unsqueeze", "squeeze", "narrow", "split", "chunk", "unbind",
    "detach", "as_strided", "movedim", "swapaxes", "unfold", "diagonal", "select", "__getitem__",
}
_VIEW_FUNCTIONS = {
    torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.t, torch.unsqueeze,
    torch.squeeze, torch.narrow, torch.split, torch.chunk, torch.unbind, torch.movedim,
    torch.swapaxes, torch.select, torch.detach, operator.getitem,
}
# --- ops that keep nothing of their tensor inputs --------------------------------------
_NO_SAVE_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.iadd, operator.isub, operator.pos,
    torch.add, torch.sub, torch.neg, torch.cat, torch.concat, torch.stack, torch.sum,
    torch.mean, torch.clone, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.rand_like, torch.randn_like, F.pad, torch.cumsum, torch.flip,
    torch.roll, torch.tril, torch.triu, getattr, torch.masked_fill, torch.repeat_interleave,
    F.embedding,  # keeps the indices (integers), not a float activation
}
_NO_SAVE_METHODS = {
    "add", "add_", "sub", "sub_", "neg", "sum", "mean", "clone", "contiguous", "to", "type",
    "float", "half", "bfloat16", "double", "size", "dim", "numel", "masked_fill",
    "masked_fill_", "repeat", "cumsum", "flip", "roll", "new_zeros", "new_ones", "new_empty",
    "zero_", "fill_", "copy_", "__add__", "__radd__", "__sub__", "__rsub__", "__neg__",
    "tril", "triu", "type_as", "requires_grad_", "item", "tolist", "__len__",
}
_SAVE_INPUT_FUNCS = {  # keep their input (f'(x) needs x)
    torch.pow, torch.log, torch.sin, torch.cos, torch.erf, torch.abs, torch.square,
    torch.log1p, torch.atan, torch.asin, torch.acos, F.normalize,
}
_SAVE_INPUT_METHODS = {"pow", "log", "sin", "cos", "erf", "abs", "square", "log1p", "__pow__"}
_SAVE_RESULT_FUNCS = {  # keep their output only
    torch.exp, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.softmax, F.softmax,
    torch.log_softmax, F.log_softmax, torch.special.expit,
}
_SAVE_RESULT_METHODS = {"exp", "sqrt", "rsqrt", "reciprocal", "softmax", "log_softmax"}
_MATMULS = {
    torch.mm, torch.bmm, torch.matmul, operator.matmul, torch.Tensor.matmul,
}
_MATMUL_METHODS = {"mm", "bmm", "matmul", "__matmul__"}
_CONVS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}
_NORMS = {F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, torch.layer_norm}
if hasattr(F, "rms_norm"):
    _NORMS.add(F.rms_norm)
# Norms keep tensors no node of the graph holds (internal_saved_bytes): layer_norm its
# per-row mean and rstd; rms_norm (composite on CPU) rstd and x*rstd in fp32, and an fp32
# copy of half x instead of x, read off the op by the probe.
_LAYER_NORMS = {F.layer_norm, torch.layer_norm}
_PROBED_NORMS = {f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None}
_MULS = {operator.mul, torch.mul, operator.imul}
_DIVS = {operator.truediv, torch.div, operator.itruediv}
_MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__"}
_DIV_METHODS = {"div", "div_", "__truediv__"}
_POINTWISE_KEEPERS = _MULS | _DIVS | _SAVE_INPUT_FUNCS | {torch.exp, torch.sqrt, torch.rsqrt,
                                                          torch.reciprocal, torch.special.expit}
_POINTWISE_KEEPER_METHODS = _MUL_METHODS | _DIV_METHODS | _SAVE_INPUT_METHODS | {
    "exp", "sqrt", "rsqrt", "reciprocal"}


def _rg(arg) -> bool:
    v = example_value(arg) if isinstance(arg, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.requires_grad


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]


def saved_inputs(node: fx.Node) -> tuple[list[fx.Node], bool]:
    """(nodes whose value `node` keeps for backward, known op?). A node whose output it
    keeps (sigmoid, exp, softmax) lists itself."""
    if node.op not in ("call_function", "call_method"):
        return [], True
    args = node.args
    t, m = node.target, node.target if node.op == "call_method" else None
    tensors = _tensor_args(node)
    if not any(_rg(a) for a in tensors) and not _rg(node):
        return [], True  # no gradient flows: autograd keeps nothing
    if t in _VIEW_FUNCTIONS or m in _VIEW_METHODS or t in _NO_SAVE_FUNCTIONS or m in _NO_SAVE_METHODS:
        return [], True
    if t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
        return [], True  # keeps a mask, not the input
    if t is F.linear:
        x, w = args[0], args[1]
        return [n for n, other in ((x, w), (w, x)) if _rg(other)], True
    if t is torch.addmm or m == "addmm":
        a, b = (args[1], args[2]) if t is torch.addmm else (args[0], args[1])
        return [n for n, other in ((a, b), (b, a)) if _rg(other)], True
    if t is torch.baddbmm:
        a, b = args[1], args[2]
        return [n for n, other in ((a, b), (b, a)) if _rg(other)], True
    if t in _MATMULS or m in _MATMUL_METHODS:
        a, b = args[0], args[1]
        return [n for n, other in ((a, b), (b, a)) if _rg(other)], True
    if t is torch.einsum:
        ops = [a for a in args[1:] if isinstance(a, fx.Node)]
        return [a for a in ops if any(_rg(o) for o in ops if o is not a)], True
    if t in _CONVS:
        return [a for a in args[:2] if isinstance(a, fx.Node)], True  # input and weight
    if t in _PROBED_NORMS:
        probed = _probed_saves(node)
        if probed is not None:
            return probed, True
    if t in _NORMS:
        return [args[0]], True
    if t in _MULS or m in _MUL_METHODS:
        a, b = args[0], args[1]
        return [n for n, other in ((a, b), (b, a)) if isinstance(n, fx.Node) and _rg(other)], True
    if t in _DIVS or m in _DIV_METHODS:
        a, b = args[0], args[1]
        out = [b] if isinstance(b, fx.Node) else []
        if isinstance(b, fx.Node) and _rg(b) and isinstance(a, fx.Node):
            out.append(a)
        return out, True
    if t in _SAVE_INPUT_FUNCS or m in _SAVE_INPUT_METHODS:
        return [a for a in tensors], True
    if t in _SAVE_RESULT_FUNCS or m in _SAVE_RESULT_METHODS:
        return [node], True
    if t is F.scaled_dot_product_attention:
        return [a for a in args[:3] if isinstance(a, fx.Node)] + [node], True
    if t is torch.where:
        return [args[0]] if isinstance(args[0], fx.Node) else [], True
    if functions.is_apply(node):
        read = _function_saves(node)
        if read is not None:
            return read[0], True
    found = activation_of_node(node)
    if found is not None:
        act, inplace = found  # what torch's backward keeps: the registry says
        keeps_result = act.spec.saves_result or (inplace and act.spec.saves_result_inplace)
        return ([node] if keeps_result else [args[0]]), True
    probed = _probed_saves(node)
    if probed is not None:
        return probed, True
    return tensors, False  # unknown: assume it keeps every tensor input


# --- what autograd keeps, read off the op itself ------------------------------------------
_PROBE_MODULES = ("torch", "operator", "math", "builtins")
# torch modules whose functions act beyond their arguments (communication, devices,
# autograd and compiler state, higher-order ops with subgraphs): never run by the probe
_NOT_PROBED = ("torch.distributed", "torch._C._distributed", "torch.cuda", "torch._dynamo",
               "torch.autograd", "torch.utils", "torch._higher_order_ops", "torch._functorch")


_PROBED = "fewbit_probed_saves"  # node.meta key: the probe's answer, found once per node


def _probed_saves(node: fx.Node) -> list[fx.Node] | None:
    """The tensor arguments (and the node itself, for its output) that autograd keeps when
    the op runs: the op called once on meta tensors of the same shapes, strides, dtypes and
    requires_grad under saved_tensors_hooks. None when it cannot be probed (a user
    function, which may have side effects; an op without a meta kernel). saved_inputs asks
    for a node several times (graph, site, norm analyses): the answer is kept on the node,
    as positions among its inputs (a copied graph's node reads them as its own)."""
    if _PROBED not in node.meta:
        probed = _probe(node)
        inputs = node.all_input_nodes
        node.meta[_PROBED] = None if probed is None else (
            [inputs.index(n) for n in probed[0] if n is not node], node in probed[0], probed[1])
    cached = node.meta[_PROBED]
    if cached is None:
        return None
    inputs = node.all_input_nodes
    return [inputs[i] for i in cached[0]] + ([node] if cached[1] else [])


def internal_saved_bytes(node: fx.Node) -> int:
    """Bytes autograd keeps for `node` in tensors that are neither its inputs nor its
    output (a composite op's intermediates: F.rms_norm's x*rstd; layer_norm's statistics),
    as the probe saw them; 0 for an op that was not probed. Only the node's own site can
    free them."""
    if node.op == "call_function" and node.target in _LAYER_NORMS and _rg(node):
        return _layer_norm_statistics(node)
    if functions.is_apply(node) and _rg(node):
        read = _function_saves(node)
        return read[1] if read is not None else 0
    cached = node.meta.get(_PROBED)
    return cached[2] if cached is not None and len(cached) > 2 else 0


def _function_saves(node: fx.Node) -> tuple[list[fx.Node], int] | None:
    """(kept inputs and outputs, bytes of kept intermediates) of a custom
    autograd.Function's call, read off its forward body, which returns what the backward
    uses (ctx.save_for_backward and tensors stashed on ctx) beside the outputs. Outputs
    are the node's getitem users; None where the body cannot be read."""
    gm = functions.body(node)
    read = functions.body_outputs(gm) if gm is not None else None
    if read is None:
        return None
    outputs, saved = read
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fwd_args = list(node.args[2:])
    getitems = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    kept, internal, seen = [], 0, set()
    for s in saved:
        if not isinstance(s, fx.Node) or s in seen:
            continue
        seen.add(s)
        if s in placeholders and placeholders.index(s) < len(fwd_args):
            a = fwd_args[placeholders.index(s)]
            if isinstance(a, fx.Node):
                kept.append(a)
        elif s in outputs and outputs.index(s) in getitems:
            kept.append(getitems[outputs.index(s)])
        else:
            v = s.meta.get("example_value")
            if isinstance(v, torch.Tensor):
                internal += _hinted(v.numel()) * v.element_size()
    return kept, internal


def _layer_norm_statistics(node: fx.Node) -> int:
    """native_layer_norm's mean and rstd, one per row each: fp32 (fp64 for fp64 x), but
    on CPU in x's dtype for half x with half or no weights. The meta kernel says fp32
    always, so the dtype is read off a one-row run on the node's device."""
    x = example_value(node.args[0])
    shape = list(node.args[1]) if isinstance(node.args[1], (tuple, list)) else [node.args[1]]
    if not isinstance(x, torch.Tensor) or not shape:
        return 0
    params = [example_value(a) if isinstance(a, fx.Node) else a
              for a in (node.args[2:4] if len(node.args) > 2 else ())]
    try:
        with torch.no_grad():
            one = torch.zeros([1, *shape], dtype=x.dtype, device=x.device)
            w, b = ([torch.ones(shape, dtype=p.dtype, device=x.device) if isinstance(p, torch.Tensor)
                     else None for p in params] + [None, None])[:2]
            _, mean, _ = torch.native_layer_norm(one, shape, w, b, 1e-5)
    except Exception:  # noqa: BLE001 - an odd call: its statistics are not counted
        return 0
    rows = _hinted(x.numel()) // max(math.prod(_hinted(d) for d in shape), 1)
    return 2 * rows * mean.element_size()


def _probe(node: fx.Node) -> tuple[list[fx.Node], int] | None:
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        if module.split(".")[0] not in _PROBE_MODULES or module.startswith(_NOT_PROBED) or \
                isinstance(node.target, torch._ops.HigherOrderOperator):
            return None
    elif node.op != "call_method":
        return None
    tensors: dict[fx.Node, torch.Tensor] = {}

    def meta(a):
        if isinstance(a, fx.Node):
            v = example_value(a)
            if isinstance(v, torch.Tensor):
                if a not in tensors:
                    tensors[a] = _meta_like(v)
                return tensors[a]
            return _hinted(v)
        return a

    try:
        args = fx.node.map_aggregate(node.args, meta)
        kwargs = fx.node.map_aggregate(node.kwargs, meta)
        kept: list[torch.Tensor] = []
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                lambda t: kept.append(t) or t, lambda t: t):
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - no meta kernel, data-dependent, ...: not probed
        return None
    outputs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    found = [n for n, t in tensors.items() if any(k is t for k in kept)]
    if any(k is o for k in kept for o in outputs) and node not in found:
        found.append(node)
    known = {_storage_id(t) for t in (*tensors.values(), *outputs)}
    internal = {_storage_id(k): k.untyped_storage().nbytes() for k in kept if _storage_id(k) not in known}
    return found, sum(internal.values())


def _storage_id(t: torch.Tensor) -> int:
    """Which storage a (meta) tensor lives in: meta storages have no data pointer."""
    return t.untyped_storage()._cdata


def _meta_like(v: torch.Tensor) -> torch.Tensor:
    """A meta tensor like v; not a leaf, so in-place methods may run on it."""
    shape = tuple(_hinted(d) for d in v.shape)
    stride = tuple(_hinted(d) for d in v.stride())
    t = torch.empty_strided(shape, stride, dtype=v.dtype, device="meta")
    if v.requires_grad and (v.is_floating_point() or v.is_complex()):
        t = t.requires_grad_().clone()
    return t


def _hinted(v):
    from fewbit_fx._compat import size_hint

    return size_hint(v) if isinstance(v, torch.SymInt) else v


def _is_view(node: fx.Node) -> bool:
    """True when node's value shares storage with its first argument."""
    t = node.target
    if node.op == "call_method":
        if t in _VIEW_METHODS or (t.endswith("_") and not t.startswith("__")):
            return True
        if t == "contiguous":
            src = example_value(node.args[0])
            return isinstance(src, torch.Tensor) and src.is_contiguous()
        if t in ("to", "type", "float", "half", "bfloat16", "double", "type_as"):
            src, out = example_value(node.args[0]), example_value(node)
            return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and (
                src.dtype == out.dtype and src.device == out.device
            )
        return False
    if node.op != "call_function":
        return False
    if t in _VIEW_FUNCTIONS:
        return not (t is operator.getitem and _advanced_index(node))
    if t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return not training or p == 0
    return t is not operator.setitem and _mutates(node)  # in-place ops return their input


def _advanced_index(node: fx.Node) -> bool:
    idx = node.args[1]
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, fx.Node) and isinstance(example_value(i), torch.Tensor) for i in items)


def _mutates(node: fx.Node) -> bool:
    """True when the node writes into its first argument: a method ending in `_`, item
    assignment, an augmented operator, `inplace=True` given by name or by position, or a
    function whose aten schema marks its first argument as written (`Tensor(a!)`)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    if node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv, operator.ipow, operator.iand, operator.ior):
        return True
    if node.kwargs.get("inplace", False) is True or _inplace_by_position(node):
        return True
    return _writes_first_argument(getattr(node.target, "__name__", None))


def _inplace_by_position(node: fx.Node) -> bool:
    """`F.leaky_relu(x, 0.01, True)`: an `inplace` parameter bound by position."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace", False) is True


@functools.lru_cache(maxsize=None)
def _writes_first_argument(name: str | None) -> bool:
    packet = getattr(torch.ops.aten, name, None) if isinstance(name, str) else None
    if packet is None or not hasattr(packet, "overloads"):
        return False
    for overload in packet.overloads():
        args = getattr(packet, overload)._schema.arguments
        if args and args[0].alias_info is not None and args[0].alias_info.is_write:
            return True
    return False


@dataclass
class GraphSaves:
    """Storage families of one graph ("values": an in-place activation starts a new one in
    the same storage) and who keeps each for backward."""

    family: dict[fx.Node, fx.Node]            # node -> value root when the node was made
    keepers: dict[fx.Node, list[fx.Node]]     # value root -> nodes that keep it
    unknown: dict[fx.Node, list[str]]         # value root -> unknown ops that may keep it
    escapes: set[fx.Node]                     # value roots returned from the graph
    mutations: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # value root -> ops writing it
    final: dict[fx.Node, fx.Node] = field(default_factory=dict)  # node -> value root its storage ends with
    read: dict[fx.Node, dict[fx.Node, fx.Node]] = field(default_factory=dict)  # node -> {input: value read}

    def value(self, node: fx.Node, at: fx.Node) -> fx.Node:
        """The value root `node` holds when `at` reads it (`at` itself: its own output)."""
        if node is at:
            return self.family[node]
        return self.read.get(at, {}).get(node, self.family[node])

    def members(self, root: fx.Node) -> list[fx.Node]:
        return [n for n, r in self.family.items() if r is root]

    def returned(self, root: fx.Node) -> list[fx.Node]:
        """The graph outputs that hold the value `root` when the graph returns."""
        out = next(iter(reversed(root.graph.nodes)))
        return [m for m in out.all_input_nodes if self.final.get(m) is root]


def _new_value(node: fx.Node) -> bool:
    """An in-place activation: its result is a new value in its input's storage."""
    found = activation_of_node(node)
    return found is not None and found[1]


def analyse_graph(graph: fx.Graph) -> GraphSaves:
    family: dict[fx.Node, fx.Node] = {}
    storage: dict[fx.Node, fx.Node] = {}   # node -> the node that made its storage
    current: dict[fx.Node, fx.Node] = {}   # storage -> the value it holds now
    keepers: dict[fx.Node, list[fx.Node]] = {}
    unknown: dict[fx.Node, list[str]] = {}
    mutations: dict[fx.Node, list[fx.Node]] = {}
    read: dict[fx.Node, dict[fx.Node, fx.Node]] = {}
    escapes: set[fx.Node] = set()
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node) and src in storage and _is_view(node):
            storage[node] = storage[src]
            family[node] = node if _new_value(node) else current[storage[src]]
        else:
            storage[node] = current[node] = family[node] = node
        if node.op == "output":
            escapes.update(current[storage[a]] for a in node.all_input_nodes if a in storage)
            continue
        read[node] = {a: current[storage[a]] for a in node.all_input_nodes if a in storage}
        kept, known = saved_inputs(node)
        for k in kept:
            root = family[node] if k is node else read[node].get(k, k)
            keepers.setdefault(root, []).append(node)
            if not known:
                unknown.setdefault(root, []).append(_describe(node))
        if isinstance(src, fx.Node) and src in storage and _mutates(node):
            mutations.setdefault(current[storage[src]], []).append(node)
            if family[node] is node:  # an in-place activation: later reads see its result
                current[storage[src]] = node
    final = {n: current[s] for n, s in storage.items()}
    return GraphSaves(family, keepers, unknown, escapes, mutations, final, read)


@dataclass
class LaterGraphs:
    """Where a graph's returned values go in the later graphs of the same capture."""

    links: dict                                # output value node -> [capture.Link]
    saves: dict[fx.Graph, GraphSaves]

    def follow(self, root: fx.Node, gs: GraphSaves, depth: int = 4) -> tuple[list[str], bool, bool]:
        """(who keeps the family of `root` in later graphs, whether it may be modified in
        place there or in between, whether it reaches the caller or an unseen place)."""
        kept, mutated, unseen = [], False, False
        for m in gs.returned(root):
            links = self.links.get(m, [])
            if not links or depth == 0:
                unseen = True
                continue
            for link in links:
                later = self.saves.get(link.placeholder.graph)
                if later is None:
                    unseen = True
                    continue
                r = later.family[link.placeholder]
                kept += [f"{_describe(k)} (in a later graph)" for k in later.keepers.get(r, [])]
                mutated |= link.changed_between or bool(later.mutations.get(r))
                if r in later.escapes:
                    k2, m2, u2 = self.follow(r, later, depth - 1)
                    kept, mutated, unseen = kept + k2, mutated or m2, unseen or u2
        return kept, mutated, unseen


NO_LATER_GRAPHS = LaterGraphs({}, {})


@dataclass
class SiteSaves:
    """What one site costs now and what its neighbours keep anyway."""

    numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    saved_before: int                  # bytes kept only because of this site
    y_kept_by: list[str] = field(default_factory=list)
    x_kept_by: list[str] = field(default_factory=list)
    y_mutated: bool = False            # an in-place op changes y later: saving y is unsafe
    y_leaves_graph: bool = False       # y is returned from the captured graph (may be changed there)

    @property
    def y_bytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def analyse_site(site: Site, gs: GraphSaves, compiled: bool = False,
                 later: LaterGraphs = NO_LATER_GRAPHS) -> SiteSaves:
    """`compiled`: the graph goes through torch.compile's partitioner, which recomputes
    pointwise work in backward rather than saving it (see recomputed_by). `later`: where
    values this graph returns go next (eager capture across graph breaks); a returned value
    that goes nowhere seen (the caller) counts as kept, and as possibly modified in place."""
    inside = set(site.nodes)
    y = example_value(site.output)
    y_root, x_root = gs.family[site.output], gs.value(site.input, site.nodes[0])
    recomputed = recomputed_by(site, gs) if compiled else []
    norm = _normalized_by(x_root) if compiled else None
    own = {gs.value(k, n) for n in site.nodes for k in saved_inputs(n)[0]} - _parameters(gs)
    downstream = {root: later.follow(root, gs) for root in own | {y_root} if root in gs.escapes}
    before = 0
    for root in own:
        outsiders = [k for k in gs.keepers.get(root, []) if k not in inside]
        if root is x_root:
            outsiders += recomputed + ([norm] if norm is not None else [])
        if root in downstream:
            kept_later, _, unseen = downstream[root]
            outsiders += kept_later + (["the caller"] if unseen else [])
        if not outsiders:
            before += _family_bytes(root, gs)
    before += sum(internal_saved_bytes(n) for n in site.nodes)
    y_kept = [_describe(k) for k in gs.keepers.get(y_root, []) if k not in inside and k not in recomputed]
    y_later_mutated = False
    if y_root in downstream:
        kept_later, y_later_mutated, unseen = downstream[y_root]
        y_kept += kept_later
        y_later_mutated |= unseen
        if unseen:
            y_kept.append("a later graph or the caller (returned from the captured graph)")
    x_kept = [_describe(k) for k in gs.keepers.get(x_root, []) if k not in inside]
    if x_root in downstream:
        x_kept += downstream[x_root][0]
    x_kept += [f"{_describe(k)} (torch.compile recomputes the output from it)" for k in recomputed]
    if norm is not None:
        x_kept.append(f"{_describe(norm)} (torch.compile recomputes it from the norm's input, "
                      "which the norm keeps)")
    # An output that leaves for where the analysis cannot see (the model's return, a graph
    # it did not capture) may be changed in place there; saving it would then crash.
    y_mutated = y_later_mutated or any(u not in inside for u in gs.mutations.get(y_root, []))
    return SiteSaves(
        numel=y.numel(), dtype=y.dtype, shape=tuple(y.shape), saved_before=before,
        y_kept_by=y_kept, x_kept_by=x_kept, y_mutated=y_mutated,
        y_leaves_graph=y_root in downstream and downstream[y_root][2],
    )


def _parameters(gs: GraphSaves) -> set[fx.Node]:
    """Value roots that are the model's parameters (never counted: they live anyway)."""
    return {n for n in gs.family if n.op == "get_attr" or (n.op == "placeholder" and "_parameters_" in n.name)}


def recomputed_by(site: Site, gs: GraphSaves) -> list[fx.Node]:
    """Under torch.compile, the consumers that keep y but will get it recomputed from x.

    The default min-cut partitioner recomputes pointwise values in backward unless backward
    needs them materialized (as a matmul or conv operand). So when every op that keeps y is
    pointwise (y * up in a gated MLP), the partitioner saves x and recomputes y: x is kept
    anyway, and rewriting the site can only move bytes around (measured: the partitioner
    then recomputes through the rewrite too, and saves exactly what it did before).
    """
    y_root = gs.family[site.output]
    if y_root in gs.escapes:
        return []
    inside = set(site.nodes)
    keepers = [k for k in gs.keepers.get(y_root, []) if k not in inside]
    if keepers and all(_pointwise_keeper(k) for k in keepers):
        return keepers
    return []


def _normalized_by(x_root: fx.Node) -> fx.Node | None:
    """Under torch.compile, the norm whose output x is, if it keeps its own input.

    A norm's output is pointwise in the norm's input and its saved statistics, so the
    partitioner recomputes x in backward instead of saving it (measured: conv-BN-SiLU-conv,
    conv-BN-ReLU6-pool, linear-LayerNorm-GELU-linear save the same bytes with any variant,
    and one MobileNetV2 site saved 10 KB more with one).
    """
    if x_root.op == "call_function" and x_root.target in _NORMS and saved_inputs(x_root)[0]:
        return x_root
    return None


def _pointwise_keeper(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _POINTWISE_KEEPER_METHODS
    return node.op == "call_function" and (
        node.target in _POINTWISE_KEEPERS or activation_of_node(node) is not None)


def _family_bytes(root: fx.Node, gs: GraphSaves) -> int:
    v = example_value(root)
    if not isinstance(v, torch.Tensor):
        return 0
    try:
        return int(v.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001 - some fake tensors have no storage
        return v.numel() * _itemsize(v.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _describe(node: fx.Node) -> str:
    from fewbit_fx.passes.capture import innermost_module

    scope = innermost_module(node)
    where = scope[0] if scope and scope[0] else "<root>"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} in {where}"
