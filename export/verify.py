"""Parity suite of an engine directory against its PyTorch checkpoint; prints a table.

    python export/verify.py ENGINE_DIR --ckpt CKPT_DIR [--seeds 0,1,2] [--max-steps 300]

Checks: every graph vs its PyTorch module on fresh random inputs (< 1e-4; vocoder
< 1e-3 on the waveform), the step graph's prefix and full-buffer KV modes against each
other, and free-running decodes with the same seeds (same stop step, mel < 1e-3).
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from melle.checkpoint import load_checkpoint
from melle.decoding import DecodeOptions, decode
from melle.generate import generate
from melle.vocoder import load_hifigan
from melle_export.graphs import model_graphs, run_torch, vocoder_graph
from melle_export.to_onnx import GRAPH_TOLERANCE, VOCODER_TOLERANCE, max_abs_diff, ort_run
from melle_runtime.manifest import read_manifest
from melle_runtime.ort_backend import OrtBackend

TRAJECTORY_TOLERANCE = 1e-3


@dataclass
class Check:
    name: str
    value: float
    limit: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.value < self.limit


def graph_checks(manifest, model, rng) -> list[Check]:
    specs = model_graphs(model)
    if manifest.has_vocoder:
        specs.append(vocoder_graph(load_hifigan(manifest.raw["vocoder"])[0], model.cfg.n_mels))
    checks = []
    for spec in specs:
        inputs = spec.example(rng)
        diff = max_abs_diff(ort_run(manifest.graph_path(spec.name), spec.inputs, inputs), run_torch(spec, inputs))
        limit = VOCODER_TOLERANCE if spec.name == "vocoder" else GRAPH_TOLERANCE
        checks.append(Check(f"graph {spec.name}", diff, limit, "max abs diff vs PyTorch"))
    return checks


def kv_mode_check(manifest, options: DecodeOptions) -> Check:
    ids = [2 + i % (manifest.config.n_text_vocab - 2) for i in range(12)]
    prefix = decode(OrtBackend(manifest, kv_mode="prefix"), manifest.config, ids, None, options, seed=0)
    full = decode(OrtBackend(manifest, kv_mode="full"), manifest.config, ids, None, options, seed=0)
    return Check("kv modes prefix vs full", float(np.abs(prefix.mel - full.mel).max()), 1e-5, "mel max abs diff")


def trajectory_check(manifest, model, seed: int, options: DecodeOptions) -> Check:
    """One free-running decode on both sides; a different stop step fails outright."""
    ids = [2 + (7 * i) % (manifest.config.n_text_vocab - 2) for i in range(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model may not stop: both sides are cut alike
        reference = generate(model, ids, None, options, seed=seed)
        ours = decode(OrtBackend(manifest), manifest.config, ids, None, options, seed=seed)
    same_stop = ours.n_groups == reference.n_groups
    diff = float(np.abs(ours.mel - reference.mel).max()) if same_stop else float("inf")
    mode = "stop on" if options.stop_enabled else "stop off"
    return Check(f"free-running seed {seed}, {mode}", diff, TRAJECTORY_TOLERANCE,
                 f"groups ORT {ours.n_groups[0]} / PyTorch {reference.n_groups[0]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="engine directory")
    p.add_argument("--ckpt", required=True, help="the checkpoint the engine was exported from")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the free-running comparisons (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=300, help="cap per free-running decode (default: %(default)s)")
    args = p.parse_args(argv)
    manifest, model = read_manifest(args.engine), load_checkpoint(args.ckpt)
    if manifest.config != model.cfg:
        print("error: the engine was exported from a different config than --ckpt", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    checks = graph_checks(manifest, model, np.random.default_rng(2024))
    checks.append(kv_mode_check(manifest, DecodeOptions(max_steps=50, stop_enabled=False)))
    # With the stop rule (trained models), and the full length without it (long trajectories
    # even for random models, whose stop head may fire at once).
    checks += [trajectory_check(manifest, model, s, DecodeOptions(max_steps=args.max_steps)) for s in seeds]
    checks.append(trajectory_check(manifest, model, seeds[0], DecodeOptions(max_steps=args.max_steps,
                                                                            stop_enabled=False)))
    print(f"{'check':32s} {'value':>10s} {'limit':>8s}  result  detail")
    for c in checks:
        print(f"{c.name:32s} {c.value:10.2e} {c.limit:8.0e}  {'ok' if c.passed else 'FAIL':6s}  {c.detail}")
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
