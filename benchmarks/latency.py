"""Latency benchmark: per-step cost, time to first audio, paper Table 5, batch throughput, memory.

    python benchmarks/latency.py [--presets small,paper] [--backends torch-nocache,torch-cache,ort-cpu,...]
        [--r 1,2,4] [--batch 1,4,16] [--positions 100,500,1000,2000] [--trials 10] [--out DIR]

Models are random-initialised (weights do not change what a step costs), saved and exported once
per preset and reduction factor into a cache directory. Each (preset, backend) is timed in a fresh
process, so no thread pool, allocation or peak memory of one backend touches another. Stop is
disabled: every decode makes exactly the requested length. Writes DIR/latency.json (machine,
settings, every raw timing), DIR/latency.md (tables), DIR/step_latency.png and DIR/table5.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from melle.core.cli import OutputError, run_cli
from melle.core.config import PRESETS
from melle.core.fileio import write_text_atomic
from melle_bench.latency_backends import BACKENDS
from melle_bench.latency_figures import add_vocoder_times, cost_growth, speedups, step_floors
from melle_bench.latency_machine import TORCH_ENV
from melle_bench.latency_markdown import render_markdown
from melle_bench.latency_plots import plot_steps, plot_table5
from melle_bench.latency_run import run
from melle_bench.latency_workload import Settings


def csv_of(kind: Callable, choices: tuple | None = None) -> Callable[[str], list]:
    """An argparse type: a comma list of ``kind`` values, each one of ``choices`` when given."""
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: expected a comma list"
                                             + (f" of {', '.join(map(str, choices))}" if choices else ""))
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked (see ``check_args``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=csv_of(str, tuple(PRESETS)), default=["small", "paper"],
                   help="model sizes (default: small,paper)")
    p.add_argument("--backends", type=csv_of(str, BACKENDS), default=list(BACKENDS),
                   help="default: all; unavailable ones are listed as skipped with the reason")
    p.add_argument("--r", type=csv_of(int, (1, 2, 3, 4, 5)), default=[1, 2, 4],
                   help="reduction factors for Table 5; the first also serves every other measure (default: 1,2,4)")
    p.add_argument("--batch", type=csv_of(int), default=[1, 4, 16], help="candidate batch sizes (default: 1,4,16)")
    p.add_argument("--positions", type=csv_of(int), default=[100, 500, 1000, 2000],
                   help="positions of the per-step timings (default: 100,500,1000,2000)")
    p.add_argument("--trials", type=int, default=10, help="Table 5 trials (default: 10)")
    p.add_argument("--batch-seconds", type=float, default=2.0, help="speech per candidate in the batch runs (default: 2)")
    p.add_argument("--prompt-seconds", type=float, default=3.0, help="acoustic prompt in every decode (default: 3)")
    p.add_argument("--table5-vocoder", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the vocoder on 10 s of mel, once per runtime (default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/latest", help="directory for JSON, markdown and plots")
    p.add_argument("--cache", help="keep checkpoints and engines here and reuse them (default: a temporary "
                                   "directory, removed at the end)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options before any model is made or process spawned: values with ``p.error`` (exit 2),
    an output or cache path that is a file with ``OutputError`` (exit 5)."""
    for option in ("presets", "backends", "r", "batch", "positions"):
        values = getattr(args, option)
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            p.error(f"--{option} lists {', '.join(map(str, repeated))} more than once")
    for option, value, ok, what in (
            ("--trials", args.trials, args.trials >= 1, ">= 1"),
            ("--batch", args.batch, min(args.batch) >= 1, "candidate batch sizes >= 1"),
            ("--positions", args.positions, min(args.positions) >= 1, "positions >= 1"),
            ("--batch-seconds", args.batch_seconds, 0 < args.batch_seconds < math.inf, "> 0 seconds"),
            ("--prompt-seconds", args.prompt_seconds, 0 <= args.prompt_seconds < math.inf, ">= 0 seconds"),
            ("--seed", args.seed, args.seed >= 0, ">= 0")):
        if not ok:
            p.error(f"{option} must be {what}, got {value}")
    for option, path in (("--out", args.out), ("--cache", args.cache)):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise OutputError(f"{option} {path} is a file; give a directory (it is created when missing)")


@contextmanager
def cache_directory(path: str | None) -> Iterator[Path]:
    """``path`` (created when missing) or, without one, a temporary directory removed at the end."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="melle-bench-") as tmp:
            yield Path(tmp)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write latency.json, latency.md and the two plots into --out."""
    for key, value in TORCH_ENV.items():  # before any torch import: inherited by every process spawned below
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    settings = Settings(tuple(args.positions), tuple(args.r), tuple(args.batch), args.trials, args.batch_seconds,
                        args.prompt_seconds, args.seed)
    out = Path(args.out)
    with cache_directory(args.cache) as cache:
        report = run(args, settings, cache, out)
    add_vocoder_times(report)
    report["growth"] = cost_growth(report)
    report["speedups"] = speedups(report)
    report["floors"] = step_floors(report)
    write_text_atomic(out / "latency.json", json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    write_text_atomic(out / "latency.md", markdown)
    plot_steps(report, out / "step_latency.png")
    plot_table5(report, out / "table5.png")
    print(markdown)
    print(f"wrote {out}/latency.json, latency.md, step_latency.png, table5.png")
    if any("error" in e for bs in report["results"].values() for e in bs.values()):
        sys.exit("error: some backends failed; see 'Not measured' above")


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
