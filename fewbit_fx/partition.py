"""Budget-matched partitioning: torch.compile's activation memory budget, composed with
the rewrite so that the result never keeps more than the budget alone would.

The min-cut partitioner reads `activation_memory_budget` b as a fraction of a range
measured on the graph it is given: from what the graph's inputs weigh (parameters
included) to what its default plan saves. A rewritten graph's default plan already saves
less, so the same b can name a looser target, and the partitioner stops early: on GPT-2
with LoRA adapters, b = 0.5 on the rewritten graph kept 3x what b = 0.5 keeps on the
original, because there the budget alone recomputes every activation from the block
inputs. So under a budget the backend first reads what the budget alone saves on the
original graph (its joint graph partitioned, no code generated), partitions the rewritten
graph at b, and where that keeps no less, compiles the original graph at b instead: never
more memory than the budget alone, and the rewrite only where it saves.

The hooks are Inductor's `custom_partitioner_fn` and AOTAutograd's `aot_module_simplified`
(fewbit_fx._compat); without them, the rewritten graph gets the stock partitioner at b.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import fx


def saved_activations(fw: fx.GraphModule, bw: fx.GraphModule) -> list[tuple[fx.Node, int]]:
    """The forward nodes whose values the backward takes, with their bytes: the backward's
    inputs other than gradients (tangents) and the graph's own inputs (parameters, which
    the bench excludes too, and the caller's tensors, which any plan keeps alike)."""
    from fewbit_fx._compat import size_hint

    fw_nodes = {n.name: n for n in fw.graph.nodes}
    saved = []
    storages = set()  # views of one tensor (y and y.view(-1, d) for a matmul) count once
    for p in bw.graph.find_nodes(op="placeholder"):
        src = fw_nodes.get(p.name)
        if p.name.startswith("tangents") or src is None or src.op == "placeholder":
            continue
        val = src.meta.get("val")
        if isinstance(val, torch.Tensor):
            key = _storage_key(val)
            if key is not None and key in storages:
                continue
            storages.add(key)
            saved.append((src, _storage_bytes(val)))
    return saved


def _storage_bytes(val: torch.Tensor) -> int:
    """The bytes of the value's storage. A data-dependent size counts as its smallest: the
    inverted norm's side tensor holds the channels y cannot tell, usually none (torch's
    fallback guess would count it as all of x, and the plan as no better than the original)."""
    from fewbit_fx._compat import size_hint

    try:
        return size_hint(val.untyped_storage().nbytes(), unbacked=0)
    except Exception:  # noqa: BLE001 - no storage to read: the value's own size
        return size_hint(val.numel(), unbacked=0) * val.element_size()


def _storage_key(val: torch.Tensor):
    """An id shared by the traced values that are views of one tensor, or None."""
    try:
        return torch.multiprocessing.reductions.StorageWeakRef(val.untyped_storage()).cdata
    except Exception:  # noqa: BLE001 - a value without storage: counted on its own
        return None


def saved_size(fw: fx.GraphModule, bw: fx.GraphModule) -> int:
    """Bytes of the activations a partition keeps: the measure the budget is matched on."""
    return sum(n for _, n in saved_activations(fw, bw))


def budget_alone(gm: fx.GraphModule, example_inputs, budget: float) -> int | None:
    """What the stock partitioner at `budget` saves on this (unrewritten) graph, or None
    if it cannot be read (the rewritten graph then gets the stock partitioner too)."""
    from fewbit_fx import _compat

    seen: list[int] = []

    def record(joint, joint_inputs, **kwargs):
        with _compat.budget_patch(budget)():
            fw, bw = _compat.inductor_partition(joint, joint_inputs, **kwargs)
        seen.append(saved_size(fw, bw))
        return fw, bw

    try:
        _compat.trace_joint_only(gm, example_inputs, record)
    except Exception as e:  # noqa: BLE001 - no target: compose without matching
        warnings.warn(f"fewbit backend: could not read what memory_budget={budget} saves without "
                      f"the rewrite ({type(e).__name__}: {e}); the rewritten graph is partitioned "
                      "at that budget as is", RuntimeWarning, stacklevel=3)
        return None
    return seen[0] if seen else None


class OverBudget(Exception):
    """The rewritten graph, partitioned at the budget, would save no less than the budget
    alone saves on the original graph: the backend compiles the original instead (at equal
    bytes the original is the faster of the two: the rewrite only adds backward work)."""


def matched_partitioner(budget: float, target: int):
    """A partitioner for Inductor's `custom_partitioner_fn`: the stock one at `budget`,
    raising OverBudget where its plan would not save less than `target` bytes."""
    return _budget_matched_class()(budget, target)


@functools.lru_cache(maxsize=None)
def _budget_matched_class() -> type:
    """Built on first use (Inductor's base class imports Inductor); kept at module level
    under its own name, so Inductor's cache key can pickle its instances."""
    from fewbit_fx import _compat

    class BudgetMatched(_compat.custom_partitioner_base()):
        def __init__(self, budget: float, target: int):
            self.budget, self.target = budget, target

        def __call__(self, gm, joint_inputs, **kwargs):
            with _compat.budget_patch(self.budget)():
                fw, bw = _compat.min_cut_partition(gm, joint_inputs, **kwargs)
            size = saved_size(fw, bw)
            if size >= self.target and not _has_budget_annotations(gm):
                raise OverBudget(f"at memory_budget={self.budget} the rewritten graph keeps {size} B of "
                                 f"activations, the original {self.target} B: no saving for the "
                                 "rewrite's extra work")
            return fw, bw

        def uuid(self):
            from fewbit_fx.cache_key import implementation_hash

            return (implementation_hash(), "budget-matched", self.budget, self.target)

    BudgetMatched.__module__ = __name__
    BudgetMatched.__qualname__ = "BudgetMatched"
    globals()["BudgetMatched"] = BudgetMatched
    return BudgetMatched


def _has_budget_annotations(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if "memory_budget" in node.meta:
            return True
        custom = node.meta.get("custom")
        if isinstance(custom, dict) and any("memory_budget" in str(k) for k in custom):
            return True
    return False


# --- gated products (issue 16, item 3) ---------------------------------------------------------

def gated_recompute(products: tuple[str, ...]):
    """A partitioner for Inductor's `custom_partitioner_fn` at budget 1: the stock one, but
    with the gated MLPs' products h = act(gate) * up (`products`: their Dynamo node names)
    recomputed in backward instead of saved, where that keeps less.

    At b = 1 the min-cut partitioner saves h for down_proj's weight gradient (a matmul must
    read it, so it bans recomputing it) besides gate and up, which the multiply's backward
    needs: three tensors of the MLP's width where two rebuild all (h = act(gate) * up, one
    pointwise multiply in the backward kernel that already reads them). A budget b < 1
    recomputes h as well (measured at 0.9, 0.7, 0.5); this gets it without the budget's other
    recomputation. Exact: the same ops on the same values."""
    return _gated_recompute_class()(tuple(sorted(products)))


def _dynamo_roots(node: fx.Node) -> set[str]:
    """Names of the Dynamo-graph nodes a joint-graph node came from: the roots of its
    `from_node` provenance (intermediate graphs' names could collide with Dynamo's)."""
    roots, todo = set(), list(node.meta.get("from_node", []))
    while todo:
        src = todo.pop()
        parents = getattr(src, "from_node", None) or []
        if parents:
            todo.extend(parents)
        else:
            roots.add(src.name)
    return roots


def tag_products(joint: fx.GraphModule, products: tuple[str, ...]) -> fx.GraphModule | None:
    """A copy of the joint graph (the original untouched) with the forward nodes that came
    from `products` marked MUST_RECOMPUTE, or None when nothing matched or the graph already
    carries recompute annotations (activation checkpointing: its policy stands)."""
    from torch.utils.checkpoint import CheckpointPolicy

    if any("recompute" in n.meta for n in joint.graph.nodes):
        return None
    graph = fx.Graph()
    out = graph.graph_copy(joint.graph, {})
    graph.output(out)
    wanted, tagged = set(products), 0
    for n in graph.nodes:  # node_copy copied each meta dict: tagging leaves the original as it is
        if n.op != "call_function" or n.meta.get("partitioner_tag") != "is_forward":
            continue
        pointwise = torch.Tag.pointwise in getattr(n.target, "tags", ())
        if not pointwise or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        if _dynamo_roots(n) & wanted:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            tagged += 1
    return fx.GraphModule(joint, graph) if tagged else None


@functools.lru_cache(maxsize=None)
def _gated_recompute_class() -> type:
    from fewbit_fx import _compat

    class GatedRecompute(_compat.custom_partitioner_base()):
        def __init__(self, products: tuple[str, ...]):
            self.products = products

        def __call__(self, gm, joint_inputs, **kwargs):
            tagged = tag_products(gm, self.products)
            if tagged is not None:
                try:
                    fw, bw = _compat.min_cut_partition(tagged, joint_inputs, **kwargs)
                except Exception as e:  # noqa: BLE001 - the stock partition below still stands
                    warnings.warn(f"fewbit backend: recomputing the gated products failed "
                                  f"({type(e).__name__}: {e}); partitioned as is", RuntimeWarning, stacklevel=2)
                    tagged = None
            stock = _compat.min_cut_partition(gm, joint_inputs, **kwargs)
            if tagged is not None and saved_size(fw, bw) < saved_size(*stock):
                return fw, bw
            return stock

        def uuid(self):
            from fewbit_fx.cache_key import implementation_hash

            return (implementation_hash(), "gated-recompute", self.products)

    GatedRecompute.__module__ = __name__
    GatedRecompute.__qualname__ = "GatedRecompute"
    globals()["GatedRecompute"] = GatedRecompute
    return GatedRecompute
