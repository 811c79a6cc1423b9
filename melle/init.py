"""Write a random-initialised checkpoint: ``python -m melle.init --preset tiny --seed 0 --out DIR``.

Used by tests, export tests and benchmarks (weights do not change the cost of a step).
"""

from __future__ import annotations

import argparse
import string

import torch

from melle.checkpoint import save_checkpoint
from melle.config import PRESETS, preset_config
from melle.model import Melle, count_parameters
from melle.text import build_tokenizer

# Enough symbols for English text through the chars tokenizer.
DEFAULT_ALPHABET = string.ascii_lowercase + " ,.!?;:'-"


def random_model(preset: str, seed: int, **overrides) -> Melle:
    """A ``Melle`` of ``preset`` with seeded random weights and a chars tokenizer (unless overridden)."""
    if "tokenizer" not in overrides:
        tokenizer = build_tokenizer("chars", [DEFAULT_ALPHABET])
        overrides.update(tokenizer=tokenizer.spec(), n_text_vocab=tokenizer.vocab_size)
    torch.manual_seed(seed)
    return Melle(preset_config(preset, **overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r", type=int, help="reduction factor (default: the preset's)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    args = parser.parse_args(argv)
    overrides = {"r": args.r} if args.r else {}
    model = random_model(args.preset, args.seed, **overrides)
    save_checkpoint(args.out, model)
    print(f"wrote {args.out}: preset {args.preset}, r={model.cfg.r}, {count_parameters(model) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
