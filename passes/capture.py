"""Capture: the model's forward as torch-IR FX graphs, via Dynamo.

torch.fx.symbolic_trace fails on Hugging Face transformers 5.x; Dynamo works, tolerates
graph breaks (several graphs), and tags each node with `nn_module_stack`. Nodes are mapped
to modules by identity: with modules inlined, each stack entry is keyed by the id of the
module object that ran it, which `capture` resolves against the model's own modules and
names as `named_modules()` does. Dynamo's source strings (`L['self'].h[0]`) are never
parsed for that: they change with decorated forwards, custom `__getattr__` (PEFT),
wrappers and graph breaks. One forward runs on the example inputs and leaves no trace:
no Dynamo cache entries, buffers and RNG restored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fewbit_fx import _compat
from fewbit_fx._state import preserved_state

SCOPES = "fewbit_module_scopes"  # node.meta key: [(path, class)] outermost first


@dataclass(frozen=True)
class Link:
    """A value one captured graph returned that a later graph took as an input (across a
    graph break: FSDP-managed submodules, print, .item(), ...)."""

    placeholder: fx.Node        # the input in the later graph
    changed_between: bool       # modified in place by eager code between the two graphs


@dataclass
class Capture:
    graphs: list[fx.GraphModule]
    reused: int = 0  # graphs Dynamo ran again from its cache during the capture (see notes)
    links: dict = field(default_factory=dict)  # output value node -> [Link]

    @property
    def notes(self) -> list[str]:
        if not self.reused:
            return []
        return [f"{self.reused} captured graphs ran more than once during the analysis forward "
                "(a graph break inside a submodule that is called several times: Dynamo reuses "
                "the first call's graph for the others), so activations in the later calls are "
                "not seen and stay as they are. Fix: remove the graph break (print, .item(), "
                "data-dependent Python) from that submodule's forward"]


class CaptureError(RuntimeError):
    pass


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> Capture:
    """Trace `model(*args, **kwargs)` with Dynamo and return every graph it produced, each
    node's module scopes resolved by identity (`module_scopes`).

    A fresh backend per call forces a fresh trace (Dynamo's cache is keyed on the backend),
    so a second model of the same class is never answered from the first one's graph; the
    cache entries the trace made are removed afterwards (_compat.dynamo_leaves_no_trace).
    """
    graphs: list[fx.GraphModule] = []
    runs: list[int] = []
    events: list[tuple] = []  # ("in" | "out", graph index, tensors), in the order they ran

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append(gm)
        runs.append(0)
        index = len(runs) - 1

        def run(*args):
            runs[index] += 1
            events.append(("in", index, args, [getattr(a, "_version", None) for a in args]))
            out = gm.forward(*args)
            events.append(("out", index, out, [getattr(o, "_version", None) for o in out]))
            return out

        return run

    with preserved_state(model), torch.enable_grad(), _compat.capture_config(), \
            _compat.dynamo_leaves_no_trace():
        try:
            _compat.compile_isolated(model, record, dynamic=False)(*args, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise CaptureError(
                f"could not capture {type(model).__name__} with torch.compile/Dynamo on the "
                f"example inputs: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}. "
                "Fix: check that model(*example_inputs, **example_kwargs) runs eagerly with these "
                "inputs; fewbit_fx needs one forward that Dynamo can trace."
            ) from e
    if not graphs:
        raise CaptureError(
            f"Dynamo produced no graph for {type(model).__name__}; the forward may be "
            "skipped by Dynamo (torch._dynamo.disable) or contain no tensor operations"
        )
    names = _module_names(model)
    for gm in graphs:
        root = _frame_root(gm, names)
        for body in with_checkpointed_regions([gm])[0]:
            for node in body.graph.nodes:
                scopes = _resolve(node.meta.get("nn_module_stack") or {}, names)
                if root:  # a frame resumed inside a submodule: the nodes are in its scope
                    scopes = [(root, type(model.get_submodule(root))), *scopes]
                node.meta[SCOPES] = scopes
    return Capture(graphs, sum(r > 1 for r in runs), _links(graphs, events))


def _links(graphs: list[fx.GraphModule], events: list[tuple]) -> dict:
    """Which graph outputs later graphs took as inputs, matched by storage (a view made in
    eager code between them still links), and whether eager code changed them in between
    (the version counter moved). The tensors are held in `events` until this has run, so
    a storage address cannot be reused by another tensor meanwhile."""
    placeholders = [[n for n in gm.graph.nodes if n.op == "placeholder"] for gm in graphs]
    outputs = []
    for gm in graphs:
        out = gm.graph.output_node().args[0]
        outputs.append(list(out) if isinstance(out, (tuple, list)) else [out])
    live: dict[int, tuple[int, fx.Node, int]] = {}
    links: dict = {}
    for kind, gi, tensors, versions in events:
        for k, (t, version) in enumerate(zip(tensors, versions)):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            if kind == "out" and k < len(outputs[gi]) and isinstance(outputs[gi][k], fx.Node):
                live[ptr] = (gi, outputs[gi][k], version)
            elif kind == "in" and ptr in live and live[ptr][0] != gi and k < len(placeholders[gi]):
                _, node, out_version = live[ptr]
                links.setdefault(node, []).append(Link(placeholders[gi][k], version != out_version))
    return links


def _frame_root(gm: fx.GraphModule, names: dict[int, str]) -> str:
    """The module whose frame a graph was traced from: "" for the model's own forward; after
    a graph break inside a submodule, Dynamo resumes in that submodule's frame. Found from
    any module call in the graph: its path by identity, less the part of its source string
    that is relative to the frame (`L['self'].up` relative to the frame's self)."""
    for node in gm.graph.nodes:
        for key, (source, _) in (node.meta.get("nn_module_stack") or {}).items():
            ident = key.split("@")[0]
            if not (ident.isdigit() and int(ident) in names):
                continue
            path, relative = names[int(ident)], module_path(source)
            if relative and path.endswith(relative) and path != relative:
                return path[: -len(relative)].rstrip(".")
            return ""
    return ""


def _module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its first name in `model.named_modules()` ("" for the root)."""
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
    return names


def _resolve(stack: dict, names: dict[int, str]) -> list[tuple[str, type]]:
    """The stack's modules that belong to the model, by the id in each entry's key
    ("140275509414288", or "...@1" for a second call); an entry without one (a module
    Dynamo did not inline) falls back to its source string."""
    scopes = []
    for key, (source, cls) in stack.items():
        ident = key.split("@")[0]
        if ident.isdigit() and int(ident) in names:
            scopes.append((names[int(ident)], cls))
        elif not ident.isdigit():
            scopes.append((module_path(source), cls))
    return scopes


_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]")


def module_path(dynamo_path: str) -> str:
    """Dynamo's source string "L['self'].h[0].mlp.act" as "h.0.mlp.act". Only for graphs
    that were not captured here (the compiler backend's, where no model object is at hand
    and the path only names a site in reports and overrides)."""
    path = _ROOT.sub("", dynamo_path)
    # a child read through the instance dict (PEFT's __getattr__): .__dict__['_modules']['x']
    path = re.sub(r"\.__dict__\[['\"]_modules['\"]\]\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return path.lstrip(".")


def module_scopes(node: fx.Node) -> list[tuple[str, type]]:
    """(module path, module class) of every module a node was traced in, outermost first."""
    if SCOPES in node.meta:
        return node.meta[SCOPES]
    return [(module_path(path), cls) for path, cls in (node.meta.get("nn_module_stack") or {}).values()]


def innermost_module(node: fx.Node) -> tuple[str, type] | None:
    """(module path, module class) of the innermost module a node was traced in."""
    scopes = module_scopes(node)
    return scopes[-1] if scopes else None


_CHECKPOINT = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def with_checkpointed_regions(graphs: list[fx.GraphModule]) -> tuple[list[fx.GraphModule], set[int]]:
    """The graphs, each followed by the bodies of the activation-checkpointed regions it
    calls (torch.utils.checkpoint, which Dynamo traces as a tag_activation_checkpoint call
    of a subgraph; nested ones too), and the positions of those bodies in the list.

    A checkpointed layer's own ops live only in such a body, so without it the layer's
    activations would go unseen.
    """
    out: list[fx.GraphModule] = []
    bodies: set[int] = set()

    def add(gm: fx.GraphModule, is_body: bool) -> None:
        if is_body:
            bodies.add(len(out))
        out.append(gm)
        for node in gm.graph.nodes:
            if _CHECKPOINT is not None and node.op == "call_function" and node.target is _CHECKPOINT:
                body = getattr(gm, node.args[0].target, None)
                if isinstance(body, fx.GraphModule):
                    add(body, True)

    for gm in graphs:
        add(gm, False)
    return out, bodies


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))
