"""Rewrite: apply decisions to the user's own module tree, in place.

Module sites: the activation module is swapped for FewBit/Inverted (its hooks move along).
Functional sites: the owning module's own forward is traced with every child kept as a
leaf, the activation calls are pointed at new FewBit/Inverted children, and the generated
code is bound to the same instance. The model keeps its class, methods, parameter names
(the new children have no persistent state), hooks and train/eval mode. Anything that
cannot be rewritten stays as it was, with the reason recorded.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

from torch import fx, nn

from fewbit_fx.nn import FewBit, Inverted
from fewbit_fx.passes.decide import Decision
from fewbit_fx.passes.detect import Site, activation_of_node
from fewbit_fx.passes.saves import SiteSaves


@dataclass
class Planned:
    site: Site
    saves: SiteSaves
    decision: Decision


def build_module(site: Site, decision: Decision) -> nn.Module:
    if decision.variant == "inverted":
        return Inverted(site.activation)
    return FewBit(site.activation, bits=decision.bits)


@dataclass
class Applied:
    failures: dict[tuple, str]          # rewrite_key -> why that site was left unchanged
    modules: dict[tuple, nn.Module]     # rewrite_key -> its new FewBit/Inverted module


def apply(model: nn.Module, plan: list[Planned]) -> Applied:
    """Rewrite `model` in place; a site that cannot be rewritten is left as it was."""
    failures: dict[tuple, str] = {}
    chosen = {p.site.rewrite_key: p for p in plan if p.decision.variant != "kept"}
    by_owner: dict[str, list[Planned]] = {}
    staged: list[tuple[nn.Module, str, nn.Module]] = []
    built: dict[tuple, nn.Module] = {}
    for key, p in chosen.items():
        if p.site.module_path is not None:
            staged.append(_stage_module_swap(model, p))
            built[key] = staged[-1][2]
        else:
            by_owner.setdefault(p.site.owner_path, []).append(p)
    forwards = []
    for owner_path, planned in by_owner.items():
        try:
            forwards.append(_stage_functional(model, owner_path, planned))
        except _CannotRewrite as e:
            for p in planned:
                failures[p.site.rewrite_key] = str(e)
    # Everything is staged: now mutate, so a failure above leaves the model untouched.
    for parent, name, new in staged:
        setattr(parent, name, new)
    for owner, children, forward, by_key in forwards:
        for name, child in children.items():
            owner.add_module(name, child)
        owner.forward = forward
        built.update(by_key)
    return Applied(failures, built)


def _stage_module_swap(model: nn.Module, p: Planned) -> tuple[nn.Module, str, nn.Module]:
    path = p.site.module_path
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    new = build_module(p.site, p.decision)
    new.train(old.training)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                  "_forward_hooks_always_called"):
        if hasattr(old, hooks):
            getattr(new, hooks).update(getattr(old, hooks))
    return parent, name, new


class _CannotRewrite(Exception):
    pass


class _Leaves(fx.Tracer):
    """Trace only the owner's own code: every child module stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _stage_functional(model: nn.Module, owner_path: str, planned: list[Planned]):
    owner = model.get_submodule(owner_path) if owner_path else model
    if "forward" in owner.__dict__:
        raise _CannotRewrite(f"{type(owner).__name__}.forward was already replaced")
    try:
        graph = _Leaves().trace(owner)
    except Exception as e:  # noqa: BLE001 - symbolic tracing fails in many legitimate ways
        raise _CannotRewrite(
            f"{type(owner).__name__}.forward is not symbolically traceable "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
    calls = [n for n in graph.nodes if activation_of_node(n) is not None]
    by_occurrence = {p.site.occurrence: p for p in planned}
    if max(by_occurrence) >= len(calls):
        raise _CannotRewrite(
            f"{type(owner).__name__}.forward traced differently from the captured graph"
        )
    children: dict[str, nn.Module] = {}
    by_key: dict[tuple, nn.Module] = {}
    for k, p in sorted(by_occurrence.items()):
        node = calls[k]
        act, _ = activation_of_node(node)
        if act != p.site.activation:
            raise _CannotRewrite(
                f"{type(owner).__name__}.forward traced differently from the captured graph"
            )
        name = _free_name(owner, f"fewbit_{act.name}_{k}")
        children[name] = by_key[p.site.rewrite_key] = build_module(p.site, p.decision).train(owner.training)
        with graph.inserting_before(node):
            call = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
    targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for t in targets - set(children):
        if not _has_attr(owner, t):
            raise _CannotRewrite(f"traced constant {t} has no home in the module")
    code = fx.GraphModule({t: children.get(t) or _get_attr(owner, t) for t in targets}, graph)
    # Bind the generated forward to the original instance: attributes resolve against it.
    return owner, children, types.MethodType(type(code).forward, owner), by_key


def _get_attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        _get_attr(module, target)
        return True
    except AttributeError:
        return False


def _free_name(owner: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name
