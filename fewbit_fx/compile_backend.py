"""The "fewbit" torch.compile backend: the graph pass on Dynamo's graph, then Inductor.

    torch.compile(model, backend="fewbit")                       # defaults: auto, 3 bits
    torch.compile(model, backend=fewbit_fx.backend(mode="exact", max_autotune=True))

The rewrite happens on the torch-IR graph before AOTAutograd, so the custom ops' Inductor
decompositions let Inductor fuse them with their neighbours, and the partitioner sees the
rewritten forward (it saves y and the packed codes instead of x). Since the rewrite is
part of the graph Inductor receives, Inductor's and AOTAutograd's caches key on it: a warm
cache can never return an un-rewritten or stale graph.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import replace
from typing import Callable

import torch
from torch import fx

from fewbit_fx import _compat, partition
from fewbit_fx.cache_key import with_cache_key
from fewbit_fx.packing import check_bits
from fewbit_fx.passes import decide
from fewbit_fx.passes.plan import plan_graphs
from fewbit_fx.passes.plan import Planned
from fewbit_fx.passes.norms import Norm


def backend(mode: str = "auto", bits: int = 3, overrides: dict[str, str] | None = None,
            strict: bool = False, memory_budget: float | None = None, norms: bool = False,
            **inductor_options) -> Callable:
    """A configured backend. `inductor_options` go to Inductor as config patches
    (for example max_autotune=True, or triton.cudagraphs=True).

    `memory_budget` is torch.compile's own activation-memory knob
    (torch._functorch.config.activation_memory_budget), applied to this backend's graphs
    only: the partitioner recomputes what it must on the rewritten graph, and a graph whose
    rewritten plan would keep no less than the budget alone keeps on the original is compiled
    as the original (fewbit_fx.partition). None leaves the user's global setting in force
    (the same composition applies to it). At budget 1 the partitioner would keep a gated
    MLP's product act(gate) * up for down_proj beside gate and up; the backend has it
    recompute the product instead (exact; fewbit_fx.partition.gated_recompute).

    `norms`: also rewrite LayerNorm / RMSNorm calls whose output a consumer keeps, as
    optimize(norms=True) does (F.layer_norm / F.rms_norm, nn.LayerNorm / nn.RMSNorm, and
    RMSNorms written as aten ops, found in the graph: passes/norms).

    If the rewrite or its compilation fails, the graph is compiled unchanged by plain
    Inductor and a warning says why (the model never breaks); `strict=True` raises instead.
    """
    decide.check_mode(mode)
    check_bits(bits)
    if not isinstance(norms, bool):
        raise TypeError(f"fewbit backend: norms must be True or False (rewrite LayerNorm/RMSNorm "
                        f"calls too), got {norms!r}")
    budget = _compat.budget_patch(memory_budget)
    patches = with_cache_key(dict(inductor_options))

    def fewbit(gm: fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        from fewbit_fx.ops import inductor

        inductor.register()

        original = _snapshot(gm.graph)

        def compile_original():
            gm.graph = original
            gm.recompile()
            fewbit.plans.append([])
            with budget():
                return compile_fx(gm, example_inputs, config_patches=patches)

        try:
            planned = plan_graph(gm, mode, bits, overrides, norms)
            graph_patches = {**patches, **_matched_budget(gm, original, example_inputs, planned, patches,
                                                          memory_budget)}
            graph_patches.update(_gated_products(gm, planned, graph_patches, memory_budget))
            rewrite_graph(gm, planned)
            with budget():
                compiled = compile_fx(gm, example_inputs, config_patches=graph_patches)
        except partition.OverBudget as e:  # the budget alone keeps less: compile the original
            fewbit.notes.append(str(e))
            return compile_original()
        except Exception as e:  # noqa: BLE001 - fall back loudly, never break the model
            if strict or _compat.is_dynamo_control_flow(e):
                raise
            warnings.warn(f"fewbit backend: rewrite failed ({type(e).__name__}: {e}); this graph "
                          "is compiled by plain Inductor instead", RuntimeWarning, stacklevel=2)
            return compile_original()
        fewbit.plans.append(planned)
        return compiled

    fewbit.plans = []  # one list of Planned per compiled graph, for inspection and tests
    fewbit.notes = []  # why a graph was compiled without the rewrite under a memory budget
    return fewbit


def _matched_budget(gm, original: fx.Graph, example_inputs, planned: list[Planned], patches: dict,
                    memory_budget: float | None) -> dict:
    """Under an activation memory budget b < 1 (the backend's, else the user's global one),
    the Inductor patch that partitions the rewritten graph to save less than b saves on
    the original (fewbit_fx.partition); {} at b = 1, when nothing is rewritten, or when the
    user brought their own partitioner."""
    b = _budget_in_force(memory_budget)
    rewrites = any(p.decision.variant != "kept" and not p.site.inplace for p in planned)
    if b >= 1.0 or not rewrites or not _partitioner_free(patches):
        return {}
    # The trace runs on gm itself (AOTAutograd reads Dynamo's metadata from it: compile id,
    # parameter sources, hence which inputs are parameters) holding a copy of its graph.
    working = gm.graph
    gm.graph = _snapshot(original)
    try:
        target = partition.budget_alone(gm, example_inputs, b)
    finally:
        gm.graph = working
        gm.recompile()
    if target is None:
        return {}
    return {"custom_partitioner_fn": partition.matched_partitioner(b, target)}


def _budget_in_force(memory_budget: float | None) -> float:
    """The backend's budget, else the user's global activation_memory_budget."""
    from torch._functorch import config

    return config.activation_memory_budget if memory_budget is None else float(memory_budget)


def _partitioner_free(patches: dict) -> bool:
    """Whether the backend may install its own partitioner: the hooks exist and the user set
    none (in the backend's options or Inductor's global config: theirs stands)."""
    from torch._inductor import config as inductor_config

    return (_compat.partitioner_hooks_available() and "custom_partitioner_fn" not in patches
            and inductor_config.custom_partitioner_fn is None)


GATED = ("; at memory_budget 1 the partitioner is asked to recompute that product in backward too "
         "(it would save it for the next layer's weight gradient besides both factors), where that "
         "keeps less")


def _gated_products(gm, planned: list[Planned], patches: dict, memory_budget: float | None) -> dict:
    """At budget 1 (the backend's, else the user's global one), the Inductor patch that has
    the partitioner recompute the products of gated MLPs, h = act(gate) * up, instead of
    saving them beside gate and up (fewbit_fx.partition.gated_recompute), and a note on
    those sites' (kept) decisions; {} if there are none or the user brought a partitioner
    (in the backend's options or Inductor's global config).
    Under b < 1 the budget recomputes them already (tests/test_gated_mlp.py)."""
    from fewbit_fx.passes import saves

    if _budget_in_force(memory_budget) < 1.0 or not _partitioner_free(patches):
        return {}
    gs = None
    products, sites = set(), []
    for p in planned:
        if p.decision.variant != "kept" or p.site.checkpointed or p.site.output.graph is not gm.graph:
            continue
        if gs is None:
            gs = saves.analyse_graph(gm.graph)
        keepers = saves.recomputed_by(p.site, gs)  # the analysis the decision used
        if keepers:
            products |= {k.name for k in keepers}
            sites.append(p)
    for p in sites:
        p.decision = replace(p.decision, reason=p.decision.reason + GATED)
    return {"custom_partitioner_fn": partition.gated_recompute(tuple(products))} if products else {}


def _snapshot(graph: fx.Graph) -> fx.Graph:
    """A copy of the graph to fall back to, with what deepcopy drops: Dynamo keeps each
    placeholder's source as a node attribute (`_dynamo_source`) that AOTAutograd reads."""
    snapshot = copy.deepcopy(graph)
    for old, new in zip(graph.nodes, snapshot.nodes):
        for k, v in vars(old).items():
            if k not in vars(new):
                setattr(new, k, v)
    return snapshot


def fewbit_backend(gm: fx.GraphModule, example_inputs):
    """Entry point for backend="fewbit" (default settings)."""
    return backend()(gm, example_inputs)


def plan_graph(gm: fx.GraphModule, mode: str, bits: int,
               overrides: dict[str, str] | None, norms: bool = False) -> list[Planned]:
    """`norms`: norm sites too, where this compile can trace their data-dependent sizes."""
    norms = norms and _compat.dynamic_output_shapes_possible()
    return plan_graphs([gm], mode, bits, overrides, compiled=True, norms_in_graph=norms)


def rewrite_graph(gm: fx.GraphModule, planned: list[Planned]) -> int:
    """Replace each chosen site's nodes by the custom op; returns how many were rewritten.
    An inverted norm's side tensor has a data-dependent size: inserting one allows such
    sizes in the compile under way (_compat.allow_dynamic_output_shapes)."""
    count = 0
    replaced: dict[fx.Node, fx.Node] = {}  # a rewritten site's output -> its new y
    for p in planned:
        if p.decision.variant == "kept" or p.site.inplace:
            continue
        site, act = p.site, p.site.activation
        x = replaced.get(site.input, site.input)  # its input may be an earlier site's output
        graph = gm.graph
        with graph.inserting_before(site.output.next):  # keeps insertion order
            if isinstance(act, Norm):
                _compat.allow_dynamic_output_shapes()
                o = act.operands
                call = graph.call_function(
                    torch.ops.fewbit_fx.inverted_norm_forward.default,
                    (x, act.name, list(o.normalized_shape), o.weight, o.bias, o.eps, False))
            elif p.decision.variant == "inverted":
                call = graph.call_function(
                    torch.ops.fewbit_fx.inverted_forward.default, (x, act.name, act.param_list))
            else:
                borders, levels = _table_nodes(graph, site, p.decision.bits)
                call = graph.call_function(
                    torch.ops.fewbit_fx.fewbit_forward.default,
                    (x, act.name, act.param_list, borders, levels, p.decision.bits))
            y = graph.call_function(operator.getitem, (call, 0))
        y.meta.update(site.output.meta)
        site.output.replace_all_uses_with(y)
        replaced[site.output] = y
        for node in reversed(site.nodes):
            if not node.users:
                graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


def _table_nodes(graph: fx.Graph, site, bits: int) -> tuple[fx.Node, fx.Node]:
    """The table as constant tensors built in the graph. (Buffers added to Dynamo's graph
    module are rejected by AOTAutograd, which expects every attribute to have a source.)"""
    from fewbit_fx.passes.capture import example_value
    from fewbit_fx.tables import optimal_table

    table = optimal_table(site.activation, bits)
    device = example_value(site.input).device
    return tuple(
        graph.call_function(torch.tensor, (t.float().tolist(),), {"dtype": torch.float32, "device": device})
        for t in (table.borders, table.levels)
    )


def register() -> None:
    """Make backend="fewbit" resolve after `import fewbit_fx`. When the package is
    installed, its `torch_dynamo_backends` entry point already does (Dynamo reads entry
    points on a lookup miss), and importing Dynamo here would cost a second at import;
    otherwise (the package on sys.path, not installed) register it now."""
    import importlib.metadata

    try:
        points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    except Exception:  # noqa: BLE001 - broken metadata: register directly
        points = ()
    if any(p.name == "fewbit" and p.value == f"{__name__}:fewbit_backend" for p in points):
        return
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "fewbit" not in _BACKENDS:
        register_backend(name="fewbit")(fewbit_backend)
