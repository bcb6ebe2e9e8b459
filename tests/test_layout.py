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
