"""What the latency benchmark decodes: its settings, per-backend caps, models, cells and workload."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melle.core.audio import get_preset
from melle.core.config import MelleConfig
from melle.core.text import N_SPECIAL

TABLE5_SECONDS = 10.0  # paper Table 5: time to generate 10 s of speech
PAPER_TABLE5 = {1: 5.49, 2: 2.76, 4: 1.40}  # seconds for r = 1, 2, 4 on the paper's GPU


FIRST_AUDIO_SECONDS = 0.5  # the first chunk a streaming player needs
TEXT_TOKENS = 150  # about 10 s of speech in characters


@dataclass(frozen=True)
class Effort:
    """How much of the protocol a backend runs; the no-cache baseline is capped to fit in an hour."""

    step_repeats: int = 10  # timed calls of one step per position (median)
    first_audio_repeats: int = 3  # time to first audio (median)
    trials: int | None = None  # Table 5 trials; None: --trials
    max_position: int | None = None  # positions above are neither timed nor decoded to
    max_batch: int | None = None  # larger candidate batches are not timed
    skip_presets: tuple[str, ...] = ()  # presets where Table 5 and batch throughput are not run
    why: str = ""  # the reason for the caps, quoted in every skip note

    def position_skip(self, position: int, max_len: int) -> str | None:
        """Why one step at ``position`` is not timed, or None."""
        if position >= max_len:
            return f"position {position} is beyond the model's {max_len} positions"
        if self.max_position is not None and position > self.max_position:
            return f"{self.why}: positions above {self.max_position} are not timed"
        return None

    def decode_skip(self, preset: str, positions: int, batch: int = 1) -> str | None:
        """Why a Table 5 or batch decode reaching ``positions`` is not run, or None."""
        if preset in self.skip_presets:
            return f"{self.why}: not run at {preset} size"
        if self.max_position is not None and positions > self.max_position:
            return f"{self.why}: this decode reaches position {positions}, above {self.max_position}"
        if self.max_batch is not None and batch > self.max_batch:
            return f"{self.why}: batches above {self.max_batch} are not timed"
        return None


EFFORT = {"torch-nocache": Effort(
    step_repeats=3, first_audio_repeats=1, trials=1, max_position=1000, max_batch=1, skip_presets=("paper",),
    why="full-prefix recompute every step costs minutes per decode at large sizes")}


@dataclass(frozen=True)
class Settings:
    """What every cell measures (from the command line)."""

    positions: tuple[int, ...]
    rs: tuple[int, ...]
    batches: tuple[int, ...]
    trials: int
    batch_seconds: float  # length of each candidate in the throughput runs
    prompt_seconds: float  # acoustic prompt in every decode (continuation-style prefill)
    seed: int


@dataclass(frozen=True)
class Model:
    """One random-initialised (preset, r): where its checkpoint and ONNX engines live."""

    preset: str
    r: int
    max_len: int
    vocoder: bool  # export the vocoder graph into this engine
    checkpoint: str
    engine: str  # the standard engine, with the vocoder when ``vocoder``

    def engine_of(self, variant: str) -> str:
        """Where the engine variant (latency_backends.ENGINE_VARIANTS) of the same weights lives."""
        return self.engine if variant == "standard" else str(Path(self.engine).parent / f"engine-{variant}")

    def config(self) -> MelleConfig:
        """The model's configuration, read from its checkpoint."""
        return MelleConfig.load(Path(self.checkpoint) / "config.json")


@dataclass(frozen=True)
class Cell:
    """One backend on one preset: the unit that runs in its own process."""

    preset: str
    backend: str
    models: dict[int, Model]  # by r; the first r's engine holds the vocoder
    settings: Settings


def frames_per_second(mel_preset: str) -> float:
    """Mel frames per second of audio for a mel preset."""
    preset = get_preset(mel_preset)
    return preset.sample_rate / preset.hop_length


def frames_for(seconds: float, fps: float) -> int:
    """Mel frames in ``seconds`` of audio (10 s at 22050 Hz, hop 256 -> 861)."""
    return round(seconds * fps)


def steps_for(seconds: float, r: int, fps: float) -> int:
    """Decode steps (frame groups) that make ``seconds`` of audio."""
    return math.ceil(frames_for(seconds, fps) / r)


@dataclass
class Workload:
    """The text and acoustic prompt every backend decodes, drawn from the seed."""

    cfg: MelleConfig
    ids: list[int]
    prompt_mel: np.ndarray  # [frames, n_mels]
    seed: int

    @classmethod
    def make(cls, cfg: MelleConfig, settings: Settings) -> Workload:
        """``TEXT_TOKENS`` random text tokens and a random prompt in the log-mel range, drawn from the seed."""
        rng = np.random.default_rng(settings.seed)
        ids = rng.integers(N_SPECIAL, cfg.n_text_vocab, TEXT_TOKENS).tolist()
        frames = frames_for(settings.prompt_seconds, frames_per_second(cfg.mel_preset))
        prompt = (rng.standard_normal((frames, cfg.n_mels)) * 2 - 6).astype(np.float32)  # log-mel range
        return cls(cfg, ids, prompt, settings.seed)

    def steps(self, seconds: float) -> int:
        """Decode steps that make ``seconds`` of audio at this model's r."""
        return steps_for(seconds, self.cfg.r, frames_per_second(self.cfg.mel_preset))

    def positions(self, seconds: float) -> int:
        """Positions a decode of ``seconds`` takes: text + EOS + prompt groups + generated groups."""
        return len(self.ids) + 1 + len(self.prompt_mel) // self.cfg.r + self.steps(seconds)
