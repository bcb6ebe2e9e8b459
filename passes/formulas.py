"""Activations written as formulas (`x * torch.sigmoid(1.702 * x)`, a tanh GELU spelled
out), found by graph pattern in the captured torch-IR graph, whatever class or function
holds them.

Each registry entry with `formula=True` is its own pattern: its forward, traced with
torch.fx (once with its parameters at sentinel values, so the constants in those places
become the parameters, and once at the defaults, where a forward may take a shorter
path, as swish does for beta = 1). A match is the same expression tree as the entry's
forward: the same ops in the same nesting with the same constants, up to the order of the
two operands of a multiply or an add (IEEE a*b and a+b are commutative bit for bit, and
torch computes `c * x` as `x * c`). Nothing else is rewritten into anything: `x * 0.5 * u`
matches `0.5 * x * u`, but `x * (0.5 * u)` (another rounding) does not. So the entry's
forward reproduces what the user's code computes bit for bit.

A match is one site only if its intermediates are used nowhere else (else those stay as
the user wrote them), and its input is a floating tensor.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx

from fewbit_fx import activations
from fewbit_fx.activations import Activation

# Ops a formula may be made of: graph targets and method names -> one name each.
_OPS: dict = {}
for _name, _targets in {
    "mul": (operator.mul, torch.mul, "mul"),
    "add": (operator.add, torch.add, "add"),
    "sub": (operator.sub, torch.sub, "sub"),
    "div": (operator.truediv, torch.div, torch.true_divide, "div", "true_divide"),
    "pow": (operator.pow, torch.pow, "pow"),
    "neg": (operator.neg, torch.neg, "neg"),
    "exp": (torch.exp, "exp"),
    "log1p": (torch.log1p, "log1p"),
    "erf": (torch.erf, torch.special.erf, "erf"),
}.items():
    for _t in _targets:
        _OPS[_t] = _name
_COMMUTATIVE = {"mul", "add"}


@dataclass(frozen=True)
class Pattern:
    """One entry's forward as a tree: ("x",), ("const", v), ("param", name) or
    (op, *operands), op an _OPS name or a one-input registry Activation (sigmoid, tanh,
    softplus with its parameters)."""

    name: str
    tree: tuple
    fixed: tuple[tuple[str, float], ...]  # parameters this pattern does not hold (defaults)

    @property
    def size(self) -> int:
        return _size(self.tree)


@dataclass
class Match:
    activation: Activation
    input: fx.Node
    nodes: list[fx.Node]  # in graph order; the last is the output


def _size(tree) -> int:
    return 0 if tree[0] in ("x", "const", "param") else 1 + sum(_size(t) for t in tree[1:])


def _op(node: fx.Node):
    """The op name of a graph node (None: not a formula op), and its operands."""
    from fewbit_fx.passes.detect import activation_of_node

    if node.op not in ("call_function", "call_method"):
        return None, ()
    found = activation_of_node(node)
    if found is not None:
        act, inplace = found
        return (None, ()) if inplace else (act, node.args[:1])
    try:
        name = _OPS.get(node.target)
    except TypeError:  # an unhashable target
        return None, ()
    if name is None or node.kwargs:  # torch.add(a, b, alpha=2), torch.div(..., rounding_mode=)
        return None, ()
    return name, tuple(node.args)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tree(arg, params: dict[float, str]):
    """A traced template's node as a pattern tree; `params`: sentinel value -> name."""
    if isinstance(arg, fx.Node):
        if arg.op == "placeholder":
            return ("x",)
        op, operands = _op(arg)
        if op is None:
            raise ValueError(f"formula pattern: unsupported op {arg.target}")
        return (op, *(_tree(a, params) for a in operands))
    if _is_number(arg):
        v = float(arg)
        return ("param", params[v]) if v in params else ("const", v)
    raise ValueError(f"formula pattern: unsupported argument {arg!r}")


def _trace(name: str, p: dict[str, float], params: dict[float, str]) -> tuple:
    spec = activations.SPECS[name]
    gm = fx.symbolic_trace(lambda x: spec.forward(x, p))
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return _tree(out.args[0], params)


@functools.lru_cache(maxsize=None)
def patterns() -> tuple[Pattern, ...]:
    """Every formula entry's patterns, the largest first, and for the same size the ones
    with fewer parameters (quick_gelu before swish with beta = 1.702)."""
    found: list[Pattern] = []
    for name, spec in activations.SPECS.items():
        if not spec.formula:
            continue
        sentinels = {n: 0.3141592653589793 + 1.2345678901e-3 * (i + 1) for i, (n, _) in enumerate(spec.params)}
        general = Pattern(name, _trace(name, sentinels, {v: n for n, v in sentinels.items()}), ())
        missing = set(spec.param_names) - set(_params_in(general.tree))
        if missing:
            raise ValueError(f"formula {name}: parameters {sorted(missing)} are not constants of its forward")
        found.append(general)
        at_defaults = Pattern(name, _trace(name, spec.defaults, {}), tuple(spec.params))
        if at_defaults.tree != _substitute(general.tree, spec.defaults):  # a shorter path there
            found.append(at_defaults)
    return tuple(sorted(found, key=lambda p: (-p.size, len(_params_in(p.tree)))))


def _substitute(tree, values: dict[str, float]):
    if tree[0] == "param":
        return ("const", float(values[tree[1]]))
    if tree[0] in ("x", "const"):
        return tree
    return (tree[0], *(_substitute(t, values) for t in tree[1:]))


def _params_in(tree) -> list[str]:
    if tree[0] == "param":
        return [tree[1]]
    if tree[0] in ("x", "const"):
        return []
    return [n for t in tree[1:] for n in _params_in(t)]


def _match(tree, arg, env: dict, taken: set) -> Iterator[dict]:
    """Every way `arg` (a graph node or a constant) is `tree`, extending `env` ("x" -> the
    input node, parameter names -> values, "nodes" -> the matched op nodes)."""
    kind = tree[0]
    if kind == "x":
        if not isinstance(arg, fx.Node) or env.get("x", arg) is not arg:
            return
        yield {**env, "x": arg}
        return
    if kind == "const":
        if _is_number(arg) and float(arg) == tree[1]:
            yield env
        return
    if kind == "param":
        if _is_number(arg) and env.get(tree[1], float(arg)) == float(arg):
            yield {**env, tree[1]: float(arg)}
        return
    if not isinstance(arg, fx.Node) or arg in taken or arg in env["nodes"]:
        return
    op, operands = _op(arg)
    if op != kind or len(operands) != len(tree) - 1:
        return
    orders = [operands]
    if op in _COMMUTATIVE and len(operands) == 2:
        orders.append(operands[::-1])
    for order in orders:
        yield from _match_all(tree[1:], order, {**env, "nodes": env["nodes"] | {arg}}, taken)


def _match_all(trees, args, env: dict, taken: set) -> Iterator[dict]:
    if not trees:
        yield env
        return
    for first in _match(trees[0], args[0], env, taken):
        yield from _match_all(trees[1:], args[1:], first, taken)


def match_at(root: fx.Node, taken: set) -> Match | None:
    """The formula whose output is `root`, if any (nodes in `taken` belong to other sites)."""
    from fewbit_fx.passes.capture import example_value

    for pattern in patterns():
        for env in _match(pattern.tree, root, {"nodes": frozenset()}, taken):
            nodes = env["nodes"]
            if env["x"] in nodes:
                continue
            # An intermediate used elsewhere: the formula is not one site.
            if any(u not in nodes for n in nodes if n is not root for u in n.users):
                continue
            x = example_value(env["x"])
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                continue
            values = {**dict(pattern.fixed), **{k: v for k, v in env.items() if k not in ("x", "nodes")}}
            try:
                act = activations.get(pattern.name, **values)
            except (TypeError, ValueError):  # constants the entry refuses (swish with beta <= 0)
                continue
            order = {n: i for i, n in enumerate(root.graph.nodes)}
            return Match(act, env["x"], sorted(nodes, key=order.__getitem__))
    return None


def find(graph: fx.Graph, taken: set) -> dict[fx.Node, Match]:
    """Every formula in `graph` by its output node, outermost first (walking back from the
    end, so `x * sigmoid(x) + 1` is a swish and an add; a formula is never split)."""
    matches: dict[fx.Node, Match] = {}
    claimed = set(taken)
    for node in reversed(graph.nodes):
        if node in claimed or node.op not in ("call_function", "call_method"):
            continue
        m = match_at(node, claimed)
        if m is not None:
            matches[node] = m
            claimed.update(m.nodes)
    return matches
