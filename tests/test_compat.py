"""fewbit_fx._compat: the one home of private torch APIs and the tested torch floor."""
import pytest
import torch

from fewbit_fx import _compat


def test_an_older_torch_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    with pytest.raises(ImportError, match=r"torch>=2\.13.*pip install"):
        _compat.check_torch()
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    _compat.check_torch()


def test_the_declared_floor_is_the_tested_one():
    import pathlib
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    floor = f"torch>={_compat.TESTED_TORCH[0]}.{_compat.TESTED_TORCH[1]}"
    assert floor in project["project"]["dependencies"]


def test_leaving_no_trace_removes_only_new_cache_entries():
    import torch._dynamo.eval_frame as ef

    def users(x):
        return x.sin() + 1

    def ours(x):
        return x.cos() * 2

    user = torch.compile(users, backend="eager")
    user(torch.randn(3))
    with _compat.dynamo_leaves_no_trace():
        _compat.compile_isolated(ours, "eager")(torch.randn(3))
        _compat.compile_isolated(users, "eager")(torch.randn(3))
        assert len(ef._debug_get_cache_entry_list(ours)) == 1
    assert len(ef._debug_get_cache_entry_list(ours)) == 0
    assert len(ef._debug_get_cache_entry_list(users)) >= 1  # the user's entry survives


def test_size_hint_of_a_symbolic_size():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(_compat.size_hint(t.numel()) for t in example_inputs if isinstance(t, torch.Tensor))
        return gm.forward

    torch.compile(lambda t: t.sin(), backend=backend, dynamic=True)(torch.randn(3, 5))
    torch._dynamo.reset()
    assert 15 in seen and all(isinstance(n, int) for n in seen)
