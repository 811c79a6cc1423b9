"""The randomness of MELLE decoding, drawn on the host from a seeded numpy Generator.

Two sources: pre-net dropout masks (kept on at inference) and the latent noise eps.
The reference ``generate`` and the torch-free runtime both draw through this module,
in the same order (prompt masks once, then per step: masks, eps), so one seed gives
the same noise, and so comparable trajectories, on PyTorch, ONNX Runtime and TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from melle.core.config import MelleConfig

N_PRENET_DROPOUTS = 2  # dropout layers in the pre-net, each with its own mask


def dropout_masks(rng: np.random.Generator, shape: tuple[int, ...], cfg: MelleConfig) -> np.ndarray:
    """Inverted-dropout masks ``[*shape, 2, prenet_dim]``: 0 or 1/(1-p), float32."""
    keep = rng.random((*shape, N_PRENET_DROPOUTS, cfg.prenet_dim)) >= cfg.prenet_dropout
    return (keep / (1.0 - cfg.prenet_dropout)).astype(np.float32)


@dataclass
class Noise:
    """All noise one decode used; replaying it reproduces the decode exactly."""

    prompt_masks: np.ndarray  # [B, G_prompt, 2, prenet_dim]
    step_masks: list[np.ndarray] = field(default_factory=list)  # per step [B, 2, prenet_dim]
    step_eps: list[np.ndarray] = field(default_factory=list)  # per step [B, frame_dim]


class NoiseSource:
    """Draws noise from a seed, or replays a recorded ``Noise``; records what it hands out."""

    def __init__(self, cfg: MelleConfig, batch: int, seed: int | None = None, replay: Noise | None = None):
        self.cfg, self.batch = cfg, batch
        self.rng = np.random.default_rng(seed)
        self.replay = replay
        self.used = Noise(prompt_masks=np.zeros((batch, 0, N_PRENET_DROPOUTS, cfg.prenet_dim), np.float32))

    def prompt(self, n_groups: int) -> np.ndarray:
        if self.replay is not None:
            masks = self.replay.prompt_masks
            if masks.shape[:2] != (self.batch, n_groups):
                raise ValueError(f"replayed prompt masks have shape {masks.shape}, "
                                 f"need batch {self.batch} x {n_groups} prompt groups")
        else:
            masks = dropout_masks(self.rng, (self.batch, n_groups), self.cfg)
        self.used.prompt_masks = masks
        return masks

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """Masks ``[B, 2, prenet_dim]`` and eps ``[B, frame_dim]`` for the next step."""
        t = len(self.used.step_eps)
        if self.replay is not None:
            if t >= len(self.replay.step_eps):
                raise ValueError(f"replayed noise covers {len(self.replay.step_eps)} steps; step {t} needs more")
            masks, eps = self.replay.step_masks[t], self.replay.step_eps[t]
        else:
            masks = dropout_masks(self.rng, (self.batch,), self.cfg)
            eps = self.rng.standard_normal((self.batch, self.cfg.frame_dim)).astype(np.float32)
        self.used.step_masks.append(masks)
        self.used.step_eps.append(eps)
        return masks, eps
