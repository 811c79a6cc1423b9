"""Write a random-initialised checkpoint: ``python -m melle.init --preset tiny --seed 0 --out DIR``.

Used by tests, export tests and benchmarks (weights do not change the cost of a step).
"""

from __future__ import annotations

import argparse
import string
import sys

import torch

from melle.checkpoint import save_checkpoint
from melle.core.cli import run_cli
from melle.core.fileio import check_output_dir
from melle.core.config import PRESETS, preset_config
from melle.model import Melle, count_parameters
from melle.core.text import build_tokenizer

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
    parser.add_argument("--out", required=True, help="checkpoint directory to write (new or empty)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it holds other files (a trained checkpoint, say)")
    args = parser.parse_args(argv)
    if args.r is not None and not 1 <= args.r <= 5:
        parser.error(f"--r must be 1..5 (the paper's reduction factors), got {args.r}")
    # A random model must never replace a trained one: any non-empty folder needs --force.
    check_output_dir(args.out, "a new random checkpoint", None, force=args.force)
    overrides = {"r": args.r} if args.r else {}
    model = random_model(args.preset, args.seed, **overrides)
    save_checkpoint(args.out, model)
    print(f"wrote {args.out}: preset {args.preset}, r={model.cfg.r}, {count_parameters(model) / 1e6:.2f}M parameters")


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
