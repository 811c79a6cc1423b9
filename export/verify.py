"""Parity suite of an engine directory against its PyTorch checkpoint; prints a table.

    python export/verify.py ENGINE_DIR --ckpt CKPT_DIR [--seeds 0,1,2] [--max-steps 300] [--trt]

Checks: every graph vs its PyTorch module on fresh random inputs (< 1e-4; vocoder
< 1e-3 on the waveform), the step graph's prefix and full-buffer KV modes against each
other, and free-running decodes with the same seeds (same stop step, mel < 1e-3). An engine
with an INT8 cache (``--kv-cache int8``) is held to the FP32 reference as a quantized path:
its graphs against PyTorch twins that quantize with the engine's own scales, its decodes
within 2% of the reference's stop step and 1% relative mel error over the frames both made.
``--trt`` adds the TensorRT engines (export/to_trt.py; needs a GPU): each engine vs ONNX
Runtime through Polygraphy's comparator, a teacher-forced decode vs PyTorch (relative
error < 1e-2 per step), free-running stop steps within 2% of PyTorch's, and the
CUDA-graph step against the plain one. NOT VALIDATED ON A GPU yet.
Exit status 1 when any check fails; when the suite cannot run, one ``error: ...`` line and (melle/core/cli.py)
2 for bad options or an engine exported from another config than --ckpt, 4 for an engine directory or
checkpoint that cannot be loaded, or TensorRT / a GPU missing with --trt.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from melle.checkpoint import CheckpointError, load_checkpoint
from melle.core.cli import ExitCode, UserError, run_cli
from melle.core.decoding import DecodeOptions, decode
from melle.generate import TorchBackend, generate
from melle.core.alignment import ALIGN_BIAS
from melle.core.kv_names import is_past
from melle.vocoder import load_hifigan
from melle_export.fp16_check import relative_error
from melle_export.gqa_graphs import gqa_model_graphs, scales_of_graph
from melle_export.graphs import model_graphs, run_torch, vocoder_graph
from melle_export.to_onnx import (CACHE_STEP_TOLERANCE, GRAPH_TOLERANCE, VOCODER_TOLERANCE, max_abs_diff,
                                  max_step_diff, ort_run)
from melle.core.manifest import EngineError, read_manifest
from melle_runtime.ort_backend import OrtBackend
from melle_runtime.synthesizer import make_backend

TRAJECTORY_TOLERANCE = 1e-3
TRT_TOLERANCE = 1e-2  # TensorRT FP16: relative error per step / per graph output (DESIGN.md)
TRT_STOP_TOLERANCE = 0.02  # free-running stop step, relative to PyTorch's
KV8_MEL_TOLERANCE = 0.01  # INT8 cache: relative mel error vs the FP32 reference; its stop as TensorRT's


@dataclass
class Check:
    name: str
    value: float
    limit: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.value < self.limit


def engine_specs(manifest, model) -> dict:
    """Graph specs by name for every graph in the engine (the vocoder when it has one)."""
    graphs = model_graphs(model)
    if manifest.attention == "gqa":
        scales = scales_of_graph(manifest.graph_path("decoder_step")) if manifest.kv_cache else None
        graphs[:2] = gqa_model_graphs(model, scales)
    specs = {s.name: s for s in graphs}
    if manifest.has_vocoder:
        specs["vocoder"] = vocoder_graph(*load_hifigan(manifest.vocoder))
    return specs


def probe_ids(cfg) -> list[int]:
    """A 20-token text that walks through the vocabulary, for the decode comparisons."""
    return [2 + (7 * i) % (cfg.n_text_vocab - 2) for i in range(20)]


def graph_checks(manifest, specs: dict, rng) -> list[Check]:
    checks = []
    for spec in specs.values():
        inputs = spec.example(rng)
        ours, reference = ort_run(manifest.graph_path(spec.name), spec.inputs, inputs), run_torch(spec, inputs)
        limit = VOCODER_TOLERANCE if spec.name == "vocoder" else GRAPH_TOLERANCE
        checks.append(Check(f"graph {spec.name}", max_abs_diff(ours, reference), limit, "max abs diff vs PyTorch"))
        steps = max_step_diff(ours, reference)
        if steps is not None:
            checks.append(Check(f"graph {spec.name} INT8 cache", steps, CACHE_STEP_TOLERANCE + 1,
                                "max diff in quantisation steps (1 is rounding)"))
    return checks


def kv_mode_check(manifest, prefix_backend: OrtBackend, options: DecodeOptions) -> Check:
    ids = probe_ids(manifest.config)
    prefix = decode(prefix_backend, manifest.config, ids, None, options, seed=0)
    full = decode(OrtBackend(manifest, kv_mode="full"), manifest.config, ids, None, options, seed=0)
    return Check("kv modes prefix vs full", float(np.abs(prefix.mel - full.mel).max()), 1e-5, "mel max abs diff")


def trajectory_check(backend: OrtBackend, model, seed: int, options: DecodeOptions) -> Check:
    """One free-running decode on both sides; a different stop step fails outright."""
    ids = probe_ids(model.cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model may not stop: both sides are cut alike
        reference = generate(model, ids, None, options, seed=seed)
        ours = decode(backend, model.cfg, ids, None, options, seed=seed)
    mode = "stop on" if options.stop_enabled else "stop off"
    detail = f"groups ORT {ours.n_groups[0]} / PyTorch {reference.n_groups[0]}"
    if backend.manifest.kv_cache:  # quantized: near the reference, not equal to it
        frames = min(len(ours.mel), len(reference.mel))
        near_stop = abs(ours.n_groups[0] - reference.n_groups[0]) <= int(TRT_STOP_TOLERANCE * reference.n_groups[0]) + 1
        error = relative_error(ours.mel[:frames], reference.mel[:frames]) if near_stop else float("inf")
        return Check(f"free-running seed {seed}, {mode}", error, KV8_MEL_TOLERANCE,
                     f"INT8 cache: mel relative error; {detail}")
    same_stop = ours.n_groups == reference.n_groups
    diff = float(np.abs(ours.mel - reference.mel).max()) if same_stop else float("inf")
    return Check(f"free-running seed {seed}, {mode}", diff, TRAJECTORY_TOLERANCE, detail)


class Lockstep:
    """``DecoderBackend`` that follows ``reference`` and runs ``candidate`` beside it on the same inputs.

    The candidate keeps its own cache and e but is fed the reference's frames at every step
    (teacher forcing), so one step's error does not compound into the next. ``errors`` holds
    per step the relative errors of the candidate's e, mu and y' against the reference's.
    """

    def __init__(self, reference, candidate):
        self.reference, self.candidate = reference, candidate
        self.capacity = min(reference.capacity, candidate.capacity)
        self.errors: dict[str, list[float]] = {"e": [], "mu": [], "y": []}
        self.e_candidate: np.ndarray | None = None

    def start(self, batch, max_len):
        self.reference.start(batch, max_len)
        self.candidate.start(batch, max_len)

    def prefill(self, text, prompt_frames, prompt_masks):
        e = self.reference.prefill(text, prompt_frames, prompt_masks)
        self.e_candidate = self.candidate.prefill(text, prompt_frames, prompt_masks)
        return e

    def step(self, frames, masks, position):
        e = self.reference.step(frames, masks, position)
        self.e_candidate = self.candidate.step(frames, masks, position)
        return e

    def latent(self, e, eps):
        mu, logvar, y, stop = self.reference.latent(e, eps)
        mu_cand, _, y_cand, _ = self.candidate.latent(self.e_candidate, eps)
        for name, ours, theirs in (("e", self.e_candidate, e), ("mu", mu_cand, mu), ("y", y_cand, y)):
            self.errors[name].append(relative_error(ours, theirs))
        return mu, logvar, y, stop

    def postnet(self, coarse):
        return self.reference.postnet(coarse)

    def vocode(self, mel):
        return self.reference.vocode(mel)

    def close(self) -> None:
        """Nothing: both backends belong to the caller."""


def lockstep_errors(reference, candidate, cfg, ids: list[int], steps: int, seed: int = 0) -> dict[str, list[float]]:
    """Per-step relative errors (e, mu, y') of ``candidate`` against ``reference`` backends.

    Both get the same text and noise and, at every step, the frames the reference made
    (``Lockstep``), for ``steps`` steps of the shared decode loop.
    """
    lockstep = Lockstep(reference, candidate)
    decode(lockstep, cfg, ids, None, DecodeOptions(max_steps=steps, stop_enabled=False), seed=seed)
    return lockstep.errors


def trt_graph_checks(manifest, specs: dict, rng) -> list[Check]:
    """Each TensorRT engine vs ONNX Runtime on the same inputs, run through Polygraphy's comparator."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromPath, TrtRunner
    from polygraphy.comparator import Comparator

    entry = manifest.trt
    checks = []
    for name, engine in entry.engines.items():
        feed = dict(zip(specs[name].inputs, specs[name].example(rng)))
        if name == "decoder_step":  # the engine takes the whole fixed-capacity cache (and a bias over it)
            feed |= {k: rng.standard_normal((entry.max_len, *v.shape[1:])).astype(np.float32)
                     for k, v in feed.items() if is_past(k)}
            if ALIGN_BIAS in feed:
                feed[ALIGN_BIAS] = rng.standard_normal((len(feed["frames"]), entry.max_len)).astype(np.float32)
        runners = [TrtRunner(EngineFromPath(str(manifest.directory / engine.file))),
                   OnnxrtRunner(SessionFromOnnx(str(manifest.graph_path(name)), providers=["cpu"]))]
        (_, [ours]), (_, [reference]) = Comparator.run(runners, data_loader=[feed])
        worst = max(relative_error(ours[k], reference[k]) for k in specs[name].outputs)
        checks.append(Check(f"trt {name}", worst, TRT_TOLERANCE, "max relative error vs ONNX Runtime"))
    return checks


def trt_checks(manifest, model, specs: dict, seeds: list[int], options: DecodeOptions) -> list[Check]:
    """TensorRT engines: per graph vs ORT, teacher-forced and free-running vs PyTorch, CUDA graph vs not."""
    from melle_runtime.trt_backend import TrtBackend

    cfg = manifest.config
    ids = probe_ids(cfg)
    checks = trt_graph_checks(manifest, specs, np.random.default_rng(2025))
    with TrtBackend(manifest) as backend, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model may not stop: both sides are cut alike
        errors = lockstep_errors(TorchBackend(model), backend, cfg, ids, min(options.max_steps, 200))
        checks.append(Check("trt teacher-forced", max(max(v) for v in errors.values()), TRT_TOLERANCE,
                            "max relative error of e / mu / y' per step vs PyTorch"))
        for seed in seeds:
            ours = decode(backend, cfg, ids, None, options, seed=seed).n_groups[0]
            reference = generate(model, ids, None, options, seed=seed).n_groups[0]
            checks.append(Check(f"trt free-running seed {seed}", abs(ours - reference),
                                int(TRT_STOP_TOLERANCE * reference) + 1, f"groups TRT {ours} / PyTorch {reference}"))
    plain_options = DecodeOptions(max_steps=min(options.max_steps, 100), stop_enabled=False)
    mels = []
    for graph in (True, False):
        with TrtBackend(manifest, cuda_graph=graph) as backend:
            mels.append(decode(backend, cfg, ids, None, plain_options, seed=seeds[0]).mel)
    checks.append(Check("trt cuda graph vs plain step", float(np.abs(mels[0] - mels[1]).max()), 1e-6,
                        "mel max abs diff"))
    return checks


def parse_seeds(p: argparse.ArgumentParser, text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2]; anything else is a usage error naming the option."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers like 0,1,2, got {text!r}")
    if any(seed < 0 for seed in seeds):
        p.error(f"--seeds must be >= 0 (they seed numpy generators), got {text!r}")
    return seeds


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="engine directory")
    p.add_argument("--ckpt", required=True, help="the checkpoint the engine was exported from")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the free-running comparisons (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=300, help="cap per free-running decode (default: %(default)s)")
    p.add_argument("--trt", action="store_true", help="also check the TensorRT engines (needs an NVIDIA GPU)")
    args = p.parse_args(argv)
    seeds = parse_seeds(p, args.seeds)
    if args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    manifest = read_manifest(args.engine)  # EngineError: exit 4
    try:
        model = load_checkpoint(args.ckpt)
    except CheckpointError as err:
        raise UserError(f"--ckpt: {err}", ExitCode.MODEL) from None
    if manifest.config != model.cfg:
        # 2, not 4: the exit status this suite has always given a mismatched pair (tests/test_export.py)
        raise UserError("the engine was exported from a different config than --ckpt: give the checkpoint "
                        "it was exported from, or re-export it with export/to_onnx.py", ExitCode.USAGE)
    if args.trt:
        from melle_runtime.trt_backend import check_build, require_gpu

        try:
            trt, _, device = require_gpu()
            check_build(manifest, trt.__version__, device)
        except EngineError as err:
            raise UserError(f"--trt: {err}", ExitCode.MODEL) from None
    specs = engine_specs(manifest, model)
    backend = make_backend(manifest, "ort-cpu")  # one set of sessions for every ORT decode below
    checks = graph_checks(manifest, specs, np.random.default_rng(2024))
    if manifest.attention == "standard":  # a GroupQueryAttention cache has one mode: shared in place
        checks.append(kv_mode_check(manifest, backend, DecodeOptions(max_steps=50, stop_enabled=False)))
    # With the stop rule (trained models), and the full length without it (long trajectories
    # even for random models, whose stop head may fire at once).
    checks += [trajectory_check(backend, model, s, DecodeOptions(max_steps=args.max_steps)) for s in seeds]
    checks.append(trajectory_check(backend, model, seeds[0], DecodeOptions(max_steps=args.max_steps,
                                                                           stop_enabled=False)))
    if args.trt:
        checks += trt_checks(manifest, model, specs, seeds, DecodeOptions(max_steps=args.max_steps))
    print(f"{'check':32s} {'value':>10s} {'limit':>8s}  result  detail")
    for c in checks:
        print(f"{c.name:32s} {c.value:10.2e} {c.limit:8.0e}  {'ok' if c.passed else 'FAIL':6s}  {c.detail}")
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """The suite as a command: the number of failed checks decides 0 or 1; a suite that cannot run
    is one ``error: ...`` line on stderr and its exit code (melle/core/cli.py)."""
    return run_cli(lambda: run(argv), {EngineError: ExitCode.MODEL})


if __name__ == "__main__":
    sys.exit(main())
