"""The Python API: ``Synthesizer(engine_dir).synthesize(text) -> (waveform, sample_rate)``.

Text -> tokens (melle.core.text), optional prompt wav -> mel (melle.core.audio, numpy), the shared
decode loop (melle.core.decoding) over a runtime backend, then the backend's vocoder.
Imports no torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from melle.core.audio import load_wav, mel_spectrogram
from melle.core.decoding import Decoded, DecodeOptions, decode
from melle.core.text import (EmptyTextError, UnknownSymbolError, describe_symbols, normalize_text,
                        prompt_transcript_mismatch, tokenizer_from_spec, unspeakable_characters)
from melle.core.manifest import EngineError, read_manifest
from melle_runtime.ort_backend import OrtBackend
from melle_runtime.text_pieces import Piece, split_pieces

BACKENDS = ("ort-cpu", "ort-cpu-int8", "ort-cuda", "trt")
MIN_PROMPT_SECONDS = 0.5
# Room left for speech when long text is cut into pieces: each text token may take this much
# audio (read speech runs ~0.07 s per phoneme symbol; twice that leaves slack for slow speech).
MAX_SECONDS_PER_TOKEN = 0.15
MIN_PIECE_TOKENS = 8  # a prompt that leaves less than this for text is too long


@dataclass(frozen=True)
class SynthesisOptions:
    candidates: int = 1  # sample N per sentence, keep the best
    max_seconds: float = 30.0  # cap per piece; reaching it without a stop is reported
    stop_threshold: float = 0.5
    strict: bool = False  # characters the voice cannot speak are an error, not a warning

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")

    def decode_options(self, cfg, preset) -> DecodeOptions:
        """The decode loop's options for a model ``cfg`` whose frames follow mel ``preset``."""
        frames_per_second = preset.sample_rate / preset.hop_length
        max_steps = max(1, math.ceil(self.max_seconds * frames_per_second / cfg.r))
        return DecodeOptions(stop_threshold=self.stop_threshold, max_steps=max_steps, candidates=self.candidates)


@dataclass
class Speech:
    wav: np.ndarray  # float32 [samples]
    sample_rate: int
    mels: list[np.ndarray]  # refined log-mel [frames, n_mels] per piece
    pieces: list[Piece]  # the text as it was cut to fit the engine


# Called after each piece: (pieces done, pieces in all, seconds of audio made so far).
Progress = Callable[[int, int, float], None]


def make_backend(manifest, backend: str, threads: int | None = None):
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "trt":
        from melle_runtime.trt_backend import TrtBackend

        return TrtBackend(manifest)
    if backend == "ort-cpu-int8" and "decoder_step_int8" not in manifest.graphs:
        raise EngineError(f"{manifest.directory} has no INT8 step; re-export with --int8")
    device = "cuda" if backend == "ort-cuda" else "cpu"
    return OrtBackend(manifest, device=device, int8=backend == "ort-cpu-int8", threads=threads)


class Synthesizer:
    """Speech from an engine directory on ONNX Runtime (CPU/CUDA) or TensorRT.

    ``close()`` (or a ``with`` block) releases the backend: sessions, or TensorRT's device memory.
    """

    def __init__(self, engine_dir, backend: str = "ort-cpu", threads: int | None = None):
        self.manifest = read_manifest(engine_dir)
        self.cfg = self.manifest.config
        self.preset = self.manifest.mel_preset
        self.tokenizer = tokenizer_from_spec(self.manifest.tokenizer)
        self.backend = make_backend(self.manifest, backend, threads)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sample_rate(self) -> int:
        return self.preset.sample_rate

    def prompt_mel(self, prompt_wav, prompt_text: str | None) -> np.ndarray:
        """Log-mel ``[frames, n_mels]`` of a prompt recording, checked for use as a prompt."""
        if not prompt_text or not prompt_text.strip():
            raise EmptyTextError("a prompt wav needs its transcript: pass --prompt-text / prompt_text")
        wav = load_wav(prompt_wav, self.preset.sample_rate, min_seconds=MIN_PROMPT_SECONDS)
        mismatch = prompt_transcript_mismatch(prompt_text, len(wav) / self.preset.sample_rate)
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
        return mel_spectrogram(wav, self.preset)

    def mel(self, text: str, prompt_mel: np.ndarray | None = None, prompt_text: str | None = None,
            seed: int | None = None, options: SynthesisOptions = SynthesisOptions()) -> Decoded:
        """Decode one piece to mel frames (prompt transcript prepended when prompting)."""
        ids = self.tokenizer.encode(text, on_unknown="drop")
        if prompt_mel is not None:
            ids = self.tokenizer.encode(prompt_text, on_unknown="drop") + ids
        return decode(self.backend, self.cfg, ids, prompt_mel, options.decode_options(self.cfg, self.preset), seed=seed)

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """Waveform ``[samples]`` float32 from a log-mel ``[frames, n_mels]``."""
        if not self.manifest.has_vocoder:
            raise EngineError(f"{self.manifest.directory} was exported without a vocoder (--vocoder none)")
        return self.backend.vocode(mel[None].astype(np.float32))[0]

    def piece_budget(self, prompt_positions: int = 0) -> int:
        """Most text tokens one piece may hold so that it and its speech fit the engine's capacity."""
        frames_per_second = self.preset.sample_rate / self.preset.hop_length
        steps_per_token = MAX_SECONDS_PER_TOKEN * frames_per_second / self.cfg.r
        free = self.backend.capacity - prompt_positions - 1  # 1: the EOS token
        budget = int(free // (1 + steps_per_token))
        if budget < MIN_PIECE_TOKENS:
            raise EngineError(f"the prompt takes {prompt_positions} of the engine's {self.backend.capacity} "
                              "positions, leaving no room for text: use a shorter prompt")
        return budget

    def pieces(self, text: str, prompt_positions: int = 0) -> list[Piece]:
        """``text`` normalised and cut into pieces that fit the engine (see melle_runtime.text_pieces)."""
        budget = self.piece_budget(prompt_positions)

        def fits(piece: str) -> bool:
            try:
                return len(self.tokenizer.encode(piece, on_unknown="drop")) <= budget
            except EmptyTextError:
                return True  # nothing to speak takes no room
        return split_pieces(normalize_text(text), fits)

    def check_speakable(self, text: str, strict: bool) -> None:
        """Warn (``strict``: raise) when ``text`` has characters the voice cannot say."""
        chars = unspeakable_characters(text)
        if not chars:
            return
        message = (f"this voice cannot speak {describe_symbols(chars)}: they are left out or read as names; "
                   "write them out in words")
        if strict:
            raise UnknownSymbolError(message, chars)
        warnings.warn(message, stacklevel=3)

    def speak(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
              options: SynthesisOptions = SynthesisOptions(), progress: Progress | None = None) -> Speech:
        """Speak ``text`` piece by piece (seed + i for piece i), joined by pauses from its punctuation.

        Long text is cut into sentences, then clauses, then words, so every piece fits the engine.
        """
        self.check_speakable(text, options.strict)
        prompt = self.prompt_mel(prompt_wav, prompt_text) if prompt_wav is not None else None
        prompt_positions = 0
        if prompt is not None:
            prompt_positions = len(self.tokenizer.encode(prompt_text, on_unknown="drop")) + len(prompt) // self.cfg.r
        pieces = self.pieces(text, prompt_positions)
        if not pieces:
            raise EmptyTextError(f"nothing to say: the text is empty or has no words ({text[:40]!r})")
        audio, mels, seconds = [], [], 0.0
        for i, piece in enumerate(pieces):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                decoded = self.mel(piece.text, prompt, prompt_text, None if seed is None else seed + i, options)
            for w in caught:
                warnings.warn(f"piece {i + 1} ({piece.text[:40]!r}): {w.message}", stacklevel=2)
            mels.append(decoded.mel)
            audio += [self.vocode(decoded.mel), np.zeros(int(piece.pause_after * self.sample_rate), np.float32)]
            seconds += sum(len(a) for a in audio[-2:]) / self.sample_rate
            if progress:
                progress(i + 1, len(pieces), seconds)
        return Speech(np.concatenate(audio), self.sample_rate, mels, pieces)

    def synthesize(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
                   options: SynthesisOptions = SynthesisOptions()) -> tuple[np.ndarray, int]:
        """Speak ``text``; returns (float32 waveform, sample rate)."""
        speech = self.speak(text, prompt_wav, prompt_text, seed, options)
        return speech.wav, speech.sample_rate
