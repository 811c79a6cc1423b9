"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ trainer files to resume).

Writes build the whole directory beside the target, read it back, and only then
swap it into place, so a crash or a full disk never replaces a good checkpoint
with a broken one.

The trainer state is data only, never a pickle: ``trainer.json`` (step, place in the epoch,
minutes, settings, optimizer hyper-parameters) and ``optimizer.safetensors`` (the optimizer's
per-parameter tensors and the torch RNG state). A ``trainer.pt`` written by older versions is
still read, with ``torch.load(weights_only=True)``, and the next save replaces it; convert one
without training: ``python -m melle.checkpoint convert DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from melle.core.cli import ExitCode, run_cli
from melle.core.config import ConfigError, MelleConfig
from melle.core.fileio import atomic_dir, current_umask
from melle.model import Melle

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.json"  # step, epoch, settings, optimizer hyper-parameters: only needed to resume
OPTIMIZER_FILE = "optimizer.safetensors"  # optimizer tensors per parameter and the RNG state
LEGACY_TRAINER_FILE = "trainer.pt"  # the pickle older versions wrote: read only to convert or resume
TRAINER_FORMAT_VERSION = 1
RNG_TENSOR = "torch_rng"
REQUIRED_TRAINER_KEYS = ("step", "epoch", "batch_in_epoch", "minutes", "optimizer", RNG_TENSOR)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with what is wrong and what to do."""


def save_checkpoint(path: str | Path, model: Melle, trainer_state: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32, extra_files: dict[str, str] | None = None) -> None:
    """Write ``model`` (weights cast to ``dtype``) and its config to the directory ``path``, atomically.

    ``trainer_state`` (see :func:`load_trainer_state`) is written beside them for resuming;
    ``extra_files`` maps file names to text written beside them (e.g. a training log).
    """
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        model.cfg.save(tmp / CONFIG_FILE)
        save_tensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if trainer_state is not None:
            write_trainer_state(tmp, trainer_state)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        load_checkpoint(tmp)  # refuse to publish what cannot be read back


def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """``save_file``, with the permissions the umask asks for (safetensors itself creates 0600)."""
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, 0o666 & ~current_umask())


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
    """The state saved for resuming, or None when the checkpoint has none.

    A dict with ``optimizer`` (a torch optimizer state dict), ``torch_rng`` (the CPU RNG
    state), ``step``, ``epoch``, ``batch_in_epoch``, ``minutes`` and, where the run saved
    them, ``n_utterances`` and ``train_config``. Reads the current files, else a legacy
    ``trainer.pt`` (without running any code it may hold).
    """
    path = Path(path)
    if (path / TRAINER_FILE).exists():
        state = _read_trainer_files(path)
    elif (path / LEGACY_TRAINER_FILE).exists():
        state = _read_legacy_trainer_file(path / LEGACY_TRAINER_FILE)
    else:
        return None
    missing = [key for key in REQUIRED_TRAINER_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: the trainer state lacks {', '.join(missing)}; "
                              f"delete {TRAINER_FILE}, {OPTIMIZER_FILE} or {LEGACY_TRAINER_FILE} to restart the optimizer")
    return state


def write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as ``trainer.json`` + ``optimizer.safetensors`` in ``directory`` and check
    that it reads back exactly."""
    info, tensors = _split_trainer_state(state)
    (directory / TRAINER_FILE).write_text(json.dumps(info, indent=1, allow_nan=False) + "\n")
    save_tensors(tensors, directory / OPTIMIZER_FILE)
    if not _same_trainer_state(load_trainer_state(directory), state):
        raise CheckpointError(f"the trainer state written to {directory} does not read back as it was; "
                              "nothing was replaced")


def convert_legacy_checkpoint(path: str | Path) -> bool:
    """Replace a checkpoint's ``trainer.pt`` with ``trainer.json`` + ``optimizer.safetensors``, atomically.

    Every other file is kept as it is. False when there was no ``trainer.pt`` to convert.
    """
    path = Path(path)
    load_checkpoint(path)  # a directory that is no good checkpoint is not ours to rewrite
    if not (path / LEGACY_TRAINER_FILE).exists():
        return False
    if (path / TRAINER_FILE).exists():
        raise CheckpointError(f"{path} holds both {LEGACY_TRAINER_FILE} and {TRAINER_FILE}; the run resumes from "
                              f"{TRAINER_FILE}: delete {LEGACY_TRAINER_FILE} if that is the one you want")
    state = _read_legacy_trainer_file(path / LEGACY_TRAINER_FILE)
    with atomic_dir(path) as tmp:
        shutil.copytree(path, tmp, dirs_exist_ok=True, ignore=lambda _, names: [LEGACY_TRAINER_FILE])
        write_trainer_state(tmp, state)
        load_checkpoint(tmp)
    return True


def _split_trainer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A trainer state as its json part and its tensors (named ``optimizer.<param>.<name>``)."""
    tensors = {RNG_TENSOR: state[RNG_TENSOR]}
    for param, values in state["optimizer"]["state"].items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):  # AdamW keeps only tensors (step too)
                raise TypeError(f"optimizer state {name!r} of parameter {param} is not a tensor: {value!r}")
            tensors[f"optimizer.{param}.{name}"] = value
    info = {"format_version": TRAINER_FORMAT_VERSION,
            **{k: v for k, v in state.items() if k not in ("optimizer", RNG_TENSOR)},
            "optimizer_param_groups": state["optimizer"]["param_groups"]}
    return info, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _join_trainer_state(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`_split_trainer_state`."""
    state = {k: v for k, v in info.items() if k not in ("format_version", "optimizer_param_groups")}
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key != RNG_TENSOR:
            _, param, name = key.split(".", 2)
            per_param.setdefault(int(param), {})[name] = value
    # json has no tuples: give hyper-parameters such as betas back the type torch wrote.
    groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in group.items()}
              for group in info["optimizer_param_groups"]]
    state["optimizer"] = {"state": dict(sorted(per_param.items())), "param_groups": groups}
    state[RNG_TENSOR] = tensors[RNG_TENSOR]
    return state


def _read_trainer_files(path: Path) -> dict[str, Any]:
    """The trainer state from ``trainer.json`` + ``optimizer.safetensors``."""
    restart = f"delete {TRAINER_FILE} and {OPTIMIZER_FILE} to restart the optimizer"
    if not (path / OPTIMIZER_FILE).exists():
        raise CheckpointError(f"{path} has {TRAINER_FILE} but no {OPTIMIZER_FILE}; {restart}")
    try:
        info = json.loads((path / TRAINER_FILE).read_text())
        tensors = load_file(str(path / OPTIMIZER_FILE))
    except (SafetensorError, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: the trainer state is corrupt ({err}); {restart}") from None
    version = info.get("format_version") if isinstance(info, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path / TRAINER_FILE} is not a melle trainer state; {restart}")
    if version > TRAINER_FORMAT_VERSION:
        raise CheckpointError(f"{path / TRAINER_FILE} has format {version}, newer than this melle "
                              f"({TRAINER_FORMAT_VERSION}); update melle-rt")
    try:
        return _join_trainer_state(info, tensors)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the trainer state is malformed ({err!r}); {restart}") from None


def _read_legacy_trainer_file(file: Path) -> dict[str, Any]:
    """A ``trainer.pt`` pickle, read with torch's restricted unpickler: data, never code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or unsafe pickle
        raise CheckpointError(f"{file} is corrupt or holds more than plain data ({err}); "
                              "delete it to restart the optimizer") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is not a melle trainer state; delete it to restart the optimizer")
    return state


def _same_trainer_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two trainer states hold the same values (tensors bit for bit, json alike)."""
    (info_a, tensors_a), (info_b, tensors_b) = _split_trainer_state(a), _split_trainer_state(b)
    return (_as_json(info_a) == _as_json(info_b) and tensors_a.keys() == tensors_b.keys()
            and all(tensors_a[k].dtype == tensors_b[k].dtype and torch.equal(tensors_a[k], tensors_b[k])
                    for k in tensors_a))


def _as_json(value: Any) -> Any:
    """``value`` as json reads it back: tuples become lists, so both compare alike."""
    return json.loads(json.dumps(value))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m melle.checkpoint", description="Checkpoint maintenance.")
    commands = p.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help=f"rewrite a legacy {LEGACY_TRAINER_FILE} as {TRAINER_FILE} + "
                                  f"{OPTIMIZER_FILE} (no pickle), in place; the other files stay as they are")
    convert.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint directory")
    args = p.parse_args(argv)
    for directory in args.dirs:
        if convert_legacy_checkpoint(directory):
            print(f"{directory}: {LEGACY_TRAINER_FILE} -> {TRAINER_FILE} + {OPTIMIZER_FILE}")
        else:
            print(f"{directory}: no {LEGACY_TRAINER_FILE}, nothing to convert")


def cli() -> None:
    """Entry point: a bad checkpoint is one line on stderr and exit code 4 (melle.core.cli)."""
    sys.exit(run_cli(main, {CheckpointError: ExitCode.MODEL}))


if __name__ == "__main__":
    cli()
