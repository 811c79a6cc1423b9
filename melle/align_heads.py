"""Which attention heads of a checkpoint align speech with text, and (``--write``) record them.

Alignment-guided decoding reads the text position from the heads named in the config's
``guided_heads``. Training names every head it put the guided-attention loss on, but not all of
them learn a diagonal (layer 0 of the demo voice never does: it sees only embeddings). This tool
measures each head teacher-forced on held-out recordings, as the share of its text attention
within a band of the diagonal, and ``--write`` keeps the heads at or above ``--threshold``::

    python -m melle.align_heads demo/checkpoint --manifest corpus/joe/test.jsonl --write
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from melle.checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint
from melle.core.cli import ExitCode, UserError, run_cli
from melle.core.text import tokenizer_from_spec
from melle.data import MelDataset, collate
from melle.losses import head_alignment


@torch.no_grad()
def measure(model, manifest: str, limit: int, band: float) -> torch.Tensor:
    """Per layer and head ``[n_layer, n_head]``: diagonal share over the first ``limit`` utterances."""
    with tempfile.TemporaryDirectory() as cache:
        data = MelDataset(manifest, model.cfg, tokenizer_from_spec(model.cfg.tokenizer), cache, show_progress=False)
        batch = collate([data[i] for i in range(min(limit, len(data)))], model.cfg)
    layers = tuple(range(model.cfg.n_layer))
    torch.manual_seed(0)  # the pre-net dropout masks (on, as at inference): the same figures every run
    out = model.eval()(batch.text, batch.text_lens, batch.frames, batch.n_groups, attention_layers=layers)
    return head_alignment(out.attention, batch.text_lens, batch.n_groups, band)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--manifest", required=True, help="held-out corpus jsonl (recordings and their text)")
    p.add_argument("--limit", type=int, default=16, help="utterances measured (default: %(default)s)")
    p.add_argument("--band", type=float, default=0.1, help="diagonal band, in fractions of the text and speech")
    p.add_argument("--threshold", type=float, default=0.9, help="share a head needs to count as aligned")
    p.add_argument("--write", action="store_true", help="record the aligned heads as the config's guided_heads")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error(f"--limit must be at least 1, got {args.limit}")
    try:
        model = load_checkpoint(args.ckpt)
    except CheckpointError as err:
        raise UserError(str(err), ExitCode.MODEL) from None
    try:
        scores = measure(model, args.manifest, args.limit, args.band)
    except (OSError, ValueError) as err:
        raise UserError(f"--manifest {args.manifest}: {err}", ExitCode.INPUT) from None
    aligned = [[layer, head] for layer, row in enumerate(scores.tolist()) for head, share in enumerate(row)
               if share >= args.threshold]
    for layer, row in enumerate(scores.tolist()):
        print(f"layer {layer}: " + "  ".join(f"head {h} {share:.3f}" for h, share in enumerate(row)))
    print(f"aligned (>= {args.threshold}): {aligned}; config guided_heads: {model.cfg.guided_heads}")
    if args.write:
        if not aligned:
            raise UserError(f"no head reaches {args.threshold}: nothing to guide by (train with --guided-weight, "
                            "or lower --threshold)", ExitCode.MODEL)
        model.cfg.guided_heads = aligned
        model.cfg.save(Path(args.ckpt) / CONFIG_FILE)
        print(f"wrote guided_heads {aligned} to {Path(args.ckpt) / CONFIG_FILE}")


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
