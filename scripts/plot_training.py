"""Plot a training log: ``python scripts/plot_training.py runs/demo/train_log.csv --out DIR``.

Writes ``DIR/training_curve.png`` (losses and alignment score against steps) and a copy
of the csv, so a run's progress can be committed without its checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSSES = ["reg", "kl", "flux", "stop", "guided"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="train_log.csv written by melle.train")
    p.add_argument("--out", required=True, help="directory for training_curve.png and train_log.csv")
    args = p.parse_args(argv)
    with open(args.log) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{args.log} has no rows yet")
    steps = [int(r["step"]) for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in LOSSES:
        top.plot(steps, [float(r[name]) for r in rows], label=name)
    top.set(yscale="symlog", ylabel="loss term", title=f"training: {steps[-1]} steps, "
                                                      f"{float(rows[-1]['minutes']):.0f} min")
    top.legend(ncol=5, fontsize=8)
    bottom.plot(steps, [float(r["align"]) for r in rows], color="black")
    bottom.set(xlabel="step", ylabel="alignment score", ylim=(0, 1))
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "training_curve.png", dpi=100)
    shutil.copyfile(args.log, out / "train_log.csv")
    print(f"wrote {out / 'training_curve.png'}")


if __name__ == "__main__":
    main()
