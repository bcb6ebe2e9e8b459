"""report(..., compiled=True): per site, what torch.compile saves for backward under its
default and under the fewbit backend, read from the partitioned graphs themselves.

A recording partitioner wraps the default min-cut partitioner. The backward graph's inputs
(less the incoming gradients) are exactly what the forward saves; each saved value is
traced back to the Dynamo nodes it came from (`from_node` provenance) and so to a site.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from fewbit_fx import _compat, partition
from fewbit_fx.example_inputs import normalise
from fewbit_fx.measure import measure_step, scalar_loss
from fewbit_fx.compile_backend import plan_graph, rewrite_graph
from fewbit_fx.ops import inductor
from fewbit_fx.passes import saves
from fewbit_fx.passes.capture import innermost_module
from fewbit_fx.passes.detect import unrecognised_activations
from fewbit_fx.reporting import Report, Row


class RecordingPartitioner(CustomPartitionerFn):
    """Calls the default partitioner and records (bytes, provenance) of each saved value,
    one list per compiled graph."""

    def __init__(self):
        self.graphs: list[list[tuple[int, set[str], str | None]]] = []

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs):
        fw, bw = _compat.min_cut_partition(gm, joint_inputs, **kwargs)
        self.graphs.append([(nbytes, _provenance(src), _module_path(src))
                            for src, nbytes in partition.saved_activations(fw, bw)])
        return fw, bw

    def uuid(self):
        return None  # never cached: the recording must run on every compile


def _module_path(node: fx.Node) -> str | None:
    scope = innermost_module(node)
    return scope[0] if scope else None


def _provenance(node: fx.Node, depth: int = 4) -> set[str]:
    """Dynamo node names a value came from. A value the partitioner or a decomposition made
    (a permuted y, a view) has none of its own: it inherits its inputs'."""
    names, todo = set(), list(node.meta.get("from_node", []))
    while todo:
        src = todo.pop()
        names.add(src.name)
        todo.extend(getattr(src, "from_node", []) or [])
    if not names and depth > 0:
        for arg in node.all_input_nodes:
            names |= _provenance(arg, depth - 1)
    return names


def compiled_report(model: nn.Module, *, example_inputs=None, example_kwargs=None,
                    mode: str = "auto", bits: int = 3, overrides=None, norms: bool = False) -> Report:
    from torch._inductor.compile_fx import compile_fx

    args, kwargs = normalise(example_inputs, example_kwargs)
    default_rec, fewbit_rec = RecordingPartitioner(), RecordingPartitioner()
    plans: list[list] = []
    site_names: list[dict[str, set[str]]] = []
    unrecognised: list[str] = []

    def default_backend(gm, ex):
        return compile_fx(gm, ex, config_patches=_no_cache(default_rec))

    def fewbit_backend(gm, ex):
        # before compile_fx picks its decomposition table: the op's fake would register
        # them mid-trace, too late for this graph (Inductor then fails: "both a fallback
        # and a decomp")
        inductor.register()
        planned = plan_graph(gm, mode, bits, overrides, norms)
        unrecognised.extend(n for n in unrecognised_activations([gm], [p.site for p in planned])
                            if n not in unrecognised)
        analysed = {}  # per graph: a site may sit in a checkpointed region's own graph
        for p in planned:
            g = p.site.output.graph
            if g not in analysed:
                analysed[g] = saves.analyse_graph(g)
        names = {p.site.name: _site_names(p.site, analysed[p.site.output.graph]) for p in planned}
        before = {n.name for n in gm.graph.nodes}
        rewrite_graph(gm, planned)
        for p in planned:  # the rewrite's new nodes belong to the site they replaced
            names[p.site.name] |= _new_nodes_after(gm, p, before)
        plans.append(planned)
        site_names.append(names)
        return compile_fx(gm, ex, config_patches=_no_cache(fewbit_rec))

    measured = []
    with _compat.dynamo_leaves_no_trace():
        for backend in (default_backend, fewbit_backend):
            # A cache hit would skip partitioning, and with it the recording.
            with torch._functorch.config.patch(enable_autograd_cache=False):
                measured.append(_measure_compiled(model, backend, args, kwargs))

    rows = []
    for gi, planned in enumerate(plans):
        for p in planned:
            names = site_names[gi][p.site.name]
            before = _bytes_from(default_rec, gi, names, p.site.module_path)
            after = _bytes_from(fewbit_rec, gi, names, p.site.module_path)
            v = p.site.output.meta.get("example_value")
            rows.append(Row(p.site.name, p.site.kind, p.decision.label, p.decision.reason,
                            tuple(v.shape), str(v.dtype).replace("torch.", ""), before, after,
                            p.site.checkpointed))
    rep = Report(rows, mode, bits, measured_before=measured[0], measured_after=measured[1])
    rep.notes.append("compiled: 'before' is torch.compile's default, 'after' the fewbit backend, "
                     "both read from the partitioned graphs (backward-graph inputs)")
    rep.notes += unrecognised
    return rep


def _no_cache(partitioner) -> dict:
    from fewbit_fx.cache_key import with_cache_key

    return with_cache_key({"custom_partitioner_fn": partitioner, "fx_graph_cache": False})


def _measure_compiled(model: nn.Module, backend, args: tuple, kwargs: dict) -> int:
    """Saved bytes of a warm compiled training step of a copy of `model`."""
    m = copy.deepcopy(model)
    cm = _compat.compile_isolated(m, backend, dynamic=False)  # static, whatever was compiled before
    scalar_loss(cm(*args, **kwargs)).backward()  # compile first: measure a warm step
    return measure_step(cm, args, kwargs)


def _site_names(site, gs) -> set[str]:
    """The site's nodes, its input and output, and their views (same storage family)."""
    names = {n.name for n in site.nodes}
    for root in (gs.family[site.input], gs.family[site.output]):
        names |= {m.name for m in gs.members(root)}
    return names


def _new_nodes_after(gm: fx.GraphModule, p, before: set[str]) -> set[str]:
    """Nodes the rewrite added for this site: the op call, its getitem and table constants."""
    out = set()
    for n in gm.graph.nodes:
        if n.name in before:
            continue
        if n.op == "call_function" and n.args and n.args[0] is p.site.input:
            out.add(n.name)
            out |= {u.name for u in n.users}
            out |= {a.name for a in n.all_input_nodes if a.name not in before}
    return out


def _bytes_from(rec: RecordingPartitioner, gi: int, names: set[str], module: str | None) -> int:
    """Bytes saved for a site: values traced back to its nodes, or made inside its module."""
    if gi >= len(rec.graphs):
        return 0
    return sum(b for b, prov, path in rec.graphs[gi]
               if prov & names or (module is not None and path == module))
