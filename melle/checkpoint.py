"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ ``trainer.pt`` to resume).

Writes build the whole directory beside the target, read it back, and only then
swap it into place, so a crash or a full disk never replaces a good checkpoint
with a broken one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from melle.config import ConfigError, MelleConfig
from melle.fileio import atomic_dir
from melle.model import Melle

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"  # optimizer, scheduler and step: only needed to resume


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with what is wrong and what to do."""


def save_checkpoint(path: str | Path, model: Melle, trainer_state: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32, extra_files: dict[str, str] | None = None) -> None:
    """Write ``model`` (weights cast to ``dtype``) and its config to the directory ``path``, atomically.

    ``extra_files`` maps file names to text written beside them (e.g. a training log).
    """
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        model.cfg.save(tmp / CONFIG_FILE)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        load_checkpoint(tmp)  # refuse to publish what cannot be read back


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Melle:
    """Rebuild the model from a checkpoint directory (float32, eval mode)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = MelleConfig.load(path / CONFIG_FILE)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}; was it written by melle.init or melle.train?")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{weights} is corrupt ({err}); restore it from a good copy") from None
    model = Melle(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing tensors {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tensors[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{weights} has tensors of the wrong shape for its config: {wrong[:3]}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device).eval()


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """The optimizer/scheduler/step saved for resuming, or None when the checkpoint has none."""
    file = Path(path) / TRAINER_FILE
    if not file.exists():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged pickle
        raise CheckpointError(f"{file} is corrupt ({err}); delete it to restart the optimizer") from None
