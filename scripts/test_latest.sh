#!/usr/bin/env bash
# The suite against the newest releases of transformers, peft and accelerate (and the
# other unpinned dependencies), in its own virtual environment (.venv-latest), so a
# release that breaks us is seen before a fresh machine sees it. torch stays at the CPU
# wheel (2.13.0). When this passes, move the pins in constraints.txt forward.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-latest
. .venv-latest/bin/activate
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check --upgrade -e ".[dev,hf]" transformers peft accelerate
python -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|peft|accelerate) "
python -m pytest tests -q -p no:cacheprovider "$@"
