"""Capture: the model's forward as torch-IR FX graphs, via Dynamo.

torch.fx.symbolic_trace fails on Hugging Face transformers 5.x; Dynamo works, tolerates
graph breaks (several graphs), and tags each node with `nn_module_stack`, which maps it
back to the module path it came from. One forward runs on the example inputs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx, nn

from fewbit_fx._state import preserved_state


@dataclass
class Capture:
    graphs: list[fx.GraphModule]


class CaptureError(RuntimeError):
    pass


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> Capture:
    """Trace `model(*args, **kwargs)` with Dynamo and return every graph it produced.

    A fresh backend per call forces a fresh trace (Dynamo's cache is keyed on the backend),
    so a second model of the same class is never answered from the first one's graph.
    Buffers (BatchNorm statistics) and the RNG are restored afterwards: analysis leaves
    no trace on the model.
    """
    graphs: list[fx.GraphModule] = []

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    with preserved_state(model), torch.enable_grad(), torch._dynamo.config.patch(
        recompile_limit=10**6, accumulated_recompile_limit=10**6
    ):
        try:
            torch.compile(model, backend=record, dynamic=False)(*args, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise CaptureError(
                f"could not capture {type(model).__name__} with torch.compile/Dynamo: "
                f"{type(e).__name__}: {e}. Check that model(*example_inputs, "
                "**example_kwargs) runs eagerly; fewbit_fx needs one traceable forward."
            ) from e
    if not graphs:
        raise CaptureError(
            f"Dynamo produced no graph for {type(model).__name__}; the forward may be "
            "skipped by Dynamo (torch._dynamo.disable) or contain no tensor operations"
        )
    return Capture(graphs)


_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]")


def module_path(dynamo_path: str) -> str:
    """Turn Dynamo's "L['self'].h[0].mlp.act" (or "L['self']._modules['h']") into "h.0.mlp.act"."""
    path = _ROOT.sub("", dynamo_path)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return path.lstrip(".")


def module_scopes(node: fx.Node) -> list[tuple[str, type]]:
    """(module path, module class) of every module a node was traced in, outermost first."""
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
