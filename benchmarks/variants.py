"""Speed beside error for every CPU engine variant of one checkpoint (issue 16's table).

    python benchmarks/variants.py --ckpt demo/checkpoint --sentences corpus/joe/test_sentences.txt \
        [--limit N] [--backends ort-cpu,ort-cpu-gqa-kv8-int8,...] [--cache DIR] [--out DIR]

Exports the checkpoint once per engine variant of the latency benchmark (standard, GQA, GQA with an
INT8 cache; each with INT8, 8-bit and 4-bit decoder steps and the vocoder), then speaks every sentence
with each backend, sentence i with seed i, so every variant draws the same noise as the FP32 baseline
(``ort-cpu``, always run first). Per backend: how often the decode stops at the baseline's step and by
how many frames it misses otherwise, the mel's relative error against the baseline over the frames
both made, decoding time per step (decoder, latent head and post-net; no vocoder), and the Whisper
WER of the vocoded audio, scored as ``quality.py`` scores it. Writes ``variants.json`` and
``variants.md`` into --out; the CPU is named beside every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from melle.core.fileio import write_text_atomic
from melle_bench.latency_backends import (GPU_BACKENDS, ONNX_BACKENDS, VOCODER, export_options, step_graph,
                                         step_graphs, step_weights)
from melle_bench.latency_machine import machine_info
from melle_bench.quality import Scorer, read_sentences
from melle_bench.quality_metrics import mean_or_none, utterance_wer, wer_by_length, Row

BASELINE = "ort-cpu"
CPU_BACKENDS = [b for b in ONNX_BACKENDS if b not in GPU_BACKENDS]


def relative_error(mel: np.ndarray, baseline: np.ndarray) -> float:
    """||a - b|| / ||b|| over the frames both decodes made."""
    n = min(len(mel), len(baseline))
    return float(np.linalg.norm(mel[:n] - baseline[:n]) / np.linalg.norm(baseline[:n]))


def export_variants(ckpt: str, cache: Path, backends: list[str]) -> dict[str, Path]:
    """Engine directory per variant the backends need, exported unless already in ``cache``."""
    from melle.core.manifest import EngineError, read_manifest
    from melle_export.to_onnx import export

    engines = {}
    for variant in sorted({ONNX_BACKENDS[b][0] for b in backends}):
        directory = cache / variant
        weights = {step_weights(b) for b in backends if ONNX_BACKENDS[b][0] == variant} - {"fp32"}
        try:
            graphs = read_manifest(directory).graphs
            fresh = not step_graphs(weights) <= set(graphs)
        except EngineError:
            fresh = True
        if fresh:
            export(ckpt, directory, vocoder=VOCODER, force=True, **export_options(variant, weights))
        engines[variant] = directory
    return engines


def speak_all(engine: Path, backend: str, sentences: list[str]) -> list[dict]:
    """Per sentence: mel, decode seconds, steps and waveform from ``backend`` over ``engine``."""
    from melle_runtime.synthesizer import SynthesisOptions, Synthesizer

    options = SynthesisOptions()
    out = []
    with Synthesizer(engine, backend=ONNX_BACKENDS[backend][1]) as synth:
        synth.mel("Hello there.", seed=0, options=options)  # first runs allocate and plan: not timed
        for seed, text in enumerate(tqdm(sentences, desc=backend, unit="utt", leave=False)):
            start = time.perf_counter()
            decoded = synth.mel(text, seed=seed, options=options)
            seconds = time.perf_counter() - start
            out.append({"mel": decoded.mel, "seconds": seconds, "steps": int(decoded.n_groups[decoded.best]),
                        "wav": synth.vocode(decoded.mel), "rate": synth.sample_rate})
    return out


def summarize(backend: str, spoken: list[dict], baseline: list[dict], rows: list[Row], parity: float | None) -> dict:
    frames = np.array([len(s["mel"]) for s in spoken])
    base_frames = np.array([len(s["mel"]) for s in baseline])
    misses = np.abs(frames - base_frames)
    return {"backend": backend, "engine": ONNX_BACKENDS[backend][0], "weights": step_weights(backend),
            "step_parity": parity, "n": len(spoken),
            "same_stop": float(np.mean(misses == 0)), "stop_miss_frames_mean": float(misses.mean()),
            "stop_miss_frames_max": int(misses.max()),
            "mel_relative_error_median": float(np.median([relative_error(s["mel"], b["mel"])
                                                          for s, b in zip(spoken, baseline)])),
            "decode_ms_per_step": 1e3 * sum(s["seconds"] for s in spoken) / sum(s["steps"] for s in spoken),
            "wer": mean_or_none([r.wer for r in rows]), "wer_by_length": wer_by_length(rows),
            "rows": [{"text": r.text, "hypothesis": r.hypothesis, "wer": r.wer, "frames": int(f)}
                     for r, f in zip(rows, frames)]}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Engine variants: speed beside error", "",
             f"{report['ckpt']}, {report['n']} sentences of {report['sentences']}; {m['cpu']}, {m['cores']} cores; "
             f"load average at start {m['load_average_at_start']:.2f}; {report['created']}.", "",
             f"Baseline: `{BASELINE}` (standard graphs, FP32). Same seed per sentence for every backend.", "",
             "| backend | engine | weights | step e vs FP32 (export) | same stop | stop miss (frames, mean / max) "
             "| mel rel. error (median) | decode ms/step | WER % | 1-8 | 9-15 | 16+ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        buckets = [pct(v["wer_by_length"].get(b, {}).get("wer")) for b in ("1-8", "9-15", "16+")]
        parity = "-" if v["step_parity"] is None else f"{v['step_parity']:.2e}"
        lines.append(f"| {v['backend']} | {v['engine']} | {v['weights']} | {parity} | {100 * v['same_stop']:.0f}% | "
                     f"{v['stop_miss_frames_mean']:.1f} / {v['stop_miss_frames_max']} | "
                     f"{v['mel_relative_error_median']:.3f} | {v['decode_ms_per_step']:.2f} | {pct(v['wer'])} | "
                     + " | ".join(buckets) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--sentences", required=True, help="text file, one sentence a line")
    p.add_argument("--limit", type=int, help="only the first N sentences")
    p.add_argument("--backends", default=",".join(CPU_BACKENDS),
                   help=f"comma-separated, from {CPU_BACKENDS} (the baseline {BASELINE} always runs)")
    p.add_argument("--cache", default=".cache/variants", help="where the exported engines are kept")
    p.add_argument("--beam-size", type=int, default=5, help="Whisper beam size")
    p.add_argument("--out", default="benchmarks/results/variants", help="output directory")
    args = p.parse_args(argv)
    args.backends = [BASELINE] + [b for b in args.backends.split(",") if b and b != BASELINE]
    unknown = [b for b in args.backends if b not in CPU_BACKENDS]
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {CPU_BACKENDS}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sentences = read_sentences(args.sentences, args.limit)
    if not sentences:
        raise SystemExit(f"error: {args.sentences} holds no sentences")
    machine = machine_info()
    engines = export_variants(args.ckpt, Path(args.cache), args.backends)
    scorer = Scorer(args.beam_size, speaker=False)
    report = {"benchmark": "variants", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "ckpt": args.ckpt, "sentences": args.sentences, "n": len(sentences), "machine": machine,
              "python": platform.python_version(), "variants": []}
    out = Path(args.out)
    baseline = None
    for backend in tqdm(args.backends, desc="variants", unit="backend"):
        spoken = speak_all(engines[ONNX_BACKENDS[backend][0]], backend, sentences)
        baseline = baseline or spoken
        rows = []
        for text, s in zip(sentences, spoken):
            hypothesis = scorer.transcribe(s["wav"], s["rate"])
            rows.append(Row(text, hypothesis, utterance_wer(text, hypothesis), None, s["seconds"],
                            len(s["wav"]) / s["rate"]))
        variant, graph = step_graph(backend)
        manifest = json.loads((engines[variant] / "manifest.json").read_text())
        parity = manifest["graphs"][graph].get("e_max_abs_diff_vs_fp32")
        report["variants"].append(summarize(backend, spoken, baseline, rows, parity))
        write_text_atomic(out / "variants.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "variants.md", render_markdown(report))
    print(render_markdown(report))


if __name__ == "__main__":
    main()
