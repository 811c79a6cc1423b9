#!/usr/bin/env bash
# Install, export the bundled demo voice to ONNX (once) and speak a sentence into demo.wav.
set -euo pipefail
cd "$(dirname "$0")/.."
text="${1:-The quick brown fox jumps over the lazy dog.}"
if [ ! -f demo/checkpoint/model.safetensors ]; then
    echo "demo.sh: no demo checkpoint in demo/checkpoint yet (the demo voice is still training)" >&2
    exit 1
fi
bash scripts/install.sh export
if [ ! -f engines/demo/manifest.json ] || [ demo/checkpoint/model.safetensors -nt engines/demo/manifest.json ]; then
    .venv/bin/python export/to_onnx.py demo/checkpoint --out engines/demo
fi
# demo.wav and demo.png are this script's own outputs: each run replaces them.
.venv/bin/python runtime/synth.py --engine engines/demo --text "$text" --out demo.wav --mel-png demo.png --overwrite
