#!/usr/bin/env bash
# Install fewbit-fx for development on a CPU machine. torch is pinned to the local CPU
# wheel here (any other version pulls CUDA packages); the package itself needs torch>=2.6.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[dev,hf]" "torch==2.13.0"
