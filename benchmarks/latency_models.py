"""The latency benchmark's models: one random-initialised checkpoint and engine per (preset, r), cached."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from melle.core.config import PRESETS, MelleConfig
from melle_bench.latency_backends import VOCODER
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
                                    str(directory / "checkpoint"), str(directory / "engine"),
                                    str(directory / "engine-gqa"))
    return plan



def prepare(models: list[Model], seed: int, onnx: bool, int8: bool, gqa: bool, batch_max: int) -> None:
    """Write each model's checkpoint (engines when ``onnx``, the GQA one too when ``gqa``) unless cached."""
    from melle.checkpoint import save_checkpoint
    from melle.init import random_model
    from melle_export.to_onnx import export

    for m in tqdm(models, desc="models", position=1, leave=False):
        if is_cached(m, onnx, int8, gqa):
            continue
        save_checkpoint(m.checkpoint, random_model(m.preset, seed, r=m.r, max_len=m.max_len))
        if onnx:
            export(m.checkpoint, m.engine, vocoder=VOCODER if m.vocoder else "none", batch_max=batch_max, int8=int8)
        if gqa:
            export(m.checkpoint, m.engine_gqa, vocoder="none", batch_max=batch_max, int8=int8, attention="gqa")


def is_cached(model: Model, onnx: bool, int8: bool, gqa: bool) -> bool:
    """Whether the cache holds this model with the sizes the presets say now and every graph needed."""
    expected = {**PRESETS[model.preset], "r": model.r, "max_len": model.max_len}
    config_file = Path(model.checkpoint) / "config.json"
    if not config_file.exists() or any(json.loads(config_file.read_text()).get(k) != v for k, v in expected.items()):
        return False
    if not onnx:
        return True
    from melle.core.manifest import EngineError, read_manifest

    try:
        graphs = read_manifest(model.engine, verify=False).graphs  # loading verifies the checksums
        gqa_graphs = read_manifest(model.engine_gqa, verify=False).graphs if gqa else {}
    except EngineError:
        return False
    return ((not int8 or "decoder_step_int8" in graphs) and (not model.vocoder or "vocoder" in graphs)
            and (not gqa or not int8 or "decoder_step_int8" in gqa_graphs))


def describe_model(model: Model) -> dict:
    """Sizes, parameter count and (for an engine) the INT8 step's parity, read without torch."""
    from safetensors import safe_open

    cfg = model.config()
    with safe_open(str(Path(model.checkpoint) / "model.safetensors"), framework="np") as weights:
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    info = {"params": params, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
            "max_len": cfg.max_len, "r": cfg.r, "kv_bytes_per_position": 2 * cfg.n_layer * cfg.d_model * 4}
    manifest = Path(model.engine) / "manifest.json"
    if manifest.exists():
        info["int8_parity"] = json.loads(manifest.read_text())["parity"].get("decoder_step_int8")
    return info
