"""Plot a training log: ``python scripts/plot_training.py runs/demo/train_log.csv --out DIR
[--probe STEP=quality.json ...]``.

Writes ``DIR/training_curve.png`` (losses and alignment score against steps) and a copy
of the csv, so a run's progress can be committed without its checkpoints. Each ``--probe``
is a ``benchmarks/quality.py`` result for the checkpoint saved at STEP; their WER and speaker
similarity join the plot and ``DIR/probes.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from melle.core.fileio import write_text_atomic  # noqa: E402

LOSSES = ["reg", "kl", "flux", "stop", "guided"]
PROBE_FIELDS = ["step", "system", "n", "wer", "sim", "source"]
CHECKPOINT_SYSTEMS = ("runtime", "reference", "teacher_forced")  # quality.py systems that change with the step


def read_probe(spec: str) -> list[dict]:
    """``STEP=PATH`` -> one row per synthesised system in that quality.json."""
    step, sep, path = spec.partition("=")
    if not sep or not step.isdigit():
        raise SystemExit(f"--probe wants STEP=PATH (e.g. 5389=probes/5389/quality.json), got {spec!r}")
    systems = json.loads(Path(path).read_text())["systems"]
    return [{"step": int(step), "system": name, "n": s["n"], "wer": s["wer"], "sim": s["sim"], "source": path}
            for name, s in systems.items() if name in CHECKPOINT_SYSTEMS]


def probes_in(folder: Path) -> list[str]:
    """``STEP=PATH`` for each probe result in ``folder``, by step."""
    if not folder.is_dir():
        raise SystemExit(f"--probe-dir {folder} is not a directory")
    found = {}
    for path in [*folder.glob("step*.json"), *folder.glob("step*/quality.json")]:
        name = path.stem if path.suffix == ".json" and path.name != "quality.json" else path.parent.name
        if name[4:].isdigit():
            found[int(name[4:])] = path
    return [f"{step}={path}" for step, path in sorted(found.items())]


def write_probes(rows: list[dict], path: Path) -> None:
    lines = [",".join(PROBE_FIELDS)]
    lines += [",".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in PROBE_FIELDS)
              for r in sorted(rows, key=lambda r: (r["step"], r["system"]))]
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="train_log.csv written by melle.train")
    p.add_argument("--out", required=True, help="directory for training_curve.png and train_log.csv")
    p.add_argument("--probe", action="append", default=[], metavar="STEP=QUALITY_JSON",
                   help="a quality.py result of the checkpoint at STEP (repeatable)")
    p.add_argument("--probe-dir", action="append", default=[], metavar="DIR",
                   help="every DIR/stepN.json and DIR/stepN/quality.json (melle.train --probe-every) as a probe")
    args = p.parse_args(argv)
    args.probe += [spec for folder in args.probe_dir for spec in probes_in(Path(folder))]
    with open(args.log) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{args.log} has no rows yet")
    probes = [row for spec in args.probe for row in read_probe(spec)]
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(3 if probes else 2, 1, figsize=(9, 10 if probes else 7), sharex=True)
    top, middle = axes[0], axes[1]
    for name in LOSSES:
        top.plot(steps, [float(r[name]) for r in rows], label=name)
    top.set(yscale="symlog", ylabel="loss term", title=f"training: {steps[-1]} steps, "
                                                      f"{float(rows[-1]['minutes']):.0f} min")
    top.legend(ncol=5, fontsize=8)
    middle.plot(steps, [float(r["align"]) for r in rows], color="black")
    middle.set(ylabel="alignment score", ylim=(0, 1))
    middle.grid(alpha=0.3)
    if probes:
        bottom = axes[2]
        for system in sorted({r["system"] for r in probes}):
            mine = sorted((r for r in probes if r["system"] == system), key=lambda r: r["step"])
            bottom.plot([r["step"] for r in mine], [100 * r["wer"] for r in mine], "o-", label=f"{system} WER %")
            bottom.plot([r["step"] for r in mine], [100 * r["sim"] for r in mine], "s--", label=f"{system} SIM x100")
        bottom.set(ylabel="held-out sentences", ylim=(0, None))
        bottom.legend(fontsize=8)
        bottom.grid(alpha=0.3)
    axes[-1].set(xlabel="step")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "training_curve.png", dpi=100)
    shutil.copyfile(args.log, out / "train_log.csv")
    if probes:
        write_probes(probes, out / "probes.csv")
    print(f"wrote {out / 'training_curve.png'}")


if __name__ == "__main__":
    main()
