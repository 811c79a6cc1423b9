"""Audio io and log-mel features, numpy only (the runtime imports this; no torch).

Both presets follow the HiFi-GAN V1 framing (jik876/hifi-gan ``meldataset.py``):
reflect-pad ``(n_fft - hop) / 2`` samples on each side, STFT with ``center=False``,
magnitude ``sqrt(re^2 + im^2 + eps)``, slaney mel filterbank (as
``librosa.filters.mel`` with its defaults), then ``log(clamp(mel, clamp_min))``.
A clip of ``T`` samples therefore gives exactly ``T // hop_length`` frames, so a
frame count maps to ``frames * hop_length`` vocoder samples.

``paper-16k`` is MELLE Appendix A.2 (16 kHz, 1024-point STFT, Hann window 1024,
hop 256, 80 mels over 80-7600 Hz, base-10 log of the magnitude mel). The paper does
not state the padding, the log floor or the filterbank normalisation; we use the
HiFi-GAN conventions above for them so both presets frame audio identically.
(The SpeechT5 vocoder the paper used floors at 1e-10 and centre-pads; a checkpoint
trained on ``paper-16k`` pairs only with a vocoder trained on this same preset.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from melle.core.fileio import atomic_path


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, silent or too short."""


@dataclass(frozen=True)
class MelPreset:
    name: str  # key in PRESETS; stored in the model config and the export manifest
    sample_rate: int  # Hz; audio is resampled to this on load
    n_fft: int  # FFT size in samples
    hop_length: int  # samples between frames
    win_length: int  # Hann window length in samples (<= n_fft, centred in the FFT)
    n_mels: int  # mel channels
    fmin: float  # lowest mel filter edge in Hz
    fmax: float  # highest mel filter edge in Hz
    log_base: str  # "10" (log10) or "e" (natural log)
    clamp_min: float  # mel floor before the log; log(clamp_min) is digital silence
    pad: int  # samples reflect-padded on each side before a center=False STFT
    magnitude_eps: float  # added to re^2 + im^2 before the sqrt (keeps gradients finite)


PRESETS: dict[str, MelPreset] = {
    p.name: p
    for p in (
        MelPreset("paper-16k", 16000, 1024, 256, 1024, 80, 80.0, 7600.0, "10", 1e-5, (1024 - 256) // 2, 1e-9),
        MelPreset("hifigan-22k", 22050, 1024, 256, 1024, 80, 0.0, 8000.0, "e", 1e-5, (1024 - 256) // 2, 1e-9),
    )
}


def get_preset(name: str) -> MelPreset:
    """The mel preset called ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown mel preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _frozen(a: np.ndarray) -> np.ndarray:
    """Mark a cached array read-only so no caller can change it for everyone."""
    a.setflags(write=False)
    return a


# Slaney mel scale (librosa, htk=False): linear below 1 kHz, logarithmic above.
_HZ_PER_MEL = 200.0 / 3
_MIN_LOG_MEL = 1000.0 / _HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / 1000.0) / _LOG_STEP
    return np.where(hz >= 1000.0, log_part, hz / _HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel >= _MIN_LOG_MEL, 1000.0 * np.exp(_LOG_STEP * (mel - _MIN_LOG_MEL)), _HZ_PER_MEL * mel)


@lru_cache(maxsize=8)
def mel_filterbank(preset: MelPreset) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float32 ``[n_mels, n_fft // 2 + 1]``, read-only.

    Equal to ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` (htk=False, norm='slaney').
    """
    fft_hz = np.fft.rfftfreq(preset.n_fft, 1.0 / preset.sample_rate)
    mel_edges = np.linspace(_hz_to_mel(preset.fmin), _hz_to_mel(preset.fmax), preset.n_mels + 2)
    edges_hz = _mel_to_hz(mel_edges)  # [n_mels + 2]: lower, centre, upper of each filter
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, n_freq]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # equal area per filter
    return _frozen(weights.astype(np.float32))


@lru_cache(maxsize=8)
def hann_window(preset: MelPreset) -> np.ndarray:
    """Periodic Hann window (float64, read-only) of ``win_length`` zero-padded to ``n_fft`` as torch.stft does."""
    n = np.arange(preset.win_length)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / preset.win_length)
    left = (preset.n_fft - preset.win_length) // 2
    return _frozen(np.pad(window, (left, preset.n_fft - preset.win_length - left)))


def _log(x: np.ndarray, preset: MelPreset) -> np.ndarray:
    x = np.maximum(x, preset.clamp_min)
    return np.log10(x) if preset.log_base == "10" else np.log(x)


def mel_spectrogram(wav: np.ndarray, preset: MelPreset) -> np.ndarray:
    """Log-mel features of a mono waveform ``[T]``: float32 ``[T // hop_length, n_mels]`` (time first)."""
    # float64 inside: float32 FFT rounding (~1e-7 of the peak) is as large as the
    # magnitude floor on quiet bins, which would make results depend on the FFT library.
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise ValueError(f"mel_spectrogram takes a mono waveform [T], got shape {wav.shape}")
    if wav.shape[0] <= preset.pad:
        raise ValueError(f"waveform of {wav.shape[0]} samples is too short for reflect padding "
                         f"({preset.pad} samples); give at least {preset.pad + 1}")
    padded = np.pad(wav, preset.pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, preset.n_fft)[:: preset.hop_length]  # [F, n_fft]
    spec = np.fft.rfft(frames * hann_window(preset), axis=-1)  # [F, n_freq]
    magnitude = np.sqrt(spec.real**2 + spec.imag**2 + preset.magnitude_eps)
    mel = magnitude @ mel_filterbank(preset).T.astype(np.float64)  # [F, n_mels]
    return _log(mel, preset).astype(np.float32)


def load_wav(path: str | Path, sample_rate: int, *, min_seconds: float = 0.0) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``; ``AudioError`` when it is unusable.

    Multi-channel audio is averaged to mono (with a warning); other rates are resampled.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist; check the path")
    try:
        data, file_rate = sf.read(path, dtype="float32", always_2d=True)  # [T, channels]
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise AudioError(f"cannot read audio file {path} ({err}); "
                         "convert it to WAV or FLAC (e.g. with ffmpeg)") from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} contains no samples; re-record or re-export it")
    if data.shape[1] > 1:
        warnings.warn(f"{path}: {data.shape[1]} channels downmixed to mono", stacklevel=2)
    wav = data.mean(axis=1)
    if file_rate != sample_rate:
        wav = soxr.resample(wav, file_rate, sample_rate)
    peak = float(np.max(np.abs(wav)))
    if peak < 1e-4:
        raise AudioError(f"audio file {path} is silent (peak {peak:.1e} < 1e-4); "
                         "check the recording level or pick another file")
    seconds = wav.shape[0] / sample_rate
    if seconds < min_seconds:
        raise AudioError(f"audio file {path} lasts {seconds:.2f} s, shorter than the "
                         f"{min_seconds:.2f} s needed; use a longer clip")
    return np.ascontiguousarray(wav, dtype=np.float32)


# Output formats by file extension: (soundfile format, subtype). Every one is written by
# libsndfile through soundfile (MP3 needs libsndfile >= 1.1, bundled with soundfile's wheels).
AUDIO_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def audio_format(path: str | Path) -> tuple[str, str]:
    """(format, subtype) soundfile writes for ``path``'s extension; AudioError for others."""
    suffix = Path(path).suffix.lower()
    if suffix not in AUDIO_FORMATS:
        raise AudioError(f"cannot write {suffix or 'files without an extension'} ({path}): "
                         f"name the output {', '.join(AUDIO_FORMATS)}")
    kind, subtype = AUDIO_FORMATS[suffix]
    if kind not in sf.available_formats():
        raise AudioError(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {kind}; "
                         "upgrade soundfile or write .wav/.flac")
    return kind, subtype


def save_audio(path: str | Path, wav: np.ndarray, sample_rate: int) -> None:
    """Write a mono float waveform in [-1, 1] in the format ``path``'s extension names (see
    ``AUDIO_FORMATS``); readers never see a partial file."""
    kind, subtype = audio_format(path)
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"save_audio takes a mono waveform [T], got shape {wav.shape}")
    with atomic_path(path) as tmp:
        # The temp name ends in .tmp, so the format is given explicitly; clip so PCM never wraps.
        sf.write(tmp, np.clip(wav, -1.0, 1.0), sample_rate, subtype=subtype, format=kind)
