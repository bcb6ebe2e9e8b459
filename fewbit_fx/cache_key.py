"""Inductor's cache key must see our implementation, not only the graph.

A graph holds calls to fewbit_fx ops; what they lower to (decompositions, packing, inverse,
tables) is our code, which Inductor's and AOTAutograd's cache keys do not hash. A no-op
post-grad pass whose uuid hashes that code joins the key, so a warm cache never serves
kernels built from an older implementation (observed: it did, before this).

Inductor is imported only when a key is first needed (`ImplementationKey` is built on
first access), so `import fewbit_fx` stays cheap.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import fx


@functools.lru_cache(maxsize=None)
def _key_class() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class ImplementationKey(CustomGraphPass):
        """No-op post-grad pass carrying the implementation hash. A pass the user
        configured still runs, and its uuid joins ours."""

        def __init__(self, user_pass=None):
            self.user_pass = user_pass

        def __call__(self, graph: fx.Graph) -> None:
            if self.user_pass is not None:
                self.user_pass(graph)

        def uuid(self):
            user = self.user_pass.uuid() if hasattr(self.user_pass, "uuid") else None
            return (implementation_hash(), user)

    ImplementationKey.__module__ = __name__
    return ImplementationKey


def __getattr__(name: str):
    if name == "ImplementationKey":
        return _key_class()
    raise AttributeError(name)


@functools.lru_cache(maxsize=None)
def implementation_hash() -> str:
    from torch._inductor.custom_graph_pass import get_hash_for_files

    root = Path(__file__).parent
    files = sorted(str(p) for p in [*root.glob("ops/*.py"), *root.glob("activations/*.py"),
                                    root / "packing.py", root / "inverse.py", root / "tables.py",
                                    root / "partition.py"])
    return get_hash_for_files(tuple(files)).hex()


def with_cache_key(options: dict) -> dict:
    """Inductor config patches with our key wrapped around any pass they already set."""
    options["post_grad_custom_post_pass"] = _key_class()(options.get("post_grad_custom_post_pass"))
    return options


def install() -> None:
    """Put the key into Inductor's global config, so plain torch.compile of a model that
    calls our ops (after `optimize`, or with nn.FewBit) is cache-correct too. Only fills an
    empty slot: a pass the user set is left alone (one without a uuid disables Inductor's
    cache anyway, and wrapping it would hide that)."""
    import torch._inductor.config as config

    if config.post_grad_custom_post_pass is None:
        config.post_grad_custom_post_pass = _key_class()()
