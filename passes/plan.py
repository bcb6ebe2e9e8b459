"""Plan: sites -> saves -> decisions for a list of captured graphs (eager capture or the
compiler's graph), including one variant per module that several sites share."""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import fx, nn

from fewbit_fx.passes import capture, decide, detect, norms, saves


@dataclass
class Planned:
    """One site with what it keeps now and what was decided for it."""

    site: detect.Site
    saves: saves.SiteSaves
    decision: decide.Decision


NORM_IN_REGION = ("inside an activation-checkpointed region: norms are rewritten only outside "
                  "them (their saved tensors live only while the region is recomputed)")
RECOMPUTED = ("inside an activation-checkpointed region: torch.compile recomputes the region "
              "in backward and saves nothing of it")


def plan_graphs(graphs: list[fx.GraphModule], mode: str, bits: int,
                overrides: dict[str, str] | None, compiled: bool = False,
                links: dict | None = None, model: nn.Module | None = None,
                norms_in_graph: bool = False) -> list[Planned]:
    """`compiled`: plan for torch.compile's partitioner instead of eager autograd.

    Sites inside activation-checkpointed regions are planned on the region's own graph.
    Eager, the region's saved tensors live while backward recomputes it, so a rewrite can
    lower the step's peak (decide); compiled, the partitioner recomputes the whole region
    and saves none of it, so such sites are kept. `links` (capture.Capture.links): where
    values a graph returns go in later graphs, so that a consumer across a graph break is
    seen; without it a returned value counts as kept and possibly modified elsewhere.
    `model` (eager captures): its norm modules are sites too (passes/norms).
    `norms_in_graph` (the compiler's graphs): the norms found in the graphs themselves are.
    """
    graphs, bodies = capture.with_checkpointed_regions(graphs)
    graph_saves = [saves.analyse_graph(gm.graph) for gm in graphs]
    later = saves.LaterGraphs(links or {}, {gm.graph: gs for gm, gs in zip(graphs, graph_saves)})
    planned = []
    sites = detect.find_sites(graphs, bodies)
    if model is not None and not compiled:
        sites += norms.find_norm_sites(graphs, model)
    if norms_in_graph and compiled:
        sites += norms.find_compiled_norm_sites(graphs)
    for site in sites:
        if isinstance(site.activation, norms.Norm) and site.graph_index in bodies:
            site.checkpointed = True
            sv = saves.analyse_site(site, graph_saves[site.graph_index], compiled, later)
            planned.append(Planned(site, sv, decide.Decision("kept", None, sv.saved_before, NORM_IN_REGION)))
            continue
        sv = saves.analyse_site(site, graph_saves[site.graph_index], compiled, later)
        if compiled and site.checkpointed:
            planned.append(Planned(site, replace(sv, saved_before=0),
                                   decide.Decision("kept", None, 0, RECOMPUTED)))
            continue
        d = decide.decide(site, sv, *decide.site_mode(site, mode, bits, overrides))
        if site.inline_formula and not compiled:
            d = _inline_formula_kept(site, sv, d)
        planned.append(Planned(site, sv, d))
    return _agree_per_key(planned)


def _inline_formula_kept(site: detect.Site, sv: saves.SiteSaves, d: decide.Decision) -> decide.Decision:
    """Eager rewrites swap modules and dispatch calls; a formula written inside a bigger
    forward is neither, so it stays as written, and the reason says what it would save in
    a module of its own. (The compiler backend rewrites it in the graph.)"""
    c = detect.call_site(site.output)
    where = f" in {c.function}() at {c.filename.rsplit('/', 1)[-1]}:{c.lineno}" if c else ""
    why = "".join(f"{note}; " for note in site.notes)
    if d.variant == "kept":
        gain = f" ({d.reason})"
    else:
        gain = (f"; as its own nn.Module (whose forward is just the formula) it would be {d.label}, "
                f"keeping {d.saved_after} B instead of {sv.saved_before} B")
    return decide.Decision("kept", None, sv.saved_before,
                           f"{why}{site.kind} written inline{where}: only a module whose whole "
                           f"forward is the formula can be swapped{gain}")


def _agree_per_key(planned: list[Planned]) -> list[Planned]:
    """A module called at several sites (or one source call that ran several times) gets one
    variant for all of them, since one swap serves every call: the variant with the least
    total that every site accepts, or kept everywhere. (A variant one site must refuse, such
    as inverted where that call's output is modified in place, cannot serve the others.)"""
    groups: dict[tuple, list[Planned]] = {}
    for p in planned:
        groups.setdefault(p.site.rewrite_key, []).append(p)
    out = []
    for group in groups.values():
        if len({p.decision.label for p in group}) == 1:
            out += group
            continue
        options = [[decide.decide(p.site, p.saves, "keep", 3) for p in group]]
        for p0 in group:
            forced = _mode_for(p0.decision)
            ds = [decide.decide(p.site, p.saves, *forced, forced=True) for p in group]
            if len({d.label for d in ds}) == 1:
                options.append(ds)
        best = min(options, key=lambda ds: sum(d.saved_after for d in ds))
        if best is options[0]:
            best = [decide.Decision("kept", None, d.saved_after,
                                    "called at several sites that need different variants; one "
                                    "module serves them all, so it stays as it is") for d in best]
        out += [Planned(p.site, p.saves, d) for p, d in zip(group, best)]
    return out


def _mode_for(d: decide.Decision) -> tuple[str, int]:
    if d.variant == "inverted":
        return "exact", 3
    if d.variant == "fewbit":
        return "fewbit", d.bits
    return "keep", 3
