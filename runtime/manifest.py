"""The engine directory's ``manifest.json``: what each graph is, and proof it is intact.

Read by the runtime (torch-free) and written by the exporters.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melle.config import MelleConfig
from melle.fileio import write_text_atomic

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
TIMING_CACHE_FILE = "timing.cache"  # TensorRT's, written beside the engines by export/to_trt.py
MODEL_GRAPHS = ("prefill", "decoder_step", "latent_head", "postnet")


class EngineError(ValueError):
    """An engine directory that cannot be used, with what is wrong and what to do."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    directory: Path
    config: MelleConfig
    graphs: dict[str, dict[str, Any]]  # name -> file, sha256, inputs, outputs, opset
    max_len: int  # KV cache capacity the runtime may allocate
    batch_max: int
    raw: dict[str, Any] = field(repr=False)

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise EngineError(f"{self.directory} has no '{name}' graph (it has {sorted(self.graphs)}); "
                              "re-export with the option that adds it")
        return self.directory / self.graphs[name]["file"]

    @property
    def has_vocoder(self) -> bool:
        return "vocoder" in self.graphs

    @property
    def sample_rate(self) -> int:
        return int(self.raw["mel_preset"]["sample_rate"])


def write_manifest(directory: str | Path, data: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically; ``data`` must hold config, graphs, max_len, batch_max."""
    data = {"format_version": MANIFEST_VERSION, **data}
    write_text_atomic(Path(directory) / MANIFEST_FILE, json.dumps(data, indent=2, default=str) + "\n")


def engine_entries(directory: str | Path) -> set[str] | None:
    """Names an exporter wrote in an engine directory (the manifest and every file it lists,
    TensorRT's timing cache), or None when ``directory`` holds no readable manifest."""
    directory = Path(directory)
    try:
        raw = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    names = {MANIFEST_FILE, TIMING_CACHE_FILE}

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "file" and isinstance(value, str):
                    names.update({value, f"{value}.data"})  # a graph over 2 GB keeps its weights beside it
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(raw)
    return names


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Load and check an engine directory; ``verify`` compares every graph's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise EngineError(f"engine directory {directory} does not exist; create it with "
                          f"`python export/to_onnx.py CKPT --out {directory}`")
    if not path.exists():
        raise EngineError(f"{directory} has no {MANIFEST_FILE}: not an engine directory (or an interrupted export)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineError(f"{path} is not valid JSON ({err}); re-export the engine") from None
    if raw.get("format_version", 0) > MANIFEST_VERSION:
        raise EngineError(f"{path} has format {raw['format_version']}, newer than this runtime "
                          f"({MANIFEST_VERSION}); upgrade melle-rt")
    try:
        config = MelleConfig.from_dict(raw["config"])
        graphs, max_len, batch_max = raw["graphs"], int(raw["max_len"]), int(raw["batch_max"])
    except (KeyError, TypeError, ValueError) as err:
        raise EngineError(f"{path} is incomplete or invalid ({err}); re-export the engine") from None
    missing = [n for n in MODEL_GRAPHS if n not in graphs]
    if missing:
        raise EngineError(f"{path} lists no {missing} graph; re-export the engine")
    for name, entry in graphs.items():
        file = directory / entry["file"]
        if not file.exists():
            raise EngineError(f"{file} is missing; re-export the engine")
        if verify and sha256_of(file) != entry["sha256"]:
            raise EngineError(f"{file} does not match the sha256 in {MANIFEST_FILE}: the file was changed "
                              "or damaged after export; re-export the engine")
    return Manifest(directory, config, graphs, max_len, batch_max, raw)
