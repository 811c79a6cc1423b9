"""The one model configuration: sizes, reduction factor, mel preset and tokenizer.

Saved as ``config.json`` beside ``model.safetensors``, copied into every export
manifest, and read back by the exporter and the runtime: nothing downstream
retypes a size. This module imports no torch (the runtime reads it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bumped when a field changes meaning or is added; older readers refuse newer files.
# 2: guided_heads.
FORMAT_VERSION = 2

N_SPECIAL_TOKENS = 2  # PAD and EOS, see melle.core.text


class ConfigError(ValueError):
    """A config that cannot be used: unknown field, bad value or newer format."""


@dataclass
class MelleConfig:
    format_version: int = FORMAT_VERSION
    # Decoder-only Transformer LM (pre-LN).
    n_layer: int = 12  # Transformer blocks
    n_head: int = 16  # attention heads per block
    d_model: int = 1024  # residual stream width
    d_ffn: int = 4096  # feed-forward hidden width
    dropout: float = 0.1  # residual/attention dropout during training only
    max_len: int = 2048  # positions (text + prompt + frame groups) one sequence may hold
    positions: str = "sinusoidal"  # "sinusoidal" or "learned" absolute positions
    # Mel pre-net: Linear-ReLU-Dropout, Linear-ReLU-Dropout, Linear -> d_model.
    prenet_dim: int = 256  # hidden width of the two dropout layers
    prenet_dropout: float = 0.5  # kept ON at inference: the masks are explicit inputs
    # Frames.
    n_mels: int = 80  # mel channels per frame
    r: int = 1  # reduction factor: frames consumed and predicted per step (1..5)
    mel_preset: str = "hifigan-22k"  # see melle.core.audio.PRESETS; pairs model and vocoder
    # Latent sampling module: Linear(e) -> (mu, logvar); y' = z + MLP3(z).
    latent_mlp_dim: int = 256  # hidden width of the residual MLP
    # Post-net: n conv blocks over the whole y' sequence, residual.
    postnet_layers: int = 5
    postnet_channels: int = 256
    postnet_kernel: int = 5
    # Text: the tokenizer spec (melle.core.text.tokenizer_from_spec) travels with the model.
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "chars", "symbols": []})
    n_text_vocab: int = 256  # embedding rows, including PAD and EOS
    # [layer, head] pairs trained with the guided-attention loss: their attention over the text is
    # near-diagonal, so it tells where in the text a decode is (alignment-guided decoding).
    guided_heads: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"config format version {self.format_version} is newer than this melle "
                f"({FORMAT_VERSION}); upgrade melle-rt to read this checkpoint"
            )
        if not 1 <= self.r <= 5:
            raise ConfigError(f"reduction factor r must be in 1..5, got {self.r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.positions not in ("sinusoidal", "learned"):
            raise ConfigError(f"positions must be 'sinusoidal' or 'learned', got {self.positions!r}")
        if self.postnet_kernel % 2 == 0:
            raise ConfigError(f"postnet_kernel must be odd to keep length, got {self.postnet_kernel}")
        if self.n_text_vocab <= N_SPECIAL_TOKENS:
            raise ConfigError(f"n_text_vocab must exceed {N_SPECIAL_TOKENS}, got {self.n_text_vocab}")
        for pair in self.guided_heads:
            if not (len(pair) == 2 and 0 <= pair[0] < self.n_layer and 0 <= pair[1] < self.n_head):
                raise ConfigError(f"guided_heads entries are [layer, head] with layer < {self.n_layer} and "
                                  f"head < {self.n_head}, got {pair}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def guided_heads_of(self, layer: int) -> list[int]:
        """The guided heads of ``layer`` (often none)."""
        return [head for at, head in self.guided_heads if at == layer]

    @property
    def frame_dim(self) -> int:
        """Width of one step's frame group: r frames of n_mels."""
        return self.r * self.n_mels

    @property
    def postnet_context(self) -> int:
        """Frames on each side of a y' frame that its y'' depends on (the post-net's receptive radius)."""
        return self.postnet_layers * (self.postnet_kernel // 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MelleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            version = data.get("format_version", FORMAT_VERSION)
            hint = "it comes from a newer melle-rt" if version > FORMAT_VERSION else "check the file"
            raise ConfigError(f"unknown config fields {unknown}: {hint}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from melle.core.fileio import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MelleConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config at {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from None
        return cls.from_dict(data)


PRESETS: dict[str, dict[str, Any]] = {
    # Tests: well under 1M parameters, fast on CPU.
    "tiny": dict(n_layer=2, n_head=2, d_model=64, d_ffn=128, max_len=512, prenet_dim=32,
                 latent_mlp_dim=64, postnet_layers=3, postnet_channels=32),
    # Demo voice: trainable on a 2-core CPU in hours (~7M parameters).
    "small": dict(n_layer=6, n_head=4, d_model=256, d_ffn=1024, max_len=1536, prenet_dim=256,
                  latent_mlp_dim=256, postnet_layers=5, postnet_channels=128, r=4),
    # The paper (section 4.2): 12 layers, 16 heads, 1024 wide, FFN 4096.
    "paper": dict(n_layer=12, n_head=16, d_model=1024, d_ffn=4096, max_len=2048),
}


def preset_config(name: str, **overrides: Any) -> MelleConfig:
    """A config from a named preset with field overrides (e.g. r, tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MelleConfig(**{**PRESETS[name], **overrides})
