"""Detect: find the pointwise nonlinearities in a captured torch-IR graph.

A site is either a module call (torch.nn or Hugging Face activation module; all the nodes
traced inside it form the site, so formula GELUs count as one) or a functional call in some
other module's forward (F.gelu, torch.sigmoid, x.tanh(), ...). Activations are read from
the graph itself (targets and arguments, module classes), so the same code serves eager
capture and the compiler backend.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fewbit_fx import activations
from fewbit_fx.activations import Activation
from fewbit_fx.passes import formulas, functions
from fewbit_fx.passes.capture import (
    example_value, innermost_module, module_scopes, with_checkpointed_regions,
)


# Frames of torch's own call wrappers: the call site is the first frame outside them.
_WRAPPER_FILES = ("torch/nn/functional.py", "torch/functional.py", "torch/_tensor.py",
                  "torch/overrides.py")
_FRAME = re.compile(r'File "(?P<file>.+)", line (?P<line>\d+), in (?P<func>\S+)')


@dataclass(frozen=True)
class CallSite:
    """Where an activation call sits in the source: file, line, enclosing function, and
    the callee's name as written there (`gelu` for F.gelu, `tanh` for x.tanh())."""

    filename: str
    lineno: int
    function: str
    callee: str
    method: bool


def call_site(node: fx.Node) -> CallSite | None:
    """The source location of a captured functional node, from its stack trace."""
    frames = [m.groupdict() for m in _FRAME.finditer(node.meta.get("stack_trace") or "")]
    frames = [f for f in frames if not f["file"].replace("\\", "/").endswith(_WRAPPER_FILES)]
    if not frames:
        return None
    f = frames[-1]
    resumed = re.match(r"torch_dynamo_resume_in_(.+)_at_\d+$", f["func"])
    if resumed:  # Dynamo's continuation of a frame after a graph break
        f = {**f, "func": resumed.group(1)}
    if node.op == "call_method":
        callee = node.target
    else:
        callee = getattr(node.target, "__name__", None)
    if not isinstance(callee, str):
        return None
    return CallSite(f["file"], int(f["line"]), f["func"], callee, node.op == "call_method")


def _calls() -> tuple[dict, dict, set, dict]:
    """What detect matches, from the registry: functional targets -> (registry name,
    names of the positional arguments after the input), method names -> registry name,
    the targets and methods that write into their input, and the Hugging Face formula
    classes (several nodes per call) -> registry name."""
    functions, methods, inplace, formulas = {}, {}, set(), {}
    for name, spec in activations.SPECS.items():
        functions.update({t: (name, args) for t, args in spec.functions.items()})
        functions.update({t: (name, args) for t, args in spec.inplace_functions.items()})
        methods.update({m: name for m in spec.methods + spec.inplace_methods})
        inplace.update(spec.inplace_functions, spec.inplace_methods)
        if spec.formula:
            formulas.update({cls: name for cls in spec.hf_classes})
    return functions, methods, inplace, formulas


_FUNCTIONS, _METHODS, _INPLACE, _FORMULA_CLASSES = _calls()


@dataclass
class Site:
    """One activation call in a captured graph."""

    activation: Activation
    nodes: list[fx.Node]          # the graph nodes that compute it (one, or a formula)
    input: fx.Node
    graph_index: int
    owner_path: str               # module whose forward makes the call
    module_path: str | None       # the activation module itself, for module sites
    occurrence: int = 0           # functional sites: index among the owner's activation calls
    inplace: bool = False
    checkpointed: bool = False    # inside an activation-checkpointed region
    call_site: CallSite | None = None  # functional sites: where the call is in the source
    notes: list[str] = field(default_factory=list)
    formula: bool = False         # found by graph pattern (passes/formulas), not by call or class
    function: bool = False        # a custom autograd.Function's call (passes/functions)

    @property
    def inline_formula(self) -> bool:
        """A formula inside a bigger forward: no module to swap, no call to dispatch."""
        return self.formula and self.module_path is None

    @property
    def kind(self) -> str:
        """What the report calls it: `silu`, `silu (in-place)`, `swish(beta=1) formula`
        (a formula found by pattern)."""
        name = str(self.activation)
        if self.formula:
            name = f"{name.replace('_formula', '')} formula"
        if self.function:
            name = f"{name} (autograd.Function)"
        return f"{name} (in-place)" if self.inplace else name

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def name(self) -> str:
        if self.module_path is not None:
            return self.module_path or "<root>"
        owner = self.owner_path or "<root>"
        return f"{owner}:{self.activation.name}#{self.occurrence}"

    @property
    def rewrite_key(self) -> tuple:
        """Sites sharing a key are rewritten together: a module called several times, or
        one call in the source that ran several times (a loop) for the same owner."""
        if self.module_path is not None:
            return ("module", self.module_path)
        if self.call_site is not None:
            c = self.call_site
            return ("call", self.owner_path, c.filename, c.lineno, c.callee, c.method)
        return ("call", self.owner_path, self.occurrence)


def activation_of_node(node: fx.Node) -> tuple[Activation, bool] | None:
    """(Activation, in place?) for a single functional/method node, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    return activation_of_call(node.target, node.args, node.kwargs, method=node.op == "call_method")


def activation_of_call(target, args, kwargs, method: bool = False) -> tuple[Activation, bool] | None:
    """(Activation, in place?) for a call `target(*args, **kwargs)` (a method name with
    `method`, the tensor first in `args`), else None. Serves captured graph nodes and, at
    run time, the rewritten functional sites (passes/source_rewrite)."""
    if not method and _is_hashable(target) and target in _FUNCTIONS:
        name, arg_names = _FUNCTIONS[target]
        named = dict(zip(arg_names, args[1:]))
        named.update(kwargs)
        inplace = bool(named.pop("inplace", False)) or target in _INPLACE
    elif method and target in _METHODS:
        name, named = _METHODS[target], dict(kwargs)
        inplace = target in _INPLACE
    else:
        return None
    for arg, choices in activations.SPECS[name].variants.items():  # gelu's approximate="tanh"
        choice = named.pop(arg, None)
        if isinstance(choice, str) and choice in choices:
            name = choices[choice]
    try:
        return activations.get(name, **named), inplace
    except TypeError:
        return None  # e.g. a parameter given as a tensor: leave the call alone


def _is_hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def find_sites(graphs: list[fx.GraphModule], checkpointed: set[int] = frozenset()) -> list[Site]:
    """Every site in `graphs`, in graph order; `checkpointed`: indices of graphs that are
    bodies of activation-checkpointed regions (capture.with_checkpointed_regions)."""
    sites: list[Site] = []
    occurrences: dict[str, int] = {}
    for gi, gm in enumerate(graphs):
        first = len(sites)
        for group, owner in _module_groups(gm.graph):
            site = _module_site(group, owner, gi)
            if site is not None:
                sites.append(site)
        found_formulas = formulas.find(gm.graph, {n for s in sites[first:] for n in s.nodes})
        in_formula = {n for m in found_formulas.values() for n in m.nodes}
        for node in gm.graph.nodes:
            scope = innermost_module(node)
            if scope is not None and _activation_module_class(scope[1], 1) is not None:
                continue  # inside an activation module: handled as a module site
            if node in found_formulas:
                site = _formula_site(found_formulas[node], gi, occurrences)
                sites.append(site)
                continue
            if functions.is_apply(node):
                site = _function_site(node, gi)
                if site is not None:
                    sites.append(site)
                continue
            if node in in_formula:
                continue
            found = activation_of_node(node)
            if found is None or not _is_tensor_node(node.args[0]):
                continue
            owner = scope[0] if scope else ""
            k = occurrences.get(owner, 0)
            occurrences[owner] = k + 1
            act, inplace = found
            sites.append(Site(act, [node], node.args[0], gi, owner, None, k, inplace,
                              call_site=call_site(node)))
        for site in sites[first:]:
            site.checkpointed = gi in checkpointed
    _demote_partial_formula_modules(graphs, sites, occurrences)
    return sites


def _formula_site(m: formulas.Match, gi: int, occurrences: dict[str, int]) -> Site:
    """A formula found by pattern: a module site when it is the whole of one call of a
    module (the module is swapped, as for Hugging Face's formula classes), else a site
    inside its owner's forward."""
    path = _whole_module_call(m.nodes)
    if path:
        return Site(m.activation, m.nodes, m.input, gi, parent_path(path), path, formula=True)
    scope = innermost_module(m.nodes[-1])
    owner = scope[0] if scope else ""
    k = occurrences.get(owner, 0)
    occurrences[owner] = k + 1
    return Site(m.activation, m.nodes, m.input, gi, owner, None, k, formula=True)


def _function_site(node: fx.Node, gi: int) -> Site | None:
    """A module whose forward is one call of a custom autograd.Function computing a
    registry activation bit for bit: swapped like an activation module. The same call
    inside a bigger forward has no module to swap, so it is not a site."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        return None
    nodes = [node, users[0]]
    bodies = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op == "get_attr"]
    path = _whole_module_call(bodies + nodes)
    probed = functions.probe(node) if path else None
    if probed is None or probed.activation is None:
        return None
    return Site(probed.activation, nodes, node.args[2], gi, parent_path(path), path, function=True)


def _whole_module_call(nodes: list[fx.Node]) -> str | None:
    """The path of the module whose call (one entry of Dynamo's nn_module_stack) traced
    exactly these nodes and nothing else, or None (the model's own forward is never one)."""
    stacks = [n.meta.get("nn_module_stack") or {} for n in nodes]
    keys = {next(reversed(stack)) if stack else None for stack in stacks}
    scopes = {innermost_module(n) for n in nodes}
    if len(keys) != 1 or len(scopes) != 1 or None in keys or None in scopes:
        return None
    (key,), ((path, _),) = keys, scopes
    traced = {n for n in nodes[0].graph.nodes if key in (n.meta.get("nn_module_stack") or {})}
    return path if path and traced == set(nodes) else None


def _demote_partial_formula_modules(graphs: list[fx.GraphModule], sites: list[Site],
                                    occurrences: dict[str, int]) -> None:
    """A module is swapped only if every call of it that the graphs saw is the same
    formula; otherwise its formula sites are reported where they are (inside its forward)."""
    by_path: dict[str, list[Site]] = {}
    for s in sites:
        if s.formula and s.module_path is not None:
            by_path.setdefault(s.module_path, []).append(s)
    for path, group in by_path.items():
        covered = {n for s in group for n in s.nodes}
        traced = {n for gm in graphs for n in gm.graph.nodes
                  if n.op in ("call_function", "call_method") and path in {p for p, _ in module_scopes(n)}}
        if traced <= covered and len({s.activation for s in group}) == 1:
            continue
        for s in group:
            s.owner_path, s.module_path = path, None
            s.occurrence = occurrences.get(path, 0)
            occurrences[path] = s.occurrence + 1
            s.notes.append(f"{path} is not swapped: not every call of it computes {s.kind}")


def _module_groups(graph: fx.Graph, accept=lambda cls: _activation_module_class(cls, 1) is not None):
    """Runs of consecutive nodes traced inside the same module call, for the modules whose
    class `accept`s (activation modules; passes/norms takes every module)."""
    group: list[fx.Node] = []
    current = None
    for node in graph.nodes:
        scope = innermost_module(node) if node.op in ("call_function", "call_method") else None
        key = scope if scope and accept(scope[1]) else None
        if key != current:
            if group:
                yield group, current
            group = []
        current = key
        if key is not None:
            group.append(node)
    if group:
        yield group, current


def parent_path(path: str) -> str:
    """The module that owns the module at `path` ("" for a child of the root)."""
    return path.rsplit(".", 1)[0] if "." in path else ""


def _module_site(group: list[fx.Node], scope: tuple[str, type], gi: int) -> Site | None:
    path, cls = scope
    inside = set(group)
    inputs = {a for n in group for a in n.all_input_nodes if a not in inside and _is_tensor_node(a)}
    if len(inputs) != 1:
        return None
    (x,) = inputs
    if len(group) == 1:
        found = activation_of_node(group[0])
        if found is None:
            return None
        act, inplace = found
    else:
        name = _activation_module_class(cls, len(group))
        if name is None or name not in activations.SUPPORTED:
            return None
        act, inplace = activations.get(name), False
    return Site(act, group, x, gi, parent_path(path), path, inplace=inplace)


def _activation_module_class(cls: type, n_nodes: int) -> str | None:
    """Registry name for an activation module class (formula classes by name)."""
    if cls.__module__.startswith("transformers") and cls.__name__ in _FORMULA_CLASSES:
        return _FORMULA_CLASSES[cls.__name__] if n_nodes > 1 else "single-op"
    if cls.__module__.startswith("transformers") and cls.__name__ in activations.HF_CLASSES:
        return "single-op"
    return "single-op" if cls in activations.MODULE_CLASSES else None


def _is_tensor_node(arg) -> bool:
    return isinstance(arg, fx.Node) and isinstance(example_value(arg), torch.Tensor)


# torch.nn modules of the same family that the ops do not cover, and why.
_UNSUPPORTED_TORCH: dict[type, str] = {
    nn.PReLU: "its slope is a learned parameter",
    nn.RReLU: "its slope is random in training",
    nn.Threshold: "not a supported activation",
    nn.Softshrink: "not a supported activation",
    nn.Hardshrink: "not a supported activation",
    nn.GLU: "it gates one half of its input by the other (two inputs, not one)",
}
_LOOKS_LIKE_AN_ACTIVATION = re.compile(
    r"gelu|silu|swish|mish|sigmoid|tanh|relu|softplus|softsign|activation", re.IGNORECASE)


def unrecognised_activations(graphs: list[fx.GraphModule], sites: list[Site]) -> list[str]:
    """Calls of modules that look like activations but hold no site, one line per class
    with the reason, so a report never passes over them in silence (Bloom's GELU is a
    custom autograd.Function, for one). "Look like": torch.nn's other activations, any
    Hugging Face activation class, or a module named like one that calls no other module.
    `graphs` as captured: the checkpointed regions' bodies are searched too."""
    graphs, _ = with_checkpointed_regions(graphs)
    covered = {path for site in sites for n in site.nodes for path, _ in module_scopes(n)}
    found: dict[type, dict[str, bool | str]] = {}  # class -> {path: runs an autograd.Function}
    parents: set[str] = set()  # paths of modules that call other modules
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            scopes = module_scopes(node)
            parents.update(path for path, _ in scopes[:-1])
            for path, cls in scopes:
                nearly = path == scopes[-1][0] and functions.is_apply(node) and _near_miss(node)
                if path not in covered and (_looks_like_an_activation(cls) or nearly):
                    # False, True (a custom autograd.Function) or the activation it nearly is
                    custom = (nearly or True) if functions.is_apply(node) else False
                    paths = found.setdefault(cls, {})
                    paths[path] = paths.get(path, False) or custom
    lines = []
    for cls, paths in found.items():
        if not _known_activation_family(cls):
            paths = {p: c for p, c in paths.items() if p not in parents}
        if not paths:
            continue
        names = sorted(paths, key=_natural)
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
        if cls in _UNSUPPORTED_TORCH:
            lines.append(f"not rewritten: {cls.__name__} at {shown}: {_UNSUPPORTED_TORCH[cls]}")
            continue
        near = next((c for c in paths.values() if isinstance(c, str)), None)
        hint = (". If it computes a supported activation, use that torch.nn module instead "
                "(README: Supported activations)")
        if near is not None:
            why = (f"its custom torch.autograd.Function computes {near}, so swapping it for "
                   "fewbit-fx's would change what it computes")
            hint = "" if "backward" in near else hint
        elif any(paths.values()):
            why = ("it runs a custom torch.autograd.Function that computes none of the supported "
                   "activations bit for bit (or takes more than one tensor), so its backward stays")
        else:
            why = "its forward is not one of the supported activations"
        lines.append(f"not rewritten: {cls.__name__} at {shown}: {why}{hint}")
    return lines


def unseen_activation_modules(model: nn.Module, graphs: list[fx.GraphModule]) -> list[str]:
    """Supported activation modules of `model` that no captured graph ran: their forward
    ran outside Dynamo (a module with full backward hooks, a submodule whose graph Dynamo
    reused for another instance, a branch the example inputs did not take), so they stay
    as they are. One note line naming them, so the report never passes over them."""
    graphs, _ = with_checkpointed_regions(graphs)
    seen = {path for gm in graphs for n in gm.graph.nodes for path, _ in module_scopes(n)}
    unseen = []
    for path, module in model.named_modules():
        if path and path not in seen and _activation_module_class(type(module), 1) is not None:
            try:
                activations.from_module(module)
            except TypeError:
                continue
            unseen.append(path)
    if not unseen:
        return []
    shown = ", ".join(unseen[:3]) + (f", ... ({len(unseen)} in all)" if len(unseen) > 3 else "")
    return [f"not seen by the analysis: {shown}: these activation modules ran outside the captured "
            "graphs (Dynamo runs a module with full backward hooks eagerly, and reuses one graph for "
            "repeated submodules after a graph break) or not at all on the example inputs, so "
            "they stay as they are"]


def _near_miss(node: fx.Node) -> str | None:
    """The activation a Function's forward matches within 1 ulp only, by name."""
    probed = functions.probe(node)
    if probed is None or probed.near is None:
        return None
    if probed.other_backward:
        return f"{probed.near} bit for bit, but its backward is not {probed.near}'s derivative"
    return f"{probed.near} to about {max(1, round(probed.ulps))} ulp but not bit for bit"


def _known_activation_family(cls: type) -> bool:
    return cls in _UNSUPPORTED_TORCH or cls.__module__.startswith("transformers.activations")


def _looks_like_an_activation(cls: type) -> bool:
    if not isinstance(cls, type) or _activation_module_class(cls, 1) is not None:
        return False
    return _known_activation_family(cls) or bool(_LOOKS_LIKE_AN_ACTIVATION.search(cls.__name__))


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]
