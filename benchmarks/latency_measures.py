"""The latency benchmark's measures: what runs inside one (preset, backend) process, and the vocoder timing."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from melle.core.config import MelleConfig
from melle.core.decoding import Decoded, DecodeOptions, decode
from melle.core.noise import dropout_masks
from melle.core.text import N_SPECIAL
from melle_bench.latency_backends import GPU_BACKENDS, open_backend, open_vocoder
from melle_bench.latency_workload import (EFFORT, FIRST_AUDIO_SECONDS, TABLE5_SECONDS, Cell, Effort, Model,
                                          Settings, Workload, frames_for)


def timed(fn: Callable, *args, **kwargs) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def timed_decode(backend, work: Workload, steps: int, candidates: int = 1) -> tuple[float, Decoded]:
    """Seconds for prefill + ``steps`` decode steps + post-net (the shared loop, stop disabled)."""
    options = DecodeOptions(max_steps=steps, candidates=candidates, stop_enabled=False)
    return timed(decode, backend, work.cfg, work.ids, work.prompt_mel, options, seed=work.seed)


def load(backend: str, model: Model, settings: Settings) -> tuple[Any, Workload]:
    """A warmed-up backend and its workload."""
    decoder, cfg = open_backend(backend, model)
    work = Workload.make(cfg, settings)
    timed_decode(decoder, work, 2)  # first runs allocate and plan
    return decoder, work


def step_latencies(backend, cfg: MelleConfig, positions: list[int], repeats: int, bar: tqdm) -> dict:
    """Median ms of one decode step at each position, the cache filled by a prefill of that length."""
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((1, cfg.frame_dim)).astype(np.float32)
    masks = dropout_masks(rng, (1,), cfg)
    out = {}
    for position in positions:
        backend.start(1, position + 1)
        backend.prefill(rng.integers(N_SPECIAL, cfg.n_text_vocab, (1, position)),
                        np.zeros((1, 0, cfg.frame_dim), np.float32), dropout_masks(rng, (1, 0), cfg))
        backend.step(frames, masks, position)  # warm-up at this past length
        raw = [1e3 * timed(backend.step, frames, masks, position)[0] for _ in range(repeats)]
        out[str(position)] = {"median_ms": float(np.median(raw)), "raw_ms": raw}
        bar.update()
    return out


def first_audio(backend, work: Workload, vocoder: Callable, repeats: int, bar: tqdm) -> dict:
    """Time to first audio: prefill + the steps of 0.5 s + post-net on them + vocoder on that chunk."""
    steps = work.steps(FIRST_AUDIO_SECONDS)
    vocoder(np.zeros((steps * work.cfg.r, work.cfg.n_mels), np.float32))  # warm-up at the chunk's length
    runs = []
    for _ in range(repeats):
        decode_s, decoded = timed_decode(backend, work, steps)
        vocoder_s, _ = timed(vocoder, decoded.mel)
        runs.append({"decode_s": decode_s, "vocoder_s": vocoder_s, "total_s": decode_s + vocoder_s})
        bar.update()
    median = sorted(runs, key=lambda run: run["total_s"])[len(runs) // 2]
    return {**median, "steps": decoded.n_groups[0], "frames": decoded.mel.shape[0], "runs": runs}


def batch_throughput(backend, work: Workload, settings: Settings, effort: Effort, preset: str, bar: tqdm) -> dict:
    """Candidates per second for each batch size (same text, B candidates of ``batch_seconds``)."""
    steps = work.steps(settings.batch_seconds)
    out = {}
    for batch in settings.batches:
        reason = effort.decode_skip(preset, work.positions(settings.batch_seconds), batch)
        if reason:
            out[str(batch)] = {"skipped": reason}
            continue
        timed_decode(backend, work, 2, candidates=batch)  # first run at this batch allocates
        seconds, decoded = timed_decode(backend, work, steps, candidates=batch)
        out[str(batch)] = {"seconds": seconds, "steps": decoded.n_groups[0], "candidates_per_s": batch / seconds,
                           "realtime_x": batch * settings.batch_seconds / seconds}
        bar.update()
    return out


def table5(backend, work: Workload, trials: int, bar: tqdm) -> dict:
    """Paper Table 5: seconds to generate 10 s of speech (post-net included, vocoder not), per trial."""
    runs = []
    for _ in range(trials):
        seconds, decoded = timed_decode(backend, work, work.steps(TABLE5_SECONDS))
        runs.append(seconds)
        bar.update()
    mean = float(np.mean(runs))
    return {"steps": decoded.n_groups[0], "frames": decoded.mel.shape[0], "trials_s": runs, "mean_s": mean,
            "std_s": float(np.std(runs, ddof=1)) if trials > 1 else None, "rtf": mean / TABLE5_SECONDS}


def gpu_memory_mib() -> float | None:
    """This process's GPU memory as nvidia-smi reports it; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
    for line in query.stdout.splitlines():
        pid, used = (field.strip() for field in line.split(","))
        if pid == str(os.getpid()):
            return float(used)
    return None


def cell_units(cell: Cell, effort: Effort) -> int:
    """Progress units of one cell (an upper bound: skipped work is not counted down)."""
    s = cell.settings
    modes = 2 if cell.backend == "ort-cpu" else 1
    return (modes * len(s.positions) + effort.first_audio_repeats + len(s.batches)
            + (effort.trials or s.trials) * len(s.rs))


def run_cell(cell: Cell) -> dict:
    """Every measure of one backend on one preset; meant to run in a fresh process.

    Each backend is loaded inside the function that uses it, so it is freed before the next loads.
    """
    s, r0 = cell.settings, cell.settings.rs[0]
    effort = EFFORT.get(cell.backend, Effort())
    with tqdm(total=cell_units(cell, effort), desc=f"{cell.preset} {cell.backend}", position=1, leave=False) as bar:
        entry = {"effort": asdict(effort), **main_measures(cell, effort, bar)}
        if cell.backend == "ort-cpu":
            positions = [int(p) for p in entry["step"]["prefix"]]
            entry["step"]["full"] = full_mode_steps(cell.models[r0], positions, effort, bar)
        entry["table5"] = {str(r): table5_of(cell, r, effort, bar) for r in s.rs}
    entry["peak_rss_mb"] = peak_rss_mb()
    return entry


def peak_rss_mb() -> float:
    """Peak resident memory of this process.

    Linux's ``ru_maxrss`` carries the parent's peak over fork and exec, so a spawned process
    reads its own high-water mark (VmHWM) from /proc; ``resource`` is the fallback elsewhere.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main_measures(cell: Cell, effort: Effort, bar: tqdm) -> dict:
    """Per-step latency, time to first audio, batch throughput and GPU memory, at the first r."""
    model = cell.models[cell.settings.rs[0]]
    backend, work = load(cell.backend, model, cell.settings)
    skipped = {p: effort.position_skip(p, work.cfg.max_len) for p in cell.settings.positions}
    positions = [p for p, reason in skipped.items() if reason is None]
    return {
        "skipped_positions": {str(p): reason for p, reason in skipped.items() if reason},
        "step": {"prefix": step_latencies(backend, work.cfg, positions, effort.step_repeats, bar)},
        "first_audio": first_audio(backend, work, open_vocoder(cell.backend, model.engine),
                                   effort.first_audio_repeats, bar),
        "batch": batch_throughput(backend, work, cell.settings, effort, cell.preset, bar),
        "gpu_memory_mib": gpu_memory_mib() if cell.backend in GPU_BACKENDS else None,  # while sessions live
    }


def table5_of(cell: Cell, r: int, effort: Effort, bar: tqdm) -> dict:
    """Table 5 at reduction factor ``r`` (its own model), or why it is not run."""
    work = Workload.make(cell.models[r].config(), cell.settings)
    reason = effort.decode_skip(cell.preset, work.positions(TABLE5_SECONDS))
    if reason:
        return {"skipped": reason}
    backend, work = load(cell.backend, cell.models[r], cell.settings)
    return table5(backend, work, effort.trials or cell.settings.trials, bar)


def full_mode_steps(model: Model, positions: list[int], effort: Effort, bar: tqdm) -> dict:
    """Per-step latency of ORT on CPU handed the whole fixed-capacity cache (the GPU/CUDA-graph mode)."""
    from melle.core.manifest import read_manifest
    from melle_runtime.ort_backend import OrtBackend

    manifest = read_manifest(model.engine)
    return step_latencies(OrtBackend(manifest, kv_mode="full"), manifest.config, positions, effort.step_repeats, bar)


def time_vocoder(backend: str, engine: str, n_mels: int, fps: float) -> dict:
    """Seconds the vocoder paired with ``backend`` takes on 10 s of mel, after a warm-up."""
    vocoder = open_vocoder(backend, engine)
    mel = (np.random.default_rng(0).standard_normal((frames_for(TABLE5_SECONDS, fps), n_mels)) * 2 - 6)
    mel = mel.astype(np.float32)
    vocoder(mel[: frames_for(FIRST_AUDIO_SECONDS, fps)])
    seconds, _ = timed(vocoder, mel)
    return {"seconds": seconds, "rtf": seconds / TABLE5_SECONDS}
