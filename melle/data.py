"""Training data: a jsonl manifest of (audio, text, speaker), cached mels and tokens,
length-bucketed batches of a frame budget, and the collate that groups frames by r.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from melle.core.audio import get_preset, load_wav
from melle.core.config import MelleConfig
from melle.core.fileio import atomic_path
from melle.mel_torch import mel_spectrogram_torch
from melle.core.text import EOS_ID, PAD_ID, Tokenizer, UnknownSymbolError


@dataclass
class Utterance:
    audio: Path
    text: str
    speaker: str


def read_corpus(path: str | Path) -> list[Utterance]:
    """Rows of a jsonl manifest; relative audio paths are relative to the manifest."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio = Path(row["audio"])
            rows.append(Utterance(audio if audio.is_absolute() else path.parent / audio,
                                  row["text"], row.get("speaker", "")))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path}:{n}: bad manifest row ({err}); each line needs 'audio' and 'text'") from None
    if not rows:
        raise ValueError(f"{path} has no utterances")
    return rows


def silence_level(preset_name: str) -> float:
    """The log-mel value of digital silence for a preset (used to pad frame groups)."""
    preset = get_preset(preset_name)
    return float(np.log(preset.clamp_min) if preset.log_base == "e" else np.log10(preset.clamp_min))


class MelDataset(torch.utils.data.Dataset):
    """Tokens and log-mels ``[frames, n_mels]`` per utterance, computed once into ``cache_dir``."""

    def __init__(self, manifest: str | Path, cfg: MelleConfig, tokenizer: Tokenizer, cache_dir: str | Path,
                 show_progress: bool = True):
        rows = read_corpus(manifest)
        self.preset = get_preset(cfg.mel_preset)
        spec_key = hashlib.sha1(json.dumps(tokenizer.spec(), sort_keys=True).encode()).hexdigest()[:12]
        self.cache_dir = Path(cache_dir) / cfg.mel_preset
        tokens = self._cached_tokens(tokenizer, rows, Path(cache_dir) / f"tokens_{spec_key}.json")
        # A resumed model keeps its tokenizer: text with symbols it never had cannot be trained on.
        unknown = [r.text for r, t in zip(rows, tokens) if t is None]
        if unknown and show_progress:
            print(f"skipping {len(unknown)} of {len(rows)} utterances with symbols the tokenizer does not know "
                  f"(first: {unknown[0]!r})")
        self.rows = [r for r, t in zip(rows, tokens) if t is not None]
        self.tokens = [t for t in tokens if t is not None]
        if not self.rows:
            raise ValueError(f"no utterance of {manifest} can be tokenized by this model's tokenizer")
        self.mel_paths = [self.cache_dir / (hashlib.sha1(str(r.audio.resolve()).encode()).hexdigest()[:16] + ".npy")
                          for r in self.rows]
        todo = [i for i, p in enumerate(self.mel_paths) if not p.exists()]
        for i in tqdm(todo, desc="mel cache", disable=not show_progress or not todo):
            wav = torch.from_numpy(load_wav(self.rows[i].audio, self.preset.sample_rate))
            mel = mel_spectrogram_torch(wav, self.preset)[0].numpy()
            with atomic_path(self.mel_paths[i]) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, mel.astype(np.float32))
        self.n_frames = [int(np.load(p, mmap_mode="r").shape[0]) for p in self.mel_paths]

    @staticmethod
    def _cached_tokens(tokenizer: Tokenizer, rows: list[Utterance], path: Path) -> list[list[int] | None]:
        """Token ids per row (None where the text has symbols the tokenizer lacks), cached in ``path``."""
        cache = json.loads(path.read_text()) if path.exists() else {}
        missing = sorted({r.text for r in rows} - set(cache))
        for text in tqdm(missing, desc="tokenize", disable=not missing):
            try:
                cache[text] = tokenizer.encode(text)
            except UnknownSymbolError:
                cache[text] = None
        if missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(cache))
        return [cache[r.text] for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], np.ndarray]:
        return self.tokens[i], np.load(self.mel_paths[i])


def bucket_batches(lengths: list[int], max_frames: int, seed: int, epoch: int, rank: int = 0,
                   world: int = 1) -> list[list[int]]:
    """Batches of similar-length items whose padded size stays within ``max_frames``.

    Sorted by length inside shuffled buckets, then the batch order shuffled; every rank
    gets the same number of batches (extra ones dropped) so DDP steps stay in lockstep.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > max_frames:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    rng.shuffle(batches)
    per_rank = len(batches) // world
    if per_rank == 0:
        raise ValueError(f"{len(batches)} batches cannot feed {world} ranks: lower the frame budget")
    return batches[rank * per_rank:(rank + 1) * per_rank]


@dataclass
class Batch:
    text: torch.Tensor  # [B, Lx] with EOS, PAD-padded
    text_lens: torch.Tensor  # [B]
    frames: torch.Tensor  # [B, G, r * n_mels] frame groups, silence-padded
    mel: torch.Tensor  # [B, G * r, n_mels] the same frames ungrouped (targets)
    n_frames: torch.Tensor  # [B]
    n_groups: torch.Tensor  # [B]


def collate(items: list[tuple[list[int], np.ndarray]], cfg: MelleConfig) -> Batch:
    """Pad tokens (+EOS) and mels; mels are padded up to whole groups of r frames."""
    r, n_mels = cfg.r, cfg.n_mels
    texts = [list(t) + [EOS_ID] for t, _ in items]
    lx = max(len(t) for t in texts)
    text = torch.full((len(items), lx), PAD_ID, dtype=torch.long)
    for i, t in enumerate(texts):
        text[i, : len(t)] = torch.tensor(t)
    n_frames = [m.shape[0] for _, m in items]
    n_groups = [math.ceil(n / r) for n in n_frames]
    g = max(n_groups)
    mel = torch.full((len(items), g * r, n_mels), silence_level(cfg.mel_preset))
    for i, (_, m) in enumerate(items):
        mel[i, : m.shape[0]] = torch.from_numpy(m)
    return Batch(text, torch.tensor([len(t) for t in texts]), mel.reshape(len(items), g, r * n_mels), mel,
                 torch.tensor(n_frames), torch.tensor(n_groups))
