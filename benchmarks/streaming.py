"""Streaming benchmark: time to first audio, RTF and memory, streamed vs whole, for a sentence and ~60 s of text.

    python benchmarks/streaming.py --engine engines/demo [--trials 3] [--quality] [--out DIR]

Each (text, mode, trial) runs in a fresh process, so peak memory (RSS high-water mark) belongs to
that run alone. ``whole`` is ``Synthesizer.speak`` (first audio = all of it); ``stream`` is
``Synthesizer.stream``: time to the first chunk, and the gapless start, the least a player must
buffer before it starts so that no later chunk arrives after its turn to play. Streamed and whole
audio of the same seed are compared sample by sample. ``--quality`` then streams the long text
without a prompt and with the sample prompt, the prompt either given to every sentence or only to
the first (then rolling: each sentence prompted by the previous one's own frames and text), and
scores it with the quality harness's models: WER over the whole text (Whisper) and each sentence's
speaker similarity to the first (resemblyzer).
Writes DIR/streaming.json and DIR/streaming.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from melle.core.cli import UserError, run_cli
from melle.core.fileio import write_text_atomic
from melle.core.manifest import read_manifest
from melle_bench.latency_machine import machine_info

HERE = Path(__file__).resolve().parent
TEXTS = {"sentence": "Can you buy friendship? Otherwise people might not like you.",
         "paragraphs": (HERE / "data" / "sixty_seconds.txt").read_text()}
PROMPT_WAV, PROMPT_TEXT = HERE.parent / "demo" / "prompts" / "joe.wav", HERE.parent / "demo" / "prompts" / "joe.txt"


def timed_run(engine: str, text: str, mode: str, seed: int, threads: int | None) -> dict:
    """One synthesis in this process: timings, the waveform, and the process's peak RSS."""
    from melle_runtime.synthesizer import Synthesizer

    with Synthesizer(engine, threads=threads) as synth:
        synth.speak("Warm up.", seed=seed)  # sessions and the vocoder's first run are not what we time
        began = time.perf_counter()
        if mode == "whole":
            wav = synth.speak(text, seed=seed).wav
            first = total = time.perf_counter() - began
            gapless, chunks = total, 1
        else:
            parts, arrivals, played = [], [], 0.0
            for chunk in synth.stream(text, seed=seed):
                arrivals.append(time.perf_counter() - began - played)  # how late against playback from 0
                played += len(chunk.wav) / chunk.sample_rate
                parts.append(chunk.wav)
            total, wav = time.perf_counter() - began, np.concatenate(parts)
            first, gapless, chunks = arrivals[0], max(arrivals), len(parts)
        seconds = len(wav) / synth.sample_rate
    return {"first_audio_s": first, "total_s": total, "audio_s": seconds, "rtf": total / seconds,
            "gapless_start_s": gapless, "chunks": chunks, "peak_rss_mb": peak_rss_mb(), "wav": wav}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def in_fresh_process(*args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(timed_run, args)


def median_of(runs: list[dict]) -> dict:
    keys = ("first_audio_s", "total_s", "audio_s", "rtf", "gapless_start_s", "chunks", "peak_rss_mb")
    return {key: statistics.median(run[key] for run in runs) for key in keys}


def time_all(engine: str, trials: int, seed: int, threads: int | None) -> dict:
    results = {}
    for name, text in TEXTS.items():
        runs = {mode: [in_fresh_process(engine, text, mode, seed, threads) for _ in range(trials)]
                for mode in ("whole", "stream")}
        whole, stream = runs["whole"][0]["wav"], runs["stream"][0]["wav"]
        results[name] = {
            "words": len(text.split()),
            **{mode: {"median": median_of(r), "trials": [{k: v for k, v in x.items() if k != "wav"} for x in r]}
               for mode, r in runs.items()},
            "stream_vs_whole_max_abs": float(np.abs(stream - whole).max()) if len(stream) == len(whole) else None,
            "same_length": len(stream) == len(whole),
        }
        print(f"{name}: whole RTF {results[name]['whole']['median']['rtf']:.3f}, stream RTF "
              f"{results[name]['stream']['median']['rtf']:.3f}, first audio "
              f"{results[name]['stream']['median']['first_audio_s']:.3f} s", file=sys.stderr)
    return results


def sentence_audio(chunks) -> list[np.ndarray]:
    """Per text piece, its speech: the pause that follows it (exact zeros) is trimmed."""
    pieces: dict[int, list[np.ndarray]] = {}
    for chunk in chunks:
        pieces.setdefault(chunk.piece, []).append(chunk.wav)
    speech = [np.concatenate(parts) for _, parts in sorted(pieces.items())]
    return [wav[: np.flatnonzero(wav)[-1] + 1] if wav.any() else wav for wav in speech]


def score_long_text(engine: str, seed: int) -> dict:
    from melle_bench.quality import Scorer
    from melle_bench.quality_metrics import cosine, utterance_wer
    from melle_runtime.synthesizer import SynthesisOptions, Synthesizer

    scorer, text, results = Scorer(beam_size=1), TEXTS["paragraphs"], {}
    joe = {"prompt_wav": PROMPT_WAV, "prompt_text": PROMPT_TEXT.read_text().strip()}
    fixed, rolling = SynthesisOptions(), SynthesisOptions(rolling_prompt=True)
    with Synthesizer(engine) as synth:
        for name, prompt, options in (("no prompt", {}, fixed), ("no prompt, rolling", {}, rolling),
                                      ("joe prompt, every sentence", joe, fixed),
                                      ("joe prompt, then rolling", joe, rolling)):
            sentences = sentence_audio(synth.stream(text, seed=seed, options=options, **prompt))
            wav = np.concatenate(sentences)
            hypothesis = scorer.transcribe(wav, synth.sample_rate)
            embeddings = [scorer.embed(s, synth.sample_rate) for s in sentences]
            similarity = [cosine(e, embeddings[0]) for e in embeddings[1:]]
            results[name] = {"wer": utterance_wer(text, hypothesis), "hypothesis": hypothesis,
                             "audio_s": len(wav) / synth.sample_rate, "sentences": len(sentences),
                             "similarity_to_first": {"mean": float(np.mean(similarity)),
                                                     "min": float(np.min(similarity)), "each": similarity}}
            print(f"{name}: WER {results[name]['wer']:.1%}, similarity to the first sentence mean "
                  f"{np.mean(similarity):.3f} min {np.min(similarity):.3f}", file=sys.stderr)
    return results


def render_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"# Streaming vs whole synthesis ({report['engine']})", "",
             f"{machine['cpu']}, {machine['cores']} cores, onnxruntime {machine['versions']['onnxruntime']}; "
             f"median of {report['trials']} runs, each in a fresh process; seed {report['seed']}.", "",
             "| text | mode | audio s | first audio s | gapless start s | total s | RTF | chunks | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in report["timing"].items():
        for mode in ("whole", "stream"):
            m = result[mode]["median"]
            lines.append(f"| {name} ({result['words']} words) | {mode} | {m['audio_s']:.1f} | {m['first_audio_s']:.3f} | "
                         f"{m['gapless_start_s']:.3f} | {m['total_s']:.2f} | {m['rtf']:.3f} | {m['chunks']:.0f} | "
                         f"{m['peak_rss_mb']:.0f} |")
    lines += ["", "Streamed vs whole, same seed, max abs sample difference: " + ", ".join(
        f"{name} {r['stream_vs_whole_max_abs']:.1e}" if r["same_length"] else f"{name} (lengths differ)"
        for name, r in report["timing"].items())]
    if report.get("quality"):
        lines += ["", "## The long text, streamed (Whisper WER; resemblyzer similarity of each sentence to the first)",
                  "", "| prompt | audio s | sentences | WER | similarity mean | min |", "|---|---:|---:|---:|---:|---:|"]
        for name, q in report["quality"].items():
            s = q["similarity_to_first"]
            lines.append(f"| {name} | {q['audio_s']:.1f} | {q['sentences']} | {q['wer']:.1%} | {s['mean']:.3f} | "
                         f"{s['min']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="engine directory with a vocoder (export/to_onnx.py)")
    p.add_argument("--trials", type=int, default=3, help="runs per text and mode (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--quality", action="store_true", help="also score the streamed long text (Whisper, resemblyzer)")
    p.add_argument("--out", default="benchmarks/results/streaming", help="directory for streaming.json and .md")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error(f"--trials must be at least 1, got {args.trials}")
    manifest = read_manifest(args.engine)
    if not manifest.has_vocoder:
        raise UserError(f"{args.engine} has no vocoder; export it with one (the default of export/to_onnx.py)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"engine": str(args.engine), "machine": machine_info(), "trials": args.trials, "seed": args.seed,
              "threads": args.threads, "texts": TEXTS, "timing": time_all(args.engine, args.trials, args.seed,
                                                                           args.threads)}
    if args.quality:
        report["quality"] = score_long_text(args.engine, args.seed)
    write_text_atomic(out / "streaming.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "streaming.md", render_markdown(report))
    print(f"wrote {out}/streaming.json and streaming.md")


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
