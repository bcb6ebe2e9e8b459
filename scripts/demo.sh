#!/usr/bin/env bash
# The README's demo command: install, then optimize GPT-2 (real architecture, random
# weights, nothing downloaded) and print the per-site report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m fewbit_fx demo gpt2 --scale base "$@"
