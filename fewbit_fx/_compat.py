"""The private torch APIs fewbit-fx relies on, in one place, each with its guard.

fewbit-fx is tested on torch 2.13 only (the one release that installs on the project's
machines); `TESTED_TORCH` is that floor, and the package declares it. Everything that
reaches into `torch._dynamo`, `torch._functorch` or `torch._inductor` for analysis goes
through here, so a torch upgrade that moves one of them breaks in one file, with a message.
"""
from __future__ import annotations

import contextlib
import re
import types

import torch

TESTED_TORCH = (2, 13)


def torch_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def check_torch() -> None:
    """Refuse a torch older than the tested floor with the fix, instead of failing later
    inside a private API."""
    if torch_version() < TESTED_TORCH:
        raise ImportError(
            f"fewbit-fx needs torch>={TESTED_TORCH[0]}.{TESTED_TORCH[1]} (found {torch.__version__}); "
            f"upgrade with: pip install 'torch>={TESTED_TORCH[0]}.{TESTED_TORCH[1]}'")


def _eval_frame():
    return torch._dynamo.eval_frame  # noqa: SLF001 - guarded by check_torch


def _cache_entry_count(code: types.CodeType) -> int:
    ef = _eval_frame()
    if hasattr(ef, "_get_total_cache_entry_count"):
        return ef._get_total_cache_entry_count(code)
    return len(ef._debug_get_cache_entry_list(code))


def _seen_codes() -> list[types.CodeType]:
    """Every code object Dynamo has looked at in this process (weakly held by Dynamo)."""
    from torch._dynamo import convert_frame

    codes = (ref() for ref in list(convert_frame.input_codes.seen))
    return [c for c in codes if c is not None]


@contextlib.contextmanager
def dynamo_leaves_no_trace():
    """Run Dynamo compilations that leave nothing behind in the user's process.

    Every torch.compile adds cache entries to the code objects it traced (the model
    class's forward, graph-break resume functions, ...). Left there, they count against
    `recompile_limit`, so after eight analyses of one class the user's own compile of it
    silently runs eagerly. Afterwards, entries are dropped from every code object that had
    none before; where the user's own compile already had entries (which must survive),
    ours stay, but in an isolated region (see `compile_isolated`) that the user's compile
    neither counts nor runs. The backends this run registered are released too.
    """
    ef = _eval_frame()
    before = {id(c): _cache_entry_count(c) for c in _seen_codes()}
    backends = set(getattr(ef, "cached_backends", {}))
    try:
        yield
    finally:
        for code in _seen_codes():
            if before.get(id(code), 0) == 0 and _cache_entry_count(code) > 0:
                ef.reset_code(code)
        cached = getattr(ef, "cached_backends", None)
        if cached is not None:
            for key in set(cached) - backends:
                cached.pop(key, None)


def compile_isolated(fn, backend, **kwargs):
    """torch.compile whose cache entries stay apart from the user's own compiles of the
    same code (torch >= 2.13: `isolate_recompiles`)."""
    try:
        return torch.compile(fn, backend=backend, isolate_recompiles=True, **kwargs)
    except TypeError:  # an older torch without the argument
        return torch.compile(fn, backend=backend, **kwargs)


def capture_config():
    """Dynamo settings for an analysis trace: no recompile limit in the way of tracing a
    model whose class was traced before. (torch >= 2.13 always inlines modules, so every
    node's `nn_module_stack` is keyed by the id of the module object that ran it.)"""
    return torch._dynamo.config.patch(  # noqa: SLF001
        recompile_limit=10**6, accumulated_recompile_limit=10**6,
        optimize_ddp=False)  # DDP's graph splitting at bucket bounds would hide consumers


def size_hint(n, unbacked: int = 8192) -> int:
    """An int for a size that may be symbolic (a SymInt under dynamic shapes), without
    adding a guard: sizes here only feed estimates and messages. `unbacked`: the guess for
    a data-dependent size (torch's own default; clamped to the size's known range)."""
    if isinstance(n, int):
        return n
    from torch.fx.experimental import symbolic_shapes

    hint = getattr(symbolic_shapes, "optimization_hint", None)  # torch 2.13
    if hint is not None:
        return hint(n, fallback=unbacked)
    return symbolic_shapes.hint_int(n)  # older releases


def decompositions_changed() -> None:
    """Inductor caches its decomposition table on first use; drop that cache so that
    decompositions registered later (fewbit_fx.ops.inductor) take effect."""
    from torch._inductor import decomposition

    cached = getattr(decomposition, "fast_random_decomps", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def is_dynamo_control_flow(e: BaseException) -> bool:
    """Dynamo raises some exceptions through a backend to steer its own tracing (restart
    the analysis with a scalar tensorified, ...): a backend must let them through, not
    treat them as a failure and fall back."""
    restart = getattr(getattr(torch._dynamo, "exc", None), "RestartAnalysis", None)  # noqa: SLF001
    return restart is not None and isinstance(e, restart)


def budget_patch(memory_budget: float | None):
    """A context factory setting torch.compile's activation memory budget for one compile
    (torch._functorch.config.activation_memory_budget, read by the min-cut partitioner),
    restored afterwards so the user's process keeps its own setting. None: no change."""
    import contextlib

    if memory_budget is None:
        return contextlib.nullcontext
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
            or not 0.0 <= float(memory_budget) <= 1.0:
        raise ValueError(f"fewbit-fx: memory_budget must be a number in [0, 1] (1.0: the partitioner's "
                         f"default, 0.0: recompute everything it can), got {memory_budget!r}")
    from torch._functorch import config

    return lambda: config.patch(activation_memory_budget=float(memory_budget))


def custom_partitioner_base() -> type:
    """Inductor's interface for `config.custom_partitioner_fn` (torch >= 2.6)."""
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    return CustomPartitionerFn


def min_cut_partition(joint, joint_inputs, **kwargs):
    """The stock min-cut partitioner, as Inductor calls it (after its joint-graph passes)."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)


def inductor_partition(joint, joint_inputs, **kwargs):
    """Inductor's partition step: its joint-graph passes, then the stock partitioner."""
    from torch._inductor.compile_fx import partition_fn

    kwargs.pop("compiler", None)
    return partition_fn(joint, joint_inputs, **kwargs)


def trace_joint_only(gm, example_inputs, partition) -> None:
    """Trace gm's joint graph as Inductor would (its decompositions) and hand it to
    `partition`, generating no code: the forward and backward are run uncompiled."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    aot_module_simplified(gm, list(example_inputs), fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g,
                          partition_fn=partition, decompositions=select_decomp_table())


def partitioner_hooks_available() -> bool:
    """Whether the budget-matched partitioner's hooks exist in this torch."""
    try:
        from torch._functorch.aot_autograd import aot_module_simplified  # noqa: F401
        from torch._inductor import config
        from torch._inductor.compile_fx import partition_fn  # noqa: F401
        from torch._inductor.custom_graph_pass import CustomPartitionerFn  # noqa: F401
    except ImportError:
        return False
    return hasattr(config, "custom_partitioner_fn")


def _tracing_shape_env():
    """The ShapeEnv of the compile under way (Dynamo's, which AOTAutograd traces with), or None."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    mode = getattr(ctx, "fake_mode", None) if ctx is not None else None
    return getattr(mode, "shape_env", None)


def dynamic_output_shapes_possible() -> bool:
    """Whether the compile under way can trace ops with data-dependent output sizes (the
    inverted norm's side tensor) once allow_dynamic_output_shapes() allows them: Dynamo allows
    them only under fullgraph=True, yet the backend's graph is past Dynamo, and AOTAutograd
    and Inductor support them (unbacked sizes) either way."""
    env = _tracing_shape_env()
    return env is not None and hasattr(env, "settings") and hasattr(env.settings, "allow_dynamic_output_shape_ops")


def allow_dynamic_output_shapes() -> None:
    """Allow data-dependent output sizes in the compile under way. Left on: the backward
    graph is compiled later, at the first backward, with the same ShapeEnv (under a memory
    budget the partitioner may recompute the nonzero there). The ShapeEnv belongs to this
    one frame's compile; Dynamo's tracing of the frame is over, and other frames and
    recompiles get their own."""
    import dataclasses

    env = _tracing_shape_env() if dynamic_output_shapes_possible() else None
    if env is not None and not env.settings.allow_dynamic_output_shape_ops:
        env.settings = dataclasses.replace(env.settings, allow_dynamic_output_shape_ops=True)
