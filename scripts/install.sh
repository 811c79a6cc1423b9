#!/usr/bin/env bash
# Create .venv and install melle-rt with the given extras (default: dev).
# torch==2.13.0 first: on CPU machines it is the local CPU build; an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[${extras}]"
