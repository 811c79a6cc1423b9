"""The one MELLE decode loop, written against a backend interface (numpy in, numpy out).

PyTorch (``melle.generate``), ONNX Runtime and TensorRT (``melle_runtime``) implement
``DecoderBackend``; the loop, the noise order and the stop rule live only here, so
parity between backends tests the backends and not two copies of the loop.
This module imports no torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from melle.core.alignment import AlignmentGuide, AlignOptions
from melle.core.config import MelleConfig
from melle.core.noise import Noise, NoiseSource
from melle.core.text import EOS_ID


class DecoderBackend(Protocol):
    """What a runtime must provide to be driven by ``decode``."""

    capacity: int  # positions (text + prompt + frame groups) one sequence may fill

    def start(self, batch: int, max_len: int) -> None:
        """Allocate (or reuse) the KV cache for ``batch`` sequences of ``max_len`` positions."""

    def prefill(self, text: np.ndarray, prompt_frames: np.ndarray, prompt_masks: np.ndarray) -> np.ndarray:
        """text [B, Lx] int64 (with EOS), prompt groups [B, Gp, frame_dim] -> e [B, d]; fills the cache."""

    def step(self, frames: np.ndarray, masks: np.ndarray, position: int) -> np.ndarray:
        """Frame group [B, frame_dim] at ``position`` -> e [B, d]; writes its K/V into the cache."""

    # Alignment-guided decoding (``DecodeOptions.align``), where ``aligned`` is True: the model has
    # guided heads and the backend's step graph takes their bias and returns their attention.
    aligned: bool

    def step_aligned(self, frames: np.ndarray, masks: np.ndarray, position: int,
                     text_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``step`` with ``text_bias [B, n_text]`` on the guided heads' scores over the text (the
        first n_text cache slots) -> e [B, d] and their mean attention over the text [B, n_text]."""

    def latent(self, e: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """e [B, d], eps [B, frame_dim] -> mu, logvar, y' (each [B, frame_dim]), stop logit [B]."""

    def postnet(self, coarse: np.ndarray) -> np.ndarray:
        """y' [1, frames, n_mels] -> y'' [1, frames, n_mels]."""

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """mel [B, frames, n_mels] -> waveform [B, samples] with the vocoder paired with the model."""

    def close(self) -> None:
        """Release what the backend holds (sessions, device memory); it is not used afterwards."""


@dataclass(frozen=True)
class DecodeOptions:
    stop_threshold: float = 0.5  # stop once sigmoid(stop logit) exceeds this
    min_steps: int = 1  # never stop before this many frame groups
    max_steps: int = 1000  # frame groups per candidate; capped by the backend's capacity
    candidates: int = 1  # sample N in one batch and keep the best (paper section 5.3)
    stop_enabled: bool = True  # False: always make max_steps (benchmarks)
    align: AlignOptions | None = None  # alignment-guided decoding (melle.core.alignment); None = off


@dataclass
class Decoded:
    """Per candidate: refined mel ``[frames, n_mels]``, coarse y', groups made, whether it stopped."""

    mels: list[np.ndarray]
    coarse: list[np.ndarray]
    n_groups: list[int]
    stopped: list[bool]
    stop_logits: np.ndarray  # [B, steps] as the stop head gave them, or as the alignment guide set them
    noise: Noise
    best: int

    @property
    def mel(self) -> np.ndarray:
        return self.mels[self.best]


def prompt_groups(prompt_mel: np.ndarray | None, cfg: MelleConfig) -> np.ndarray:
    """Prompt frames ``[T, n_mels]`` -> whole groups ``[G, frame_dim]`` (a partial last group is dropped)."""
    if prompt_mel is None:
        return np.zeros((0, cfg.frame_dim), np.float32)
    n = prompt_mel.shape[0] // cfg.r
    return prompt_mel[: n * cfg.r].reshape(n, cfg.frame_dim).astype(np.float32)


def pick_best(n_groups: list[int], stopped: list[bool]) -> int:
    """Default candidate choice: among those that stopped, the one closest to their median length.

    Too-short and run-on candidates are MELLE's usual failures; with no scorer at hand
    (speaker similarity needs an extra model) length consensus rejects them.
    """
    pool = [i for i, s in enumerate(stopped) if s] or list(range(len(n_groups)))
    median = float(np.median([n_groups[i] for i in pool]))
    return min(pool, key=lambda i: (abs(n_groups[i] - median), i))


class Decoding:
    """One decode in progress: iterating yields each step's y' groups ``[B, frame_dim]`` as they are made.

    The one loop behind ``decode`` (the whole utterance) and streaming synthesis (frames as they
    come). Construction allocates the cache and runs the prefill; ``result()`` post-nets the
    finished candidates. A consumer that stops iterating stops the decoding: no step runs ahead.
    ``text_start``: where the text to speak begins in ``text_ids`` (after a prompt's transcript),
    for the alignment guide.
    """

    def __init__(self, backend: DecoderBackend, cfg: MelleConfig, text_ids: list[int],
                 prompt_mel: np.ndarray | None = None, options: DecodeOptions = DecodeOptions(),
                 seed: int | None = None, noise: Noise | None = None, text_start: int = 0):
        if options.align and not getattr(backend, "aligned", False):
            raise ValueError("alignment-guided decoding needs a model trained with guided heads (config "
                             "guided_heads) and an engine whose decoder step takes align_bias (exported with "
                             "standard attention by this melle-rt): re-export, or decode without it")
        self.backend, self.cfg, self.options = backend, cfg, options
        batch = options.candidates
        tokens = np.array([list(text_ids) + [EOS_ID]] * batch, dtype=np.int64)
        groups = np.repeat(prompt_groups(prompt_mel, cfg)[None], batch, axis=0)  # [B, Gp, frame_dim]
        self.prefix = tokens.shape[1] + groups.shape[1]
        self.max_steps = min(options.max_steps, backend.capacity - self.prefix)
        if self.max_steps < 1:
            raise ValueError(f"text and prompt take {self.prefix} positions, the engine holds {backend.capacity}: "
                             "shorten the text or the prompt")
        self.source = NoiseSource(cfg, batch, seed=seed, replay=noise)
        backend.start(batch, self.prefix + self.max_steps)
        self.e = backend.prefill(tokens, groups, self.source.prompt(groups.shape[1]))
        self.outputs: list[np.ndarray] = []  # y' per step, [B, frame_dim]
        self.stop_logits: list[np.ndarray] = []
        self.made = [0] * batch
        self.stopped = [False] * batch
        self.threshold_logit = float(np.log(options.stop_threshold / (1.0 - options.stop_threshold)))
        self.guide = AlignmentGuide(tokens.shape[1], batch, text_start, options.align) if options.align else None

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(self.max_steps):
            masks, eps = self.source.step()
            _, _, y, stop = self.backend.latent(self.e, eps)
            over = self.take(y, self.guide.gate_stop(stop) if self.guide else stop)
            yield y
            if over:
                break
            if self.guide:
                self.e, attention = self.backend.step_aligned(y, masks, self.position, self.guide.bias())
                self.guide.observe(attention)
            else:
                self.e = self.backend.step(y, masks, self.position)
        self.warn_if_cut()

    @property
    def position(self) -> int:
        """The slot the latest y' group's K/V goes to when it is fed back."""
        return self.prefix + len(self.outputs) - 1

    def take(self, y: np.ndarray, stop: np.ndarray) -> bool:
        """Record one step's latent output (y' ``[B, frame_dim]``, stop logits ``[B]``) and apply the
        stop rule; True once the decode is over (every candidate stopped, or ``max_steps``).

        The step itself belongs to whoever drives the decode: ``__iter__`` here, or a scheduler
        that steps many decodes in one batch (``melle_runtime.batching``).
        """
        t = len(self.outputs)
        if not (np.isfinite(y).all() and np.isfinite(stop).all()):
            raise FloatingPointError(f"the model produced NaN/inf at step {t}: the weights are damaged or a "
                                     "reduced-precision backend overflowed; try the FP32 backend (ort-cpu)")
        self.outputs.append(y)
        self.stop_logits.append(stop)
        for b, done in enumerate(self.stopped):
            if done:
                continue
            self.made[b] = t + 1
            if self.options.stop_enabled and t + 1 >= self.options.min_steps and stop[b] > self.threshold_logit:
                self.stopped[b] = True
        return all(self.stopped) or t + 1 == self.max_steps

    def warn_if_cut(self) -> None:
        """Say so when the decode ended at ``max_steps`` rather than by the stop head."""
        if self.options.stop_enabled and not all(self.stopped):
            warnings.warn(f"{self.stopped.count(False)} of {len(self.stopped)} candidates reached {self.max_steps} "
                          "steps without the stop head firing; their audio is cut there", stacklevel=3)

    def coarse(self, b: int = 0) -> np.ndarray:
        """Candidate ``b``'s y' frames so far (up to its stop), ``[frames, n_mels]``."""
        return np.stack([y[b] for y in self.outputs[: self.made[b]]]).reshape(-1, self.cfg.n_mels)

    def result(self) -> Decoded:
        """The finished decode: every candidate post-netted, the best one picked."""
        coarse = [self.coarse(b) for b in range(len(self.made))]
        mels = [self.backend.postnet(c[None])[0] for c in coarse]
        return Decoded(mels, coarse, list(self.made), list(self.stopped), np.stack(self.stop_logits, axis=1),
                       self.source.used, pick_best(self.made, self.stopped))


def decode(backend: DecoderBackend, cfg: MelleConfig, text_ids: list[int], prompt_mel: np.ndarray | None = None,
           options: DecodeOptions = DecodeOptions(), seed: int | None = None, noise: Noise | None = None,
           text_start: int = 0) -> Decoded:
    """Generate mel frames for ``text_ids`` (prompt text first, EOS is appended here).

    ``prompt_mel [T, n_mels]`` is the acoustic prompt (continuation or cross-sentence); the text
    to speak starts at ``text_start`` of ``text_ids``.
    Noise comes from ``seed`` or is replayed from ``noise``; the result records what was used.
    """
    run = Decoding(backend, cfg, text_ids, prompt_mel, options, seed, noise, text_start)
    for _ in run:
        pass
    return run.result()
