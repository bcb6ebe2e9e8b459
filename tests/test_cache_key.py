"""fewbit_fx.cache_key: plain torch.compile keys its caches on our implementation."""
import uuid

import torch
from torch._dynamo.utils import counters

import fewbit_fx
from fewbit_fx import cache_key


def _compile_inverted_gelu(x):
    torch._dynamo.reset()
    fn = torch.compile(lambda t: fewbit_fx.nn.Inverted(torch.nn.GELU())(t).sum())
    fn(x).backward()


def test_first_compile_installs_the_key_in_the_global_config():
    _compile_inverted_gelu(torch.randn(8, requires_grad=True))
    key = torch._inductor.config.post_grad_custom_post_pass
    assert isinstance(key, cache_key.ImplementationKey)
    assert key.uuid()[0] == cache_key.implementation_hash()


def test_a_changed_implementation_misses_the_warm_cache(monkeypatch):
    x = torch.randn(64, requires_grad=True)
    with torch._inductor.config.patch(fx_graph_cache=True):
        _compile_inverted_gelu(x)           # fills the cache (or hits it)
        counters.clear()
        _compile_inverted_gelu(x)
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1
        assert counters["inductor"]["fxgraph_cache_miss"] == 0
        # The same graph, but our decompositions "changed" (to a version never seen
        # before, so not in the disk cache either): Inductor must compile afresh.
        version = uuid.uuid4().hex
        monkeypatch.setattr(cache_key, "implementation_hash", lambda: version)
        counters.clear()
        _compile_inverted_gelu(x)
        assert counters["inductor"]["fxgraph_cache_miss"] >= 1


def test_a_pass_the_user_set_is_left_alone():
    mine = object()
    # config.patch, not monkeypatch: pytest >= 9.2 restores module attributes with delattr,
    # which hides a torch config entry for good.
    with torch._inductor.config.patch(post_grad_custom_post_pass=mine):
        cache_key.install()
        assert torch._inductor.config.post_grad_custom_post_pass is mine
    assert isinstance(torch._inductor.config.post_grad_custom_post_pass, cache_key.ImplementationKey)
