"""Functional sites (F.gelu, torch.sigmoid, x.tanh() in some module's own code), rewritten
at the level of the Python source of the function that makes the call.

Re-tracing a forward with torch.fx would freeze its Python control flow (optional
arguments, `self.training`, data-dependent branches). Instead, the function that makes
the call (found from the captured node's stack trace: the owner's forward, possibly behind
decorators, or one of its methods) is recompiled from its own source with only the
activation calls on the site's line replaced by a dispatcher. Everything else is the
user's code as written: same globals, closure, defaults, file and line numbers.

At run time the dispatcher checks that the call is the planned activation (same function
family, same parameters, in place or not as planned, on a tensor) and then runs the FewBit/Inverted
child module registered on the owner; any other call runs exactly as written. Functional
norms (F.layer_norm, F.rms_norm) go the same way: the call must have the planned
normalized_shape and the planned presence of weight and bias, and the child
(InvertedNormCall) gets the call's own weight, bias and eps. The
rewritten function is installed on the instance only, as a callable object that pickles
and deep-copies by rebuilding itself from the source (`_Rewritten.__reduce__`).
"""
from __future__ import annotations

import ast
import copy
import functools
import inspect
import textwrap
import types
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fewbit_fx.passes.detect import CallSite, activation_of_call
from fewbit_fx.passes.norms import Norm, norm_of_call

class CannotRewrite(Exception):
    """Why a functional site stays as written (the report shows the message)."""


@dataclass(frozen=True)
class Target:
    """One rewritten call site: the child module it dispatches to and the activation the
    plan was made for (any other call at that site runs unchanged)."""

    lineno: int
    callee: str
    method: bool
    child: str
    activation: object  # fewbit_fx.activations.Activation, or a norm's passes.norms.Norm
    inplace: bool = False  # the planned call writes into its input (the child does too)


# --- run time ----------------------------------------------------------------------------

def _dispatch(owner: nn.Module, target: Target, fn, *args, **kwargs):
    """A rewritten `fn(*args, **kwargs)`."""
    site = owner._modules.get(target.child)
    if site is not None and isinstance(target.activation, Norm):
        found = norm_of_call(fn, args, kwargs)
        if found is not None and found[0] == target.activation:
            return site(*found[1:])  # x, and the call's own weight, bias and eps
    elif site is not None and args and isinstance(args[0], torch.Tensor):
        found = activation_of_call(fn, args, kwargs)
        if found is not None and found == (target.activation, target.inplace):
            return site(args[0])
    return fn(*args, **kwargs)


def _dispatch_method(owner: nn.Module, target: Target, obj, name: str, *args, **kwargs):
    """A rewritten `obj.name(*args, **kwargs)`."""
    site = owner._modules.get(target.child)
    if site is not None and isinstance(obj, torch.Tensor):
        found = activation_of_call(name, (obj, *args), kwargs, method=True)
        if found is not None and found == (target.activation, target.inplace):
            return site(obj)
    return getattr(obj, name)(*args, **kwargs)


class _Rewritten:
    """The rewritten method, installed in the owner's instance `__dict__` under `name`.

    A plain bound method there would pickle as the class's original (silently losing the
    rewrite) and deep-copy bound to the original instance; this object rebuilds itself
    from the source for both, bound to the copy.
    """

    def __init__(self, owner: nn.Module, name: str, targets: tuple[Target, ...],
                 previous, function: types.FunctionType):
        self.owner, self.name, self.targets, self.previous = owner, name, targets, previous
        self.function = function
        self.__name__, self.__qualname__ = function.__name__, function.__qualname__
        self.__doc__ = function.__doc__

    def __call__(self, *args, **kwargs):
        return self.function(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """As the bound method's: libraries read forward's parameters (the HF Trainer)."""
        return inspect.signature(types.MethodType(self.function, self.owner))

    def __reduce__(self):
        return _rebuild, (self.owner, self.name, self.targets, self.previous)

    def __repr__(self) -> str:
        return f"<fewbit_fx rewritten {type(self.owner).__name__}.{self.name}>"


def _rebuild(owner: nn.Module, name: str, targets: tuple[Target, ...], previous):
    """Unpickling/deep copy: the same rewrite, from the source as it is now. If the source
    changed so that the calls are no longer there, the method stays as written (warned)."""
    try:
        return build(owner, name, targets, previous)
    except CannotRewrite as e:
        warnings.warn(f"fewbit_fx: {type(owner).__name__}.{name} is restored without its "
                      f"rewritten activation calls ({e}); re-run fewbit_fx.optimize on the model",
                      RuntimeWarning, stacklevel=2)
        return previous if previous is not None else getattr(type(owner), name).__get__(owner)


# --- rewrite time ------------------------------------------------------------------------

def locate(owner: nn.Module, site: CallSite) -> str:
    """The name under which `owner` looks up the function that makes the call: "forward",
    or one of its class's methods called through self."""
    for name in ["forward"] + sorted(n for c in type(owner).__mro__ for n, v in vars(c).items()
                                     if inspect.isfunction(v) and n != "forward"):
        chain = _chain(_looked_up(owner, name))
        if chain and _holds(chain[-1], site):
            return name
    raise CannotRewrite(
        f"the call {site.callee}() at {_short(site.filename)}:{site.lineno} is in {site.function}(), "
        f"which is not {type(owner).__name__}.forward or one of its methods (a shared helper "
        "function cannot be rewritten for one module only)")


def build(owner: nn.Module, name: str, targets: tuple[Target, ...], previous) -> _Rewritten:
    """The owner's `name` method with every target call dispatched (not installed)."""
    top = previous if previous is not None else _looked_up(owner, name)
    chain = _chain(top)
    if not chain:
        raise CannotRewrite(f"{type(owner).__name__}.{name} is not a Python function")
    inner = _rewrite_function(chain[-1], targets)
    for wrapper, wrapped in zip(reversed(chain[:-1]), reversed(chain[1:])):
        inner = _rewrap(wrapper, wrapped, inner)
    return _Rewritten(owner, name, targets, previous, inner)


def _looked_up(owner: nn.Module, name: str):
    if name in owner.__dict__:
        return owner.__dict__[name]
    return getattr(type(owner), name, None)


def _chain(top) -> list:
    """The callable behind `top` and everything it wraps (`__wrapped__`), outermost first;
    empty unless the innermost is a Python function (the one to rewrite)."""
    fn = getattr(top, "__func__", top)
    chain = []
    while fn is not None and not any(fn is c for c in chain):
        chain.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    return chain if chain and isinstance(chain[-1], types.FunctionType) else []


def _holds(fn: types.FunctionType, site: CallSite) -> bool:
    code = fn.__code__
    if code.co_filename != site.filename or code.co_name != site.function:
        return False
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return bool(lines) and code.co_firstlineno <= site.lineno <= max(lines)


def _rewrap(wrapper, wrapped, new_inner):
    """A copy of a decorator's wrapper that calls `new_inner` instead of `wrapped`: a function
    holding it in its closure, or an object holding it as an attribute (accelerate's
    ConvertOutputsToFp32)."""
    if not isinstance(wrapper, types.FunctionType):
        new = object.__new__(type(wrapper))  # not copy.copy: such wrappers may refuse pickling
        new.__dict__.update(vars(wrapper))
        held = [k for k, v in vars(new).items() if v is wrapped]
        if not held:
            raise CannotRewrite(f"the wrapper {type(wrapper).__name__} around {wrapped.__qualname__} "
                                "does not hold it as an attribute, so the rewritten function "
                                "cannot be put in its place")
        for k in held:
            new.__dict__[k] = new_inner
        return new
    cells = wrapper.__closure__ or ()
    if not any(_cell_contents(c) is wrapped for c in cells):
        raise CannotRewrite(f"the decorator around {getattr(wrapped, '__qualname__', wrapped)} does "
                            "not hold it in its closure, so the rewritten function cannot be put "
                            "in its place")
    closure = tuple(types.CellType(new_inner) if _cell_contents(c) is wrapped else c for c in cells)
    new = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__,
                             wrapper.__defaults__, closure)
    _copy_function_attributes(wrapper, new)
    if getattr(new, "__wrapped__", None) is wrapped:
        new.__wrapped__ = new_inner
    return new


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _copy_function_attributes(src: types.FunctionType, dst: types.FunctionType) -> None:
    dst.__kwdefaults__ = src.__kwdefaults__
    dst.__defaults__ = src.__defaults__
    dst.__annotations__ = dict(getattr(src, "__annotations__", {}) or {})
    dst.__dict__.update(src.__dict__)
    dst.__qualname__, dst.__doc__, dst.__module__ = src.__qualname__, src.__doc__, src.__module__


@functools.lru_cache(maxsize=256)
def _function_ast(fn: types.FunctionType) -> tuple[ast.FunctionDef, int]:
    """(the function's definition, the line offset of its source in its file)."""
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError) as e:
        raise CannotRewrite(f"the source of {fn.__qualname__} is not available ({e})") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if len(defs) != 1 or defs[0].name != fn.__code__.co_name:
        raise CannotRewrite(f"the source of {fn.__qualname__} could not be parsed on its own")
    return defs[0], start - 1


def _rewrite_function(fn: types.FunctionType, targets: tuple[Target, ...]) -> types.FunctionType:
    definition, offset = _function_ast(fn)
    definition = copy.deepcopy(definition)
    if isinstance(definition, ast.AsyncFunctionDef):
        raise CannotRewrite(f"{fn.__qualname__} is a coroutine")
    positional = definition.args.posonlyargs + definition.args.args
    if not positional:
        raise CannotRewrite(f"{fn.__qualname__} takes no positional argument for the module")
    this = positional[0].arg
    ast.increment_lineno(definition, offset)
    replacer = _CallReplacer(targets, this)
    replacer.visit(definition)
    missing = [t for i, t in enumerate(targets) if i not in replacer.replaced]
    if missing:
        t = missing[0]
        raise CannotRewrite(f"no call of {t.callee}() found on line {t.lineno} of {fn.__qualname__}'s "
                            "source (is the file changed since it was imported?)")
    # Defaults, annotations and decorators are taken from the original function object,
    # not re-evaluated.
    definition.decorator_list = []
    definition.returns = None
    for a in (*definition.args.posonlyargs, *definition.args.args, *definition.args.kwonlyargs,
              definition.args.vararg, definition.args.kwarg):
        if a is not None:
            a.annotation = None
    definition.args.defaults = [ast.Constant(None) for _ in definition.args.defaults]
    definition.args.kw_defaults = [None if d is None else ast.Constant(None)
                                   for d in definition.args.kw_defaults]
    free = list(fn.__code__.co_freevars)
    helpers = ["__fewbit_dispatch__", "__fewbit_dispatch_method__", "__fewbit_targets__"]
    factory = ast.FunctionDef(
        name="__fewbit_factory__",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in helpers + free],
                           kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=[definition, ast.Return(ast.Name(definition.name, ast.Load()))],
        decorator_list=[], returns=None, **({"type_params": []} if "type_params" in ast.FunctionDef._fields else {}))
    module = ast.fix_missing_locations(ast.Module(body=[factory], type_ignores=[]))
    code = compile(module, fn.__code__.co_filename, "exec")
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    make = types.FunctionType(factory_code, fn.__globals__)  # the user's globals, untouched
    cells = [_cell_contents(c) for c in (fn.__closure__ or ())]
    new = make(_dispatch, _dispatch_method, targets, *cells)
    _copy_function_attributes(fn, new)
    return new


class _CallReplacer(ast.NodeTransformer):
    """Replaces the target calls: `F.gelu(h)` -> `__fewbit_dispatch__(self, t, F.gelu, h)`,
    `h.tanh()` -> `__fewbit_dispatch_method__(self, t, h, "tanh")`."""

    def __init__(self, targets: tuple[Target, ...], this: str):
        self.targets, self.this, self.replaced = targets, this, set()

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        name = (node.func.attr if isinstance(node.func, ast.Attribute)
                else node.func.id if isinstance(node.func, ast.Name) else None)
        for i, t in enumerate(self.targets):
            if t.lineno != node.lineno or t.callee != name:
                continue
            self.replaced.add(i)
            target = ast.Subscript(ast.Name("__fewbit_targets__", ast.Load()), ast.Constant(i), ast.Load())
            this = ast.Name(self.this, ast.Load())
            if t.method and isinstance(node.func, ast.Attribute):
                call = ast.Call(ast.Name("__fewbit_dispatch_method__", ast.Load()),
                                [this, target, node.func.value, ast.Constant(name), *node.args],
                                node.keywords)
            else:
                call = ast.Call(ast.Name("__fewbit_dispatch__", ast.Load()),
                                [this, target, node.func, *node.args], node.keywords)
            return ast.copy_location(call, node)
        return node


def _short(filename: str) -> str:
    return filename.rsplit("/", 1)[-1]
