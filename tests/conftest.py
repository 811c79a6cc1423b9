"""Shared fixtures: tiny random checkpoints with a decisive stop head, and their engines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from melle.checkpoint import save_checkpoint
from melle.init import random_model

ROOT = Path(__file__).resolve().parents[1]


# Stop head scaled so its logit swings by ~+-8 per step around a bias of -10: it fires
# after about ten steps, far from the threshold, so backends cannot disagree by a
# rounding coin flip. Tests that rely on it also assert the margin on the reference.
STOP_SCALE, STOP_BIAS = 8.0, -10.0
GUIDED_HEADS = [[0, 0], [1, 1]]


def decisive_stop_model(r: int, seed: int = 0):
    model = random_model("tiny", seed, r=r)
    # As if trained with the guided-attention loss: every standard engine then has the aligned step graph.
    model.cfg.guided_heads = GUIDED_HEADS
    with torch.no_grad():
        w = model.latent.stop.weight
        w.copy_(torch.randn_like(w) * STOP_SCALE / w.shape[1] ** 0.5)
        model.latent.stop.bias.fill_(STOP_BIAS)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Checkpoint directories of the tiny preset per reduction factor, made on first use."""
    made = {}

    def make(r: int):
        if r not in made:
            made[r] = tmp_path_factory.mktemp(f"ckpt_r{r}")
            save_checkpoint(made[r], decisive_stop_model(r))
        return made[r]

    return make


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint, tmp_path_factory):
    """Engine directories (no vocoder; INT8, 8-bit and 4-bit weight steps beside FP32) per reduction factor."""
    from melle_export.to_onnx import export

    made = {}

    def make(r: int):
        if r not in made:
            made[r] = export(tiny_checkpoint(r), tmp_path_factory.mktemp(f"engine_r{r}") / "engine",
                             vocoder="none", int8=True, nbits=(4, 8))
        return made[r]

    return make


@pytest.fixture(scope="session")
def voiced_engine(tiny_checkpoint, tmp_path_factory):
    """A tiny r=1 engine with the universal HiFi-GAN vocoder: makes real (noisy) audio."""
    from melle_export.to_onnx import export

    return export(tiny_checkpoint(1), tmp_path_factory.mktemp("voiced") / "engine", vocoder="hifigan-universal")


@pytest.fixture(scope="session")
def voiced_gqa_engine(tiny_checkpoint, tmp_path_factory):
    """The voiced engine's model on GroupQueryAttention graphs (continuous batching needs them)."""
    from melle_export.to_onnx import export

    return export(tiny_checkpoint(1), tmp_path_factory.mktemp("voiced_gqa") / "engine", vocoder="hifigan-universal",
                  attention="gqa")
