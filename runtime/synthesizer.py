"""The Python API: ``Synthesizer(engine_dir).synthesize(text) -> (waveform, sample_rate)``.

Text -> tokens (melle.text), optional prompt wav -> mel (melle.audio, numpy), the shared
decode loop (melle.decoding) over a runtime backend, then the vocoder graph.
Imports no torch.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from melle.audio import get_preset, load_wav, mel_spectrogram
from melle.decoding import Decoded, DecodeOptions, decode
from melle.text import EmptyTextError, normalize_text, tokenizer_from_spec
from melle_runtime.manifest import EngineError, read_manifest
from melle_runtime.ort_backend import OrtBackend, available_providers, make_session

BACKENDS = ("ort-cpu", "ort-cpu-int8", "ort-cuda", "trt")
MIN_PROMPT_SECONDS = 0.5
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


@dataclass(frozen=True)
class SynthesisOptions:
    candidates: int = 1  # sample N per sentence, keep the best
    max_seconds: float = 30.0  # cap per sentence; reaching it without a stop is reported
    pause_seconds: float = 0.25  # silence between sentences of a long text
    stop_threshold: float = 0.5

    def decode_options(self, cfg, preset) -> DecodeOptions:
        """The decode loop's options for a model ``cfg`` whose frames follow mel ``preset``."""
        frames_per_second = preset.sample_rate / preset.hop_length
        max_steps = max(1, math.ceil(self.max_seconds * frames_per_second / cfg.r))
        return DecodeOptions(stop_threshold=self.stop_threshold, max_steps=max_steps, candidates=self.candidates)


@dataclass
class Speech:
    wav: np.ndarray  # float32 [samples]
    sample_rate: int
    mels: list[np.ndarray]  # refined log-mel [frames, n_mels] per sentence


def split_sentences(text: str) -> list[str]:
    """Sentences of a long text (split after . ! ? ;), empty pieces dropped."""
    return [s.strip() for s in SENTENCE_END.split(text.strip()) if s.strip()]


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
    """Speech from an engine directory on ONNX Runtime (CPU/CUDA) or TensorRT."""

    def __init__(self, engine_dir, backend: str = "ort-cpu", threads: int | None = None):
        self.manifest = read_manifest(engine_dir)
        self.cfg = self.manifest.config
        self.preset = get_preset(self.cfg.mel_preset)
        self.tokenizer = tokenizer_from_spec(self.cfg.tokenizer)
        self.backend = make_backend(self.manifest, backend, threads)
        self.vocoder = None
        if self.manifest.has_vocoder and backend != "trt":  # the TensorRT backend has its own vocoder engine
            device = "cuda" if backend == "ort-cuda" else "cpu"
            self.vocoder = make_session(self.manifest.graph_path("vocoder"), available_providers(device), threads)

    @property
    def sample_rate(self) -> int:
        return self.preset.sample_rate

    def prompt_mel(self, prompt_wav, prompt_text: str | None) -> np.ndarray:
        """Log-mel ``[frames, n_mels]`` of a prompt recording, checked for use as a prompt."""
        if not prompt_text or not prompt_text.strip():
            raise EmptyTextError("a prompt wav needs its transcript: pass --prompt-text / prompt_text")
        wav = load_wav(prompt_wav, self.preset.sample_rate, min_seconds=MIN_PROMPT_SECONDS)
        return mel_spectrogram(wav, self.preset)

    def mel(self, text: str, prompt_mel: np.ndarray | None = None, prompt_text: str | None = None,
            seed: int | None = None, options: SynthesisOptions = SynthesisOptions()) -> Decoded:
        """Decode one sentence to mel frames (prompt transcript prepended when prompting)."""
        ids = self.tokenizer.encode(text, on_unknown="drop")
        if prompt_mel is not None:
            ids = self.tokenizer.encode(prompt_text, on_unknown="drop") + ids
        return decode(self.backend, self.cfg, ids, prompt_mel, options.decode_options(self.cfg, self.preset), seed=seed)

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """Waveform ``[samples]`` float32 from a log-mel ``[frames, n_mels]``."""
        if not self.manifest.has_vocoder:
            raise EngineError(f"{self.manifest.directory} was exported without a vocoder (--vocoder none)")
        mel = mel[None].astype(np.float32)
        if self.vocoder is None:
            return self.backend.vocode(mel)[0]
        return self.vocoder.run(None, {"mel": mel})[0][0]

    def speak(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
              options: SynthesisOptions = SynthesisOptions()) -> Speech:
        """Speak ``text`` sentence by sentence (seed + i for sentence i), joined by short pauses."""
        sentences = split_sentences(normalize_text(text))  # "Dr." and "3.5" must not end a sentence
        if not sentences:
            raise EmptyTextError("nothing to say: the text is empty")
        prompt = self.prompt_mel(prompt_wav, prompt_text) if prompt_wav is not None else None
        pause = np.zeros(int(options.pause_seconds * self.sample_rate), np.float32)
        pieces, mels = [], []
        for i, sentence in enumerate(sentences):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                decoded = self.mel(sentence, prompt, prompt_text, None if seed is None else seed + i, options)
            for w in caught:
                warnings.warn(f"sentence {i + 1} ({sentence[:40]!r}): {w.message}", stacklevel=2)
            mels.append(decoded.mel)
            pieces += [self.vocode(decoded.mel), pause]
        return Speech(np.concatenate(pieces[:-1]), self.sample_rate, mels)

    def synthesize(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
                   options: SynthesisOptions = SynthesisOptions()) -> tuple[np.ndarray, int]:
        """Speak ``text``; returns (float32 waveform, sample rate)."""
        speech = self.speak(text, prompt_wav, prompt_text, seed, options)
        return speech.wav, speech.sample_rate
