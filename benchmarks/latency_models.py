"""The latency benchmark's models: one random-initialised checkpoint and engine per (preset, r), cached."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from melle.core.config import PRESETS, MelleConfig
from melle_bench.latency_backends import ENGINE_VARIANTS, VOCODER, export_options, step_graphs
from melle_bench.latency_workload import TABLE5_SECONDS, Model, Settings, Workload


def plan_models(presets: list[str], settings: Settings, cache: Path) -> dict[str, dict[int, Model]]:
    """One model per (preset, r), with enough positions for the longest decode."""
    plan = {}
    for preset in presets:
        plan[preset] = {}
        for r in settings.rs:
            cfg = MelleConfig(**{**PRESETS[preset], "r": r})
            longest = Workload.make(cfg, settings).positions(max(TABLE5_SECONDS, settings.batch_seconds))
            directory = cache / f"{preset}-r{r}-seed{settings.seed}"
            plan[preset][r] = Model(preset, r, max(cfg.max_len, longest), r == settings.rs[0],
                                    str(directory / "checkpoint"), str(directory / "engine"))
    return plan



def prepare(models: list[Model], seed: int, engines: dict[str, set[str]], batch_max: int) -> None:
    """Write each model's checkpoint and the engine variants ``engines`` names, each with its quantized
    steps (``latency_backends.engines_needed``), unless cached."""
    from melle.checkpoint import save_checkpoint
    from melle.init import random_model
    from melle_export.to_onnx import export

    for m in tqdm(models, desc="models", position=1, leave=False):
        if is_cached(m, engines):
            continue
        save_checkpoint(m.checkpoint, random_model(m.preset, seed, r=m.r, max_len=m.max_len))
        for variant, weights in engines.items():
            vocoder = VOCODER if m.vocoder and variant == "standard" else "none"
            export(m.checkpoint, m.engine_of(variant), vocoder=vocoder, batch_max=batch_max,
                   **export_options(variant, weights))


def is_cached(model: Model, engines: dict[str, set[str]]) -> bool:
    """Whether the cache holds this model with the sizes the presets say now and every graph needed."""
    expected = {**PRESETS[model.preset], "r": model.r, "max_len": model.max_len}
    config_file = Path(model.checkpoint) / "config.json"
    if not config_file.exists() or any(json.loads(config_file.read_text()).get(k) != v for k, v in expected.items()):
        return False
    from melle.core.manifest import EngineError, read_manifest

    for variant, weights in engines.items():
        try:
            graphs = read_manifest(model.engine_of(variant), verify=False).graphs  # loading verifies the checksums
        except EngineError:
            return False
        needed = step_graphs(weights) | ({"vocoder"} if model.vocoder and variant == "standard" else set())
        if not needed <= set(graphs):
            return False
    return True


def describe_model(model: Model) -> dict:
    """Sizes, parameter count and, per engine variant, each decoder step's parity and size; read without torch."""
    from safetensors import safe_open

    cfg = model.config()
    with safe_open(str(Path(model.checkpoint) / "model.safetensors"), framework="np") as weights:
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    info = {"params": params, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
            "max_len": cfg.max_len, "r": cfg.r, "kv_bytes_per_position": 2 * cfg.n_layer * cfg.d_model * 4}
    manifest = Path(model.engine) / "manifest.json"
    if manifest.exists():
        info["int8_parity"] = json.loads(manifest.read_text())["parity"].get("decoder_step_int8")
    # Per engine variant, each decoder step's export parity (vs PyTorch; a quantized step's e vs FP32).
    for variant in ENGINE_VARIANTS:
        manifest = Path(model.engine_of(variant)) / "manifest.json"
        if manifest.exists():
            data = json.loads(manifest.read_text())
            steps = {name: graph for name, graph in data["graphs"].items() if name.startswith("decoder_step")}
            info.setdefault("step_parity", {})[variant] = {name: data["parity"][name] for name in steps}
            # What one step reads besides the cache: its weights, about the graph file's size.
            info.setdefault("step_bytes", {})[variant] = {
                name: (Path(model.engine_of(variant)) / graph["file"]).stat().st_size for name, graph in steps.items()}
    return info
