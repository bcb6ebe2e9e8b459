#!/usr/bin/env bash
# The README's test command: install, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest tests -q -p no:cacheprovider "$@"
