"""The engine directory's ``manifest.json``: what each graph is, and proof it is intact.

Typed (``EngineManifest`` and its parts), written by the exporters through
``EngineManifest.for_export`` / ``with_trt`` and ``write_manifest``, read by the runtime
(torch-free) through ``read_manifest``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melle.core.audio import MelPreset, get_preset
from melle.core.config import MelleConfig
from melle.core.fileio import write_text_atomic

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1  # the layout to_dict writes; read_manifest refuses newer ones
TIMING_CACHE_FILE = "timing.cache"  # TensorRT's, written beside the engines by export/to_trt.py
MODEL_GRAPHS = ("prefill", "decoder_step", "latent_head", "postnet")
KV_LAYOUT = "[positions, batch, n_head, head_dim], time-major, one tensor per layer"
# The attention the prefill and step graphs are built with: standard ONNX ops (every backend), or
# ONNX Runtime's fused GroupQueryAttention over a cache shared between past and present (ORT CPU).
ATTENTION_KV_LAYOUTS = {
    "standard": KV_LAYOUT,
    "gqa": "[batch, n_head, max_len, head_dim], one buffer per layer bound as both past and present",
}


def step_graph_name(weights: str) -> str:
    """The decoder step graph with ``weights``: fp32 (the exported one), int8, nbits8 or nbits4."""
    return "decoder_step" if weights == "fp32" else f"decoder_step_{weights}"


class EngineError(ValueError):
    """An engine directory that cannot be used, with what is wrong and what to do."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: symbolic (str) or fixed (int) dimensions and element type."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph of the engine and the parity measured when it was exported."""

    file: str
    sha256: str
    opset: int | None = None  # None: rewritten by a tool (the INT8 quantiser) rather than exported
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    parity_max_abs_diff: float | None = None  # vs its PyTorch module
    e_max_abs_diff_vs_fp32: float | None = None  # INT8 step: its e vs the FP32 step's
    cache_max_step_diff: int | None = None  # INT8 cache outputs vs PyTorch, in quantisation steps
    # Frame graphs (post-net, vocoder): input frames on each side that one output frame depends on,
    # so a stream can run them on chunks with this much context and match the whole utterance.
    context_frames: int | None = None

    @property
    def parity(self) -> float | None:
        return self.e_max_abs_diff_vs_fp32 if self.parity_max_abs_diff is None else self.parity_max_abs_diff

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphEntry":
        return cls(**{**data, "inputs": [TensorSpec(**t) for t in data.get("inputs", [])],
                      "outputs": [TensorSpec(**t) for t in data.get("outputs", [])]})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "opset"}


@dataclass(frozen=True)
class TrtEngine:
    """One TensorRT plan, the ONNX graph it was built from and its optimisation profile."""

    file: str
    sha256: str
    onnx_sha256: str
    fp32_layers: int  # layers pinned to FP32 in an FP16 build
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shape


@dataclass(frozen=True)
class TrtBuild:
    """The TensorRT engines of the directory and what they were built for (export/to_trt.py)."""

    tensorrt: str
    gpu: str
    compute_capability: str
    fp16: bool
    flags: list[str]
    batch_max: int
    max_len: int
    max_prompt_seconds: float
    workspace_gb: float
    built: str  # ISO time, UTC
    engines: dict[str, TrtEngine]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrtBuild":
        return cls(**{**data, "engines": {name: TrtEngine(**e) for name, e in data["engines"].items()}})


@dataclass(frozen=True)
class EngineManifest:
    """Everything ``manifest.json`` records; ``directory`` is where it was read from (not stored)."""

    config: MelleConfig
    mel_preset: MelPreset  # the one source of mel facts (sample rate, hop) for the runtime
    tokenizer: dict[str, Any]
    vocoder: str  # what the vocoder graph was exported from, or "none"
    max_len: int  # KV cache capacity the runtime may allocate
    batch_max: int
    kv_layout: str
    graphs: dict[str, GraphEntry]
    versions: dict[str, str]
    trt: TrtBuild | None = None
    attention: str = "standard"  # a key of ATTENTION_KV_LAYOUTS
    kv_cache: dict[str, Any] | None = None  # an INT8 cache's calibration record (None: FP32 cache)
    directory: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.attention not in ATTENTION_KV_LAYOUTS:
            raise ValueError(f"attention {self.attention!r} is not one of {sorted(ATTENTION_KV_LAYOUTS)}")

    @classmethod
    def for_export(cls, config: MelleConfig, vocoder: str, max_len: int, batch_max: int,
                   graphs: dict[str, GraphEntry], versions: dict[str, str],
                   attention: str = "standard", kv_cache: dict[str, Any] | None = None) -> "EngineManifest":
        """The manifest of a fresh ONNX export of a model with ``config``."""
        return cls(config, get_preset(config.mel_preset), config.tokenizer, vocoder, max_len, batch_max,
                   ATTENTION_KV_LAYOUTS[attention], graphs, versions, attention=attention, kv_cache=kv_cache)

    def with_trt(self, build: TrtBuild) -> "EngineManifest":
        return dataclasses.replace(self, trt=build)

    @property
    def parity(self) -> dict[str, float | None]:
        """Per graph, the parity figure measured at export."""
        return {name: graph.parity for name, graph in self.graphs.items()}

    @property
    def has_vocoder(self) -> bool:
        return "vocoder" in self.graphs

    @property
    def sample_rate(self) -> int:
        return self.mel_preset.sample_rate

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise EngineError(f"{self.directory} has no '{name}' graph (it has {sorted(self.graphs)}); "
                              "re-export with the option that adds it")
        return self.directory / self.graphs[name].file

    def files(self) -> set[str]:
        """Every file this manifest lists: graphs and TensorRT plans."""
        files = {graph.file for graph in self.graphs.values()}
        if self.trt is not None:
            files |= {engine.file for engine in self.trt.engines.values()}
        return files

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineManifest":
        """The manifest of a parsed ``manifest.json``; KeyError / TypeError / ValueError when it is not one.

        Required, as always: config, graphs (file and sha256 each), max_len, batch_max. What a
        manifest may lack follows from its config (mel preset, tokenizer) or is only a record.
        """
        config = MelleConfig.from_dict(data["config"])
        preset, trt = data.get("mel_preset"), data.get("trt")
        return cls(config=config, mel_preset=get_preset(config.mel_preset) if preset is None else MelPreset(**preset),
                   tokenizer=data.get("tokenizer", config.tokenizer), vocoder=data.get("vocoder", "none"),
                   max_len=int(data["max_len"]), batch_max=int(data["batch_max"]),
                   kv_layout=data.get("kv_layout", KV_LAYOUT),
                   graphs={name: GraphEntry.from_dict(g) for name, g in data["graphs"].items()},
                   versions=data.get("versions", {}), trt=None if trt is None else TrtBuild.from_dict(trt),
                   attention=data.get("attention", "standard"),  # engines exported before GQA are standard
                   kv_cache=data.get("kv_cache"))

    def to_dict(self) -> dict[str, Any]:
        data = {"format_version": MANIFEST_VERSION, "config": self.config.to_dict(),
                "mel_preset": dataclasses.asdict(self.mel_preset), "tokenizer": self.tokenizer,
                "vocoder": self.vocoder, "max_len": self.max_len, "batch_max": self.batch_max,
                "attention": self.attention, "kv_layout": self.kv_layout, "kv_cache": self.kv_cache,
                "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
                "parity": self.parity,  # a summary for people and scripts reading the JSON
                "versions": self.versions}
        if self.trt is not None:
            data["trt"] = dataclasses.asdict(self.trt)
        return data


def write_manifest(directory: str | Path, manifest: EngineManifest) -> None:
    """Write ``manifest.json`` into ``directory`` atomically."""
    write_text_atomic(Path(directory) / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2, default=str) + "\n")


def engine_entries(directory: str | Path) -> set[str] | None:
    """Names an exporter wrote in an engine directory (the manifest and every file it lists,
    TensorRT's timing cache), or None when ``directory`` holds no readable manifest."""
    directory = Path(directory)
    try:
        manifest = EngineManifest.from_dict(json.loads((directory / MANIFEST_FILE).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    # A graph over 2 GB keeps its weights beside it in FILE.data.
    return {MANIFEST_FILE, TIMING_CACHE_FILE} | {name for file in manifest.files() for name in (file, f"{file}.data")}


def read_manifest(directory: str | Path, verify: bool = True) -> EngineManifest:
    """Load and check an engine directory; ``verify`` compares every graph's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise EngineError(f"engine directory {directory} does not exist; create it with "
                          f"`python export/to_onnx.py CKPT --out {directory}`")
    if not path.exists():
        raise EngineError(f"{directory} has no {MANIFEST_FILE}: not an engine directory (or an interrupted export)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineError(f"{path} is not valid JSON ({err}); re-export the engine") from None
    if data.get("format_version", 0) > MANIFEST_VERSION:
        raise EngineError(f"{path} has format {data['format_version']}, newer than this runtime "
                          f"({MANIFEST_VERSION}); upgrade melle-rt")
    try:
        manifest = dataclasses.replace(EngineManifest.from_dict(data), directory=directory)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise EngineError(f"{path} is incomplete or invalid ({err}); re-export the engine") from None
    if manifest.mel_preset.name != manifest.config.mel_preset:
        raise EngineError(f"{path} records mel preset '{manifest.mel_preset.name}' for a model of "
                          f"'{manifest.config.mel_preset}'; re-export the engine")
    missing = [n for n in MODEL_GRAPHS if n not in manifest.graphs]
    if missing:
        raise EngineError(f"{path} lists no {missing} graph; re-export the engine")
    for entry in manifest.graphs.values():
        file = directory / entry.file
        if not file.exists():
            raise EngineError(f"{file} is missing; re-export the engine")
        if verify and sha256_of(file) != entry.sha256:
            raise EngineError(f"{file} does not match the sha256 in {MANIFEST_FILE}: the file was changed "
                              "or damaged after export; re-export the engine")
    return manifest
