#!/usr/bin/env bash
# Install everything the tests need, then run them (CPU only; GPU tests are skipped with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
bash scripts/install.sh dev
.venv/bin/python -m pytest -q "$@"
