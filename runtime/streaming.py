"""Chunked post-net and vocoder over a growing mel: early audio that equals the whole utterance's.

The post-net and the vocoder are convolution stacks, so an output frame depends only on the input
frames within their receptive radius (``context_frames`` in the engine manifest: the post-net's from
its kernels, HiFi-GAN's from its upsampling and residual stacks). A chunk of audio for frames
``[a, b)`` is therefore exact once the decoder has made ``b + vocoder context + post-net context``
frames: refined frames are computed once each, with full context, and the vocoder sees
``vocoder context`` refined frames on both sides of the chunk. At the true start and end of an
utterance the graphs' zero padding is the whole utterance's padding, so nothing is approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk sizes in mel frames: a small first chunk for early audio, then doubling up to a cap.

    Larger chunks cost less: each vocoder call also runs ``2 x context`` frames it does not emit.
    """

    first_frames: int = 16  # 0.19 s of audio at 22.05 kHz, hop 256
    max_frames: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.first_frames <= self.max_frames:
            raise ValueError(f"chunk sizes must satisfy 1 <= first_frames <= max_frames, got "
                             f"{self.first_frames} and {self.max_frames}")

    def size(self, index: int) -> int:
        """Frames of chunk ``index`` (0-based)."""
        return min(self.first_frames << min(index, 30), self.max_frames)


@dataclass(frozen=True)
class VocodeJob:
    """Vocode ``mel`` (a window of refined frames) and keep samples ``[start, stop)`` of its waveform."""

    mel: np.ndarray  # [frames, n_mels]
    start: int
    stop: int

    def run(self, vocode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return vocode(self.mel)[self.start:self.stop]


class MelStream:
    """One utterance's y' frames in, as the decoder makes them; vocoder jobs for finished chunks out.

    ``postnet`` maps y' ``[frames, n_mels]`` to y''; the jobs' windows are meant for the vocoder
    whose radius is ``vocoder_context``. ``push`` and ``finish`` return the jobs that became ready,
    in order; their audio, concatenated, is the whole utterance's audio. ``first_chunk`` is the
    plan's index of this utterance's first chunk: a stream of many utterances grows its chunks
    once, not again at every sentence.
    """

    def __init__(self, postnet: Callable[[np.ndarray], np.ndarray], postnet_context: int, vocoder_context: int,
                 hop: int, plan: ChunkPlan = ChunkPlan(), first_chunk: int = 0):
        self.postnet, self.hop, self.plan = postnet, hop, plan
        self.postnet_context, self.vocoder_context = postnet_context, vocoder_context
        self.coarse: list[np.ndarray] = []  # y' frames, [n_mels] each
        self.refined = np.zeros((0, 0), np.float32)  # y'' frames whose context was complete
        self.emitted = 0  # frames whose audio has been handed out
        self.chunks = first_chunk  # the plan's index of the next chunk

    def push(self, frames: np.ndarray) -> list[VocodeJob]:
        """Add y' frames ``[k, n_mels]``; returns the jobs of every chunk they complete."""
        self.coarse.extend(frames)
        jobs = []
        while True:
            stop = self.emitted + self.plan.size(self.chunks)
            if stop + self.vocoder_context + self.postnet_context > len(self.coarse):
                return jobs
            jobs.append(self._chunk(stop, final=False))

    def finish(self) -> list[VocodeJob]:
        """The utterance ended: the job for the frames not yet handed out (none if there are none)."""
        return [self._chunk(len(self.coarse), final=True)] if self.emitted < len(self.coarse) else []

    def _chunk(self, stop: int, final: bool) -> VocodeJob:
        start = self.emitted
        # Refined frames up to `needed` have their full post-net context (or the utterance's true end).
        needed = len(self.coarse) if final else stop + self.vocoder_context
        self._refine(needed, final)
        low = max(0, start - self.vocoder_context)
        window = self.refined[low:needed]
        self.emitted, self.chunks = stop, self.chunks + 1
        return VocodeJob(window, (start - low) * self.hop, (stop - low) * self.hop)

    def _refine(self, needed: int, final: bool) -> None:
        done = len(self.refined)
        if needed <= done:
            return
        low = max(0, done - self.postnet_context)
        high = len(self.coarse) if final else needed + self.postnet_context
        refined = self.postnet(np.stack(self.coarse[low:high]))
        new = refined[done - low: needed - low]
        self.refined = new if done == 0 else np.concatenate([self.refined, new])
