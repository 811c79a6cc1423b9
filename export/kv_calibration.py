"""Per-channel scales for an INT8 KV cache, calibrated on real decodes of the model itself.

The PyTorch reference decodes each calibration sentence free-running (seeded: the same model and
text give the same scales) while a hook on every layer's QKV projection keeps the largest |K| and
|V| of each channel. A channel's scale maps that maximum, times ``MARGIN``, to 127: the margin
leaves room for texts and prompt voices beyond the calibration set before values saturate.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from melle.core.decoding import DecodeOptions
from melle.core.text import tokenizer_from_spec
from melle.generate import generate
from melle.model import Melle

DEFAULT_SENTENCES = Path(__file__).parent / "data" / "kv_calibration.txt"
MARGIN = 1.25
# Decode up to this many frames per text token: a spoken phoneme lasts 5-8 frames, and a model
# that never stops (random weights) still ends.
FRAMES_PER_TOKEN = 8


@dataclass(frozen=True)
class KvCalibration:
    key: np.ndarray  # [n_layer, n_head * head_dim], the K scales
    value: np.ndarray  # the V scales
    record: dict  # how they were made, for the manifest


def read_sentences(path: str | Path) -> list[str]:
    """One sentence a line; OSError when unreadable, ValueError when it holds none."""
    sentences = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not sentences:
        raise ValueError(f"{path} holds no sentences; give a text file with one calibration sentence a line")
    return sentences


def calibrate_kv(model: Melle, sentences: list[str], seed: int = 0) -> KvCalibration:
    """Scales of an INT8 cache for ``model`` from free-running decodes of ``sentences``."""
    cfg = model.cfg
    tokenizer = tokenizer_from_spec(cfg.tokenizer)
    key_max = np.zeros((cfg.n_layer, cfg.d_model), np.float32)
    value_max = np.zeros_like(key_max)

    def keep_max(layer: int):
        def hook(module, inputs, output):
            _, key, value = output.detach().chunk(3, dim=-1)  # [..., H*D] each, q/k/v blocks as in the cache
            key_max[layer] = np.maximum(key_max[layer], key.abs().flatten(0, -2).amax(0).numpy())
            value_max[layer] = np.maximum(value_max[layer], value.abs().flatten(0, -2).amax(0).numpy())
        return hook

    hooks = [block.attn.qkv.register_forward_hook(keep_max(i)) for i, block in enumerate(model.blocks)]
    frames = 0
    try:
        for i, sentence in enumerate(sentences):
            ids = tokenizer.encode(sentence, on_unknown="drop")
            options = DecodeOptions(max_steps=math.ceil(FRAMES_PER_TOKEN * len(ids) / cfg.r))
            with torch.inference_mode():
                frames += len(generate(model, ids, options=options, seed=seed + i).mel)
    finally:
        for hook in hooks:
            hook.remove()
    tiny = np.finfo(np.float32).tiny  # a channel that was always 0 still needs a nonzero scale

    def scales(maxima: np.ndarray) -> np.ndarray:
        return np.maximum(maxima * MARGIN / 127, tiny).astype(np.float32)

    text = "\n".join(sentences)
    record = {"dtype": "int8", "scales": "per channel, symmetric: max |x| over the calibration decodes x margin / 127",
              "margin": MARGIN, "sentences": len(sentences), "frames": frames, "seed": seed,
              "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
              "key_scale_range": [float(scales(key_max).min()), float(scales(key_max).max())],
              "value_scale_range": [float(scales(value_max).min()), float(scales(value_max).max())]}
    return KvCalibration(scales(key_max), scales(value_max), record)
