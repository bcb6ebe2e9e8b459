#!/usr/bin/env bash
# Install fewbit-fx for development on a CPU machine, at the versions in constraints.txt
# (the ones the suite was last run against). torch is the local CPU wheel (2.13.0; any
# other version pulls CUDA packages); the package itself declares torch>=2.13.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,hf]"
