#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine (torch + triton preinstalled, no
# network): CUDA kernel tests (1-ulp forward, byte-identical packing), the op micro-benchmark
# with % of measured copy bandwidth, memory/speed/peak (torch.cuda.max_memory_allocated)
# against the baselines, and the compiled per-site report. Results go to $OUT (the device
# tool's folder) or reports/gpu. Missing pure-Python packages (tabulate, hypothesis,
# transformers) must travel as wheels: see the device tool's README (.whl + carry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || echo "editable install failed (see install.log); trying in place" | tee -a "$OUT/install.log"
python3 - <<'PY' | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for m in ("triton", "tabulate", "hypothesis", "transformers", "numpy"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", e)
PY
status=0
python3 -m pytest tests/kernels tests/test_backend.py tests/ops -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" || status=1
python3 -m fewbit_fx bench-ops --device cuda --json "$OUT/ops_cuda.json" 2>&1 | tee "$OUT/ops_cuda.txt" || status=1
python3 -m fewbit_fx bench memory --scale full --device cuda --out "$OUT" 2>&1 | tail -5 || status=1
python3 -m fewbit_fx bench compiled --scale small --out "$OUT" 2>&1 | tail -5 || status=1
echo "gpu checks finished, status $status; results in $OUT"
exit $status
