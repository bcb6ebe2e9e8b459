"""Rewrite: apply decisions to the user's own module tree, in place.

Module sites: the activation module is swapped for FewBit/Inverted, which shares the old
module's hook dictionaries (so the user's hook handles keep working) and remembers it (so
`undo` can put it back). Functional sites: the function that makes the call is recompiled
from its own source with only those calls dispatched to new FewBit/Inverted children
(passes/source_rewrite), installed on the owning instance; all other code, control flow
included, stays as the user wrote it. The model keeps its class, methods, parameter names
(the new children have no persistent state), hooks and train/eval mode. Anything that
cannot be rewritten stays as it was, with the reason recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fewbit_fx.nn import FewBit, Inverted, InvertedNormCall
from fewbit_fx.passes.decide import Decision
from fewbit_fx.passes.detect import Site
from fewbit_fx.passes.norms import Norm
from fewbit_fx.passes.plan import Planned
from fewbit_fx.passes.source_rewrite import CannotRewrite, Target, _Rewritten, build, locate

_REPLACED = "_fewbit_replaced"  # on a FewBit/Inverted module: the activation module it replaced


def build_module(site: Site, decision: Decision, old: nn.Module | None = None) -> nn.Module:
    """`old`: the module a module site swaps out (a norm is rebuilt around its own
    parameters)."""
    if isinstance(site.activation, Norm) and site.activation.call is not None:
        return InvertedNormCall(site.activation.name, site.activation.call.normalized_shape)
    if isinstance(site.activation, Norm):
        return Inverted(old)
    if decision.variant == "inverted":
        return Inverted(site.activation, inplace=site.inplace)
    return FewBit(site.activation, bits=decision.bits, inplace=site.inplace)


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
            held = _state_held(model.get_submodule(p.site.module_path), p.site)
            if held:
                failures[key] = (f"the module holds {held}, which swapping it would drop from the "
                                 "model's state_dict")
                continue
            staged.append(_stage_module_swap(model, p))
            built[key] = staged[-1][2]
        else:
            by_owner.setdefault(p.site.owner_path, []).append(p)
    functional = []
    for owner_path, planned in by_owner.items():
        owner = model.get_submodule(owner_path) if owner_path else model
        functional += _stage_functional(owner, planned, failures, built)
    # Everything is staged: now mutate, so a failure above leaves the model untouched.
    for parent, name, new in staged:
        setattr(parent, name, new)
    for owner, name, rewritten, children in functional:
        for child_name, child in children.items():
            owner.add_module(child_name, child)
        owner.__dict__[name] = rewritten
    return Applied(failures, built)


def _state_held(module: nn.Module, site: Site) -> str:
    """What of the user's state a swap would lose: parameters or buffers of an activation
    module (a norm's are carried over), as words, or ''."""
    if isinstance(site.activation, Norm):
        return ""
    params = [n for n, _ in module.named_parameters()]
    buffers = [n for n, _ in module.named_buffers()]
    return " and ".join(f"{what} {', '.join(names)}" for what, names in
                        (("parameters", params), ("buffers", buffers)) if names)


def _stage_module_swap(model: nn.Module, p: Planned) -> tuple[nn.Module, str, nn.Module]:
    path = p.site.module_path
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    new = build_module(p.site, p.decision, old)
    new.train(old.training)
    # The same dictionaries, not copies: a handle the user holds removes its hook from
    # both, and hooks registered later on either apply to the module that runs.
    for attr, value in vars(old).items():
        if "_hooks" in attr and isinstance(value, dict):  # _forward_hooks_with_kwargs, ...
            object.__setattr__(new, attr, value)
    object.__setattr__(new, _REPLACED, old)  # not a child: no state_dict or modules() entry
    return parent, name, new


def _stage_functional(owner: nn.Module, planned: list[Planned], failures: dict, built: dict):
    """(owner, method name, rewritten method, new children) per method of `owner` that makes
    planned calls; sites that cannot be rewritten go to `failures` with the reason."""
    by_method: dict[str, list[Planned]] = {}
    for p in planned:
        try:
            if p.site.call_site is None:
                raise CannotRewrite("the captured graph does not say where the call is in the source")
            by_method.setdefault(locate(owner, p.site.call_site), []).append(p)
        except CannotRewrite as e:
            failures[p.site.rewrite_key] = str(e)
    staged = []
    index = 0
    for name, ps in by_method.items():
        children: dict[str, nn.Module] = {}
        targets = []
        for p in ps:
            c = p.site.call_site
            child = _free_name(owner, f"fewbit_{p.site.activation.name}_{index}", children)
            index += 1
            children[child] = build_module(p.site, p.decision).train(owner.training)
            targets.append(Target(c.lineno, c.callee, c.method, child, p.site.activation, p.site.inplace))
        try:
            rewritten = build(owner, name, tuple(targets), owner.__dict__.get(name))
        except CannotRewrite as e:
            for p in ps:
                failures[p.site.rewrite_key] = str(e)
            continue
        for p, t in zip(ps, targets):
            built[p.site.rewrite_key] = children[t.child]
        staged.append((owner, name, rewritten, children))
    return staged


@dataclass
class Undone:
    """What `undo` took out, so `redo` can put exactly those objects back."""

    swaps: list[tuple[nn.Module, str, nn.Module]]                       # parent, name, rewritten
    methods: list[tuple[nn.Module, str, _Rewritten, dict[str, nn.Module]]]  # owner, name, method, children

    def __len__(self) -> int:
        return len(self.swaps) + len(self.methods)

    def redo(self) -> None:
        for parent, name, new in self.swaps:
            parent._modules[name] = new
        for owner, name, method, children in self.methods:
            owner._modules.update(children)
            owner.__dict__[name] = method


def undo(model: nn.Module) -> Undone:
    """Put back what `apply` changed (the original activation modules and methods), so a
    model can be decided afresh or measured as it was; `redo()` reverses it."""
    done = Undone([], [])
    for _, module in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(module._modules.items()):
            original = getattr(child, _REPLACED, None) if isinstance(child, (FewBit, Inverted)) else None
            if original is not None:
                module._modules[name] = original
                done.swaps.append((module, name, child))
        for name, value in list(vars(module).items()):
            if isinstance(value, _Rewritten):
                children = {t.child: module._modules.pop(t.child) for t in value.targets
                            if t.child in module._modules}
                if value.previous is None:
                    del module.__dict__[name]
                else:
                    module.__dict__[name] = value.previous
                done.methods.append((module, name, value, children))
    return done


def rewritten_modules(model: nn.Module) -> int:
    """How many sites of `model` were rewritten by `apply` (0: an untouched model)."""
    swaps = sum(isinstance(m, (FewBit, Inverted)) and hasattr(m, _REPLACED) for m in model.modules())
    methods = sum(len(v.targets) for m in model.modules() for v in vars(m).values()
                  if isinstance(v, _Rewritten))
    return swaps + methods


def _free_name(owner: nn.Module, base: str, taken: dict) -> str:
    name, i = base, 1
    while hasattr(owner, name) or name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
