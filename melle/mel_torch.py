"""Batched log-mel features in torch (training and data caching); same numbers as ``melle.core.audio``."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from melle.core.audio import MelPreset, hann_window, mel_filterbank


@lru_cache(maxsize=16)
def _constants(preset: MelPreset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The preset's window ``[n_fft]`` and filterbank ``[n_mels, n_freq]`` on ``device``."""
    window = torch.from_numpy(hann_window(preset).copy()).to(device, torch.float64)
    basis = torch.from_numpy(mel_filterbank(preset).copy()).to(device, torch.float64)
    return window, basis


def mel_spectrogram_torch(wav: torch.Tensor, preset: MelPreset) -> torch.Tensor:
    """Log-mel features of waveforms ``[B, T]`` or ``[T]``: float32 ``[B, T // hop_length, n_mels]``.

    Computed in float64 like ``melle.core.audio.mel_spectrogram`` so quiet bins agree too.
    """
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"mel_spectrogram_torch takes [B, T] or [T], got shape {tuple(wav.shape)}")
    window, basis = _constants(preset, wav.device)
    # 1-D reflect padding needs a channel axis: [B, 1, T + 2 * pad] -> [B, T + 2 * pad].
    padded = F.pad(wav.double().unsqueeze(1), (preset.pad, preset.pad), mode="reflect").squeeze(1)
    # The window is already zero-padded to n_fft, so win_length is n_fft here.
    spec = torch.stft(padded, preset.n_fft, hop_length=preset.hop_length, window=window,
                      center=False, onesided=True, return_complex=True)  # [B, n_freq, frames]
    magnitude = torch.sqrt(spec.real**2 + spec.imag**2 + preset.magnitude_eps)
    mel = torch.matmul(basis, magnitude).clamp_min(preset.clamp_min)  # [B, n_mels, frames]
    log_mel = torch.log10(mel) if preset.log_base == "10" else torch.log(mel)
    return log_mel.transpose(1, 2).float()  # [B, frames, n_mels]
