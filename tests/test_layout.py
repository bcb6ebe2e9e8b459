"""Package layout promises: the runtime never imports the evidence code, and the passes'
imports run one way (model -> capture -> sites -> decisions -> rewrite/report)."""
import subprocess
import sys
import textwrap


def test_the_runtime_imports_no_evidence_code():
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        import fewbit_fx
        m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        x = torch.randn(4, 8)
        fewbit_fx.report(m, example_inputs=(x,))
        fewbit_fx.optimize(m, example_inputs=(x,))
        m(x).sum().backward()
        torch.compile(nn.Sequential(nn.Linear(8, 16), nn.GELU()), backend="fewbit")(x).sum().backward()
        loaded = sorted(n for n in sys.modules if n.startswith("fewbit_fx.evidence"))
        print(loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _module_level_imports() -> dict[str, set[str]]:
    """fewbit_fx's modules -> the fewbit_fx modules they import at module level (imports
    inside functions are the deliberate, lazy ones; the package facade is left out)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    files = {}
    for base, pkg in ((root / "fewbit_fx", "fewbit_fx"), (root / "passes", "fewbit_fx.passes")):
        for f in base.rglob("*.py"):
            parts = [p for p in f.relative_to(base).with_suffix("").parts if p != "__init__"]
            files[".".join([pkg, *parts])] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d not in (name, "fewbit_fx")}
    return graph


def test_imports_run_one_way():
    graph = _module_level_imports()
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_import_is_cheap_and_plain_compile_still_fuses_the_ops():
    """`import fewbit_fx` does not import Inductor (seconds); the first trace registers the
    ops' decompositions, so a plain torch.compile of FewBit/Inverted still fuses them."""
    code = textwrap.dedent("""
        import sys, torch
        import fewbit_fx
        print("inductor imported:", "torch._inductor" in sys.modules)
        from torch._inductor.utils import run_and_get_code
        m = fewbit_fx.nn.Inverted(torch.nn.GELU())
        x = torch.randn(64, 64, requires_grad=True)
        _, code = run_and_get_code(torch.compile(lambda t: m(t).sum()), x)
        print("extern op calls:", sum("fewbit_fx.inverted_forward" in c for c in code))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "inductor imported: False" in lines
    assert "extern op calls: 0" in lines
