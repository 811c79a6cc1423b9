"""FP16 risk of the decoder step and latent head, measured on CPU (no GPU, no TensorRT).

    python export/fp16_check.py [--preset tiny small] [--engine DIR ...] [--steps 300]

Converts both graphs to FP16 with the FP32 islands of the TensorRT build
(``trt_support.fp32_islands``: LayerNorm, softmax, exp(0.5 * logvar), the stop head),
runs a long decode (``melle.core.decoding.decode``) on ONNX Runtime CPU with the FP32 graphs
and, at every step, feeds the FP16 graphs the same inputs: the FP32 trajectory's frames,
masks, position and cache (teacher forcing, so one step's rounding does not compound into
the next). Reports per step the relative error ``max|fp16 - fp32| / max|fp32|`` of e and
the new K/V (step graph), of mu and y' (FP16 step then FP16 latent head), the stop logit's
absolute error, and whether every FP16 output stayed finite.
What this measures: ORT CPU runs most FP16 nodes (MatMul, Add, Mul, ...) through FP32
kernels with casts it inserts itself, so tensors are rounded to FP16 as on the GPU, but
sums accumulate in FP32 - as TensorRT's FP16 GEMMs usually do. Overflow is not modelled:
an all-FP16 latent head with sigma = exp(0.5 * logvar) ~ 1e5 (inf in FP16) stays finite
here, apparently because ORT casts once around a run of such nodes, so the FP32 islands'
protection against overflow goes unmeasured. Kernels that accumulate in FP16, fusions and
tactic choices are TensorRT's own and are not modelled either: the GPU tests
(tests/test_trt.py) measure those.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from melle.core.decoding import DecodeOptions, decode
from melle_export.trt_support import fp32_islands
from melle.core.manifest import EngineManifest, read_manifest
from melle_runtime.ort_backend import OrtBackend

FP32_OPS = ["LayerNormalization", "Softmax", "Exp"]  # by type, in addition to the named islands
RESULTS_DIR = Path("benchmarks/results/fp16_risk")


def _prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy that onnxconverter-common converts correctly (works around two of its bugs).

    1. torch shares a weight between modules through ``Identity(initializer)`` nodes; the
       converter turns the initializer to FP16 but leaves a blocked consumer expecting FP32.
       The Identity is folded: consumers read the initializer itself.
    2. A graph output that other nodes also read is renamed to its FP32 cast, and those
       readers then get FP32 where they expect FP16. Every output is exposed instead
       through an ``Identity`` of an internal tensor that only the graph reads.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    outputs = [o.name for o in graph.output]
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    internal = {name: f"{name}/internal" for name in outputs}

    def rename(name: str) -> str:
        name = alias.get(name, name)
        return internal.get(name, name)

    nodes = [n for n in graph.node if n.output[0] not in alias]
    for node in nodes:
        node.input[:] = [rename(i) for i in node.input]
        node.output[:] = [rename(o) for o in node.output]
    nodes += [onnx.helper.make_node("Identity", [internal[o]], [o], name=f"{o}/output") for o in outputs]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 copy of ``model`` with FP32 I/O and the TensorRT build's FP32 islands."""
    from onnxconverter_common.float16 import convert_float_to_float16

    islands = sorted(fp32_islands(model))  # names of the original nodes, kept by _prepare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about every value it clamps to FP16
        return convert_float_to_float16(_prepare(model), keep_io_types=True, op_block_list=FP32_OPS,
                                        node_block_list=islands)


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """``max|approx - exact| / max|exact|``: scale-free and stable where elements pass zero."""
    return float(np.abs(approx - exact).max() / max(float(np.abs(exact).max()), 1e-12))


class Fp16Shadow(OrtBackend):
    """The FP32 ORT backend, with FP16 copies of the step and latent head run beside it.

    The decode follows FP32 (its frames, its cache); the FP16 graphs see exactly the FP32
    inputs of every step and keep only their own e. ``series`` holds per step the FP16
    errors and ``finite`` whether every FP16 output stayed finite.
    """

    def __init__(self, manifest: EngineManifest):
        super().__init__(manifest)
        self.step16, self.latent16 = (_session(to_fp16(onnx.load(str(manifest.graph_path(g)))))
                                      for g in ("decoder_step", "latent_head"))
        self.series: dict[str, list[float]] = {"e": [], "kv": [], "mu": [], "y": [], "stop_abs": []}
        self.finite = True
        self.e16: np.ndarray | None = None

    def prefill(self, text, prompt_frames, prompt_masks):
        self.e16 = super().prefill(text, prompt_frames, prompt_masks)  # stays FP32: step 0's FP16 head sees it
        return self.e16

    def latent(self, e, eps):
        mu32, logvar32, y32, stop32 = super().latent(e, eps)
        mu16, logvar16, y16, stop16 = self.latent16.run(None, {"e": self.e16, "eps": eps})
        self.finite &= all(np.isfinite(a).all() for a in (mu16, logvar16, y16, stop16))
        self.series["mu"].append(relative_error(mu16, mu32))
        self.series["y"].append(relative_error(y16, y32))
        self.series["stop_abs"].append(float(np.abs(stop16 - stop32).max()))
        return mu32, logvar32, y32, stop32

    def step(self, frames, masks, position):
        e16, *present16 = self.step16.run(self.outputs, self.step_feed(frames, masks, position))
        e32 = super().step(frames, masks, position)
        present32 = [buffer[position:position + 1] for buffer in self.cache]  # the slices the step just wrote
        self.finite &= bool(np.isfinite(e16).all()) and all(np.isfinite(p).all() for p in present16)
        self.series["e"].append(relative_error(e16, e32))
        self.series["kv"].append(max(relative_error(a, b) for a, b in zip(present16, present32)))
        self.e16 = e16
        return e32


def fp16_risk(engine_dir: str | Path, steps: int = 300, seed: int = 0) -> dict:
    """Per-step FP16-vs-FP32 errors of a teacher-forced ``steps``-step decode of ``engine_dir``."""
    manifest = read_manifest(engine_dir)
    cfg = manifest.config
    backend = Fp16Shadow(manifest)
    ids = [2 + (7 * i) % (cfg.n_text_vocab - 2) for i in range(20)]
    decoded = decode(backend, cfg, ids, None, DecodeOptions(max_steps=steps, stop_enabled=False), seed=seed)
    series = backend.series
    summary = {name: {"max": max(v), "mean": float(np.mean(v)), "p99": float(np.percentile(v, 99))}
               for name, v in series.items()}
    return {"engine": str(engine_dir), "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "d_model", "r")},
            "steps": decoded.n_groups[0], "seed": seed, "fp32_ops": FP32_OPS, "all_finite": bool(backend.finite),
            "summary": summary, "per_step": series}


def preset_risk(preset: str, steps: int, seed: int = 0) -> dict:
    """``fp16_risk`` of a freshly exported random-weight model of ``preset``."""
    from melle.checkpoint import save_checkpoint
    from melle.init import random_model
    from melle_export.to_onnx import export

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", random_model(preset, seed).eval())
        engine = export(Path(tmp) / "ckpt", Path(tmp) / "engine", vocoder="none")
        result = fp16_risk(engine, steps, seed)
    result["engine"] = f"random {preset} (seed {seed})"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", default=["tiny", "small"],
                   help="random-weight presets (default: %(default)s)")
    p.add_argument("--engine", nargs="*", default=[], help="engine directories to check as well")
    p.add_argument("--steps", type=int, default=300, help="decode steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise and weight seed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="JSON directory (default: %(default)s)")
    args = p.parse_args(argv)
    from melle.core.fileio import write_text_atomic

    runs = {f"random-{name}": lambda name=name: preset_risk(name, args.steps, args.seed) for name in args.preset}
    runs.update({Path(d).resolve().name: lambda d=d: fp16_risk(d, args.steps, args.seed) for d in args.engine})
    print(f"{'model':18s} {'steps':>5s} {'e max':>9s} {'kv max':>9s} {'mu max':>9s} {'y max':>9s} "
          f"{'stop abs':>9s}  finite")
    for name, run in runs.items():
        result = run()
        write_text_atomic(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
        s = result["summary"]
        print(f"{name:18s} {result['steps']:5d} {s['e']['max']:9.2e} {s['kv']['max']:9.2e} {s['mu']['max']:9.2e} "
              f"{s['y']['max']:9.2e} {s['stop_abs']['max']:9.2e}  {result['all_finite']}")
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
