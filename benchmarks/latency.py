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
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from melle.audio import get_preset
from melle.cli import OutputError, run_cli
from melle.config import PRESETS, MelleConfig
from melle.decoding import Decoded, DecodeOptions, decode
from melle.fileio import write_text_atomic
from melle.noise import dropout_masks
from melle.text import N_SPECIAL

# PyTorch's 2-thread GEMMs run slower than 1 thread on small CPUs without these (DESIGN.md).
TORCH_ENV = {"OMP_PROC_BIND": "true", "OMP_WAIT_POLICY": "ACTIVE"}
BACKENDS = ("torch-nocache", "torch-cache", "ort-cpu", "ort-cpu-int8", "ort-cuda", "trt")
TORCH_BACKENDS = ("torch-nocache", "torch-cache")
GPU_BACKENDS = ("ort-cuda", "trt")
# The vocoder each backend is paired with (the synth CLI's choice): one timing per runtime.
VOCODER_RUNTIME = {"torch-nocache": "torch-cache", "torch-cache": "torch-cache", "ort-cpu": "ort-cpu",
                   "ort-cpu-int8": "ort-cpu", "ort-cuda": "ort-cuda", "trt": "ort-cuda"}
VOCODER = "hifigan-universal"
TABLE5_SECONDS = 10.0  # paper Table 5: time to generate 10 s of speech
PAPER_TABLE5 = {1: 5.49, 2: 2.76, 4: 1.40}  # seconds for r = 1, 2, 4 on the paper's GPU
PAPER_LABEL = "paper (its GPU)"
FIRST_AUDIO_SECONDS = 0.5  # the first chunk a streaming player needs
TEXT_TOKENS = 150  # about 10 s of speech in characters
RATIO_POSITION = 1000  # where per-step speed-ups are read (or the largest position both timed)
SPEEDUPS = (("ort-cpu", "torch-cache"), ("ort-cpu-int8", "ort-cpu"), ("torch-cache", "torch-nocache"))


@dataclass(frozen=True)
class Effort:
    """How much of the protocol a backend runs; the no-cache baseline is capped to fit in an hour."""

    step_repeats: int = 10  # timed calls of one step per position (median)
    first_audio_repeats: int = 3  # time to first audio (median)
    trials: int | None = None  # Table 5 trials; None: --trials
    max_position: int | None = None  # positions above are neither timed nor decoded to
    max_batch: int | None = None  # larger candidate batches are not timed
    skip_presets: tuple[str, ...] = ()  # presets where Table 5 and batch throughput are not run
    why: str = ""  # the reason for the caps, quoted in every skip note

    def position_skip(self, position: int, max_len: int) -> str | None:
        """Why one step at ``position`` is not timed, or None."""
        if position >= max_len:
            return f"position {position} is beyond the model's {max_len} positions"
        if self.max_position is not None and position > self.max_position:
            return f"{self.why}: positions above {self.max_position} are not timed"
        return None

    def decode_skip(self, preset: str, positions: int, batch: int = 1) -> str | None:
        """Why a Table 5 or batch decode reaching ``positions`` is not run, or None."""
        if preset in self.skip_presets:
            return f"{self.why}: not run at {preset} size"
        if self.max_position is not None and positions > self.max_position:
            return f"{self.why}: this decode reaches position {positions}, above {self.max_position}"
        if self.max_batch is not None and batch > self.max_batch:
            return f"{self.why}: batches above {self.max_batch} are not timed"
        return None


EFFORT = {"torch-nocache": Effort(
    step_repeats=3, first_audio_repeats=1, trials=1, max_position=1000, max_batch=1, skip_presets=("paper",),
    why="full-prefix recompute every step costs minutes per decode at large sizes")}


@dataclass(frozen=True)
class Settings:
    """What every cell measures (from the command line)."""

    positions: tuple[int, ...]
    rs: tuple[int, ...]
    batches: tuple[int, ...]
    trials: int
    batch_seconds: float  # length of each candidate in the throughput runs
    prompt_seconds: float  # acoustic prompt in every decode (continuation-style prefill)
    seed: int


@dataclass(frozen=True)
class Model:
    """One random-initialised (preset, r): where its checkpoint and ONNX engine live."""

    preset: str
    r: int
    max_len: int
    vocoder: bool  # export the vocoder graph into this engine
    checkpoint: str
    engine: str

    def config(self) -> MelleConfig:
        return MelleConfig.load(Path(self.checkpoint) / "config.json")


@dataclass(frozen=True)
class Cell:
    """One backend on one preset: the unit that runs in its own process."""

    preset: str
    backend: str
    models: dict[int, Model]  # by r; the first r's engine holds the vocoder
    settings: Settings


# -- workload -------------------------------------------------------------------------------


def frames_per_second(mel_preset: str) -> float:
    preset = get_preset(mel_preset)
    return preset.sample_rate / preset.hop_length


def frames_for(seconds: float, fps: float) -> int:
    """Mel frames in ``seconds`` of audio (10 s at 22050 Hz, hop 256 -> 861)."""
    return round(seconds * fps)


def steps_for(seconds: float, r: int, fps: float) -> int:
    """Decode steps (frame groups) that make ``seconds`` of audio."""
    return math.ceil(frames_for(seconds, fps) / r)


@dataclass
class Workload:
    """The text and acoustic prompt every backend decodes, drawn from the seed."""

    cfg: MelleConfig
    ids: list[int]
    prompt_mel: np.ndarray  # [frames, n_mels]
    seed: int

    @classmethod
    def make(cls, cfg: MelleConfig, settings: Settings) -> Workload:
        rng = np.random.default_rng(settings.seed)
        ids = rng.integers(N_SPECIAL, cfg.n_text_vocab, TEXT_TOKENS).tolist()
        frames = frames_for(settings.prompt_seconds, frames_per_second(cfg.mel_preset))
        prompt = (rng.standard_normal((frames, cfg.n_mels)) * 2 - 6).astype(np.float32)  # log-mel range
        return cls(cfg, ids, prompt, settings.seed)

    def steps(self, seconds: float) -> int:
        return steps_for(seconds, self.cfg.r, frames_per_second(self.cfg.mel_preset))

    def positions(self, seconds: float) -> int:
        """Positions a decode of ``seconds`` takes: text + EOS + prompt groups + generated groups."""
        return len(self.ids) + 1 + len(self.prompt_mel) // self.cfg.r + self.steps(seconds)


def timed(fn: Callable, *args, **kwargs) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def timed_decode(backend, work: Workload, steps: int, candidates: int = 1) -> tuple[float, Decoded]:
    """Seconds for prefill + ``steps`` decode steps + post-net (the shared loop, stop disabled)."""
    options = DecodeOptions(max_steps=steps, candidates=candidates, stop_enabled=False)
    return timed(decode, backend, work.cfg, work.ids, work.prompt_mel, options, seed=work.seed)


# -- backends -------------------------------------------------------------------------------


class NoCacheTorchBackend:
    """``DecoderBackend`` that reruns the decoder over the whole prefix every step (no KV cache).

    This is how common open-source VALL-E / MELLE code decodes: the benchmark's baseline.
    The latent head and post-net are those of the cached backend (caching does not touch them).
    """

    def __init__(self, model):
        from melle.generate import TorchBackend  # torch loads only in the processes that time torch

        self.cached = TorchBackend(model)
        self.capacity, self.latent, self.postnet = self.cached.capacity, self.cached.latent, self.cached.postnet
        self.model = model.requires_grad_(False)  # no autograd graph, as under inference_mode
        self.sequence = None  # embedded inputs so far [B, max_len, d_model]

    def start(self, batch: int, max_len: int) -> None:
        self.sequence = next(self.model.parameters()).new_zeros(batch, max_len, self.model.cfg.d_model)

    def prefill(self, text, prompt_frames, prompt_masks):
        tensor = self.cached._tensor
        x = self.model.embed(tensor(text), tensor(prompt_frames), tensor(prompt_masks))
        self.sequence[:, : x.shape[1]] = x
        return self._recompute(x.shape[1])

    def step(self, frames, masks, position):
        tensor = self.cached._tensor
        self.sequence[:, position] = self.model.embed_step(tensor(frames), tensor(masks),
                                                           tensor(np.array([position])))[:, 0]
        return self._recompute(position + 1)

    def _recompute(self, length: int) -> np.ndarray:
        """Final hidden state of the last input, the decoder run over the first ``length`` inputs."""
        return self.model.decode(self.sequence[:, :length])[0][:, -1].numpy()


def torch_vocoder() -> Callable[[np.ndarray], np.ndarray]:
    """The PyTorch HiFi-GAN as mel ``[frames, n_mels]`` -> waveform."""
    from melle.vocoder import load_hifigan, numpy_vocoder

    return numpy_vocoder(load_hifigan(VOCODER)[0])


def open_vocoder(backend: str, engine: str) -> Callable[[np.ndarray], np.ndarray]:
    """The vocoder ``backend`` is paired with: PyTorch for torch backends, the engine's graph otherwise."""
    if backend in TORCH_BACKENDS:
        return torch_vocoder()
    from melle_runtime.manifest import read_manifest
    from melle_runtime.ort_backend import available_providers, make_session

    device = "cuda" if backend in GPU_BACKENDS else "cpu"
    session = make_session(read_manifest(engine).graph_path("vocoder"), available_providers(device))
    return lambda mel: session.run(None, {"mel": mel[None]})[0][0]


def open_backend(backend: str, model: Model):
    """(decoder backend, model config) for a backend name over one model."""
    if backend in TORCH_BACKENDS:
        from melle.checkpoint import load_checkpoint
        from melle.generate import TorchBackend

        net = load_checkpoint(model.checkpoint)
        return (NoCacheTorchBackend(net) if backend == "torch-nocache" else TorchBackend(net)), net.cfg
    from melle_runtime.manifest import read_manifest
    from melle_runtime.synthesizer import make_backend

    manifest = read_manifest(model.engine)
    return make_backend(manifest, backend), manifest.config


def load(backend: str, model: Model, settings: Settings) -> tuple[Any, Workload]:
    """A warmed-up backend and its workload."""
    decoder, cfg = open_backend(backend, model)
    work = Workload.make(cfg, settings)
    timed_decode(decoder, work, 2)  # first runs allocate and plan
    return decoder, work


# -- measures (run inside a cell's process) ---------------------------------------------------


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
    from melle_runtime.manifest import read_manifest
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


def prepare(models: list[Model], seed: int, onnx: bool, int8: bool, batch_max: int) -> None:
    """Write each model's checkpoint (and engine when ``onnx``) unless the cache already holds it."""
    from melle.checkpoint import save_checkpoint
    from melle.init import random_model
    from melle_export.to_onnx import export

    for m in tqdm(models, desc="models", position=1, leave=False):
        if is_cached(m, onnx, int8):
            continue
        save_checkpoint(m.checkpoint, random_model(m.preset, seed, r=m.r, max_len=m.max_len))
        if onnx:
            export(m.checkpoint, m.engine, vocoder=VOCODER if m.vocoder else "none", batch_max=batch_max, int8=int8)


def is_cached(model: Model, onnx: bool, int8: bool) -> bool:
    """Whether the cache holds this model with the sizes the presets say now and every graph needed."""
    expected = {**PRESETS[model.preset], "r": model.r, "max_len": model.max_len}
    config_file = Path(model.checkpoint) / "config.json"
    if not config_file.exists() or any(json.loads(config_file.read_text()).get(k) != v for k, v in expected.items()):
        return False
    if not onnx:
        return True
    from melle_runtime.manifest import EngineError, read_manifest

    try:
        graphs = read_manifest(model.engine, verify=False).graphs  # loading verifies the checksums
    except EngineError:
        return False
    return (not int8 or "decoder_step_int8" in graphs) and (not model.vocoder or "vocoder" in graphs)


def in_fresh_process(fn: Callable, *args) -> Any:
    """``fn(*args)`` in a new interpreter: timings, threads and peak memory start from nothing."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# -- the run (parent process: never imports torch) --------------------------------------------


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor()


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def memory_bandwidth(megabytes: int = 512, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: one thread per core summing its share of a 512 MB array, best of ``repeats``."""
    data = np.ones(megabytes * 2**20 // 4, np.float32)
    chunks = np.array_split(data, os.cpu_count() or 1)
    with ThreadPoolExecutor(len(chunks)) as pool:
        best = min(timed(lambda: list(pool.map(np.sum, chunks)))[0] for _ in range(repeats))
    return data.nbytes / best / 1e9


def machine_info() -> dict:
    import onnxruntime

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {"torch": package_version("torch"), "onnxruntime": onnxruntime.__version__,
                         "numpy": np.__version__},
            "env": {key: os.environ.get(key) for key in (*TORCH_ENV, "OMP_NUM_THREADS")},
            "load_average_at_start": os.getloadavg()[0], "memory_read_gbs": memory_bandwidth()}


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"],
                                                                     capture_output=True).returncode == 0


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None."""
    if backend == "ort-cuda":
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return f"CUDAExecutionProvider not in onnxruntime's providers {providers} (needs onnxruntime-gpu)"
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError as err:
            return f"import tensorrt failed ({err})"
        if importlib.util.find_spec("melle_runtime.trt_backend") is None:
            return "melle_runtime has no TensorRT backend (trt_backend) in this version"
    if backend in GPU_BACKENDS and not has_nvidia_gpu():
        return "no NVIDIA GPU (nvidia-smi finds none)"
    return None


def plan_models(presets: list[str], settings: Settings, cache: Path) -> dict[str, dict[int, Model]]:
    """One model per (preset, r), with enough positions for the longest decode."""
    plan = {}
    for preset in presets:
        plan[preset] = {}
        for r in settings.rs:
            cfg = MelleConfig(**{**PRESETS[preset], "r": r})
            longest = Workload.make(cfg, settings).positions(max(TABLE5_SECONDS, settings.batch_seconds))
            directory = cache / f"{preset}-r{r}-seed{settings.seed}"
            plan[preset][r] = Model(preset, r, max(cfg.max_len, longest),
                                    r == settings.rs[0], str(directory / "checkpoint"), str(directory / "engine"))
    return plan


def describe_model(model: Model) -> dict:
    """Sizes, parameter count and (for an engine) the INT8 step's parity, read without torch."""
    from safetensors import safe_open

    cfg = model.config()
    with safe_open(str(Path(model.checkpoint) / "model.safetensors"), framework="np") as weights:
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    info = {"params": params, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
            "max_len": cfg.max_len, "r": cfg.r, "kv_bytes_per_position": 2 * cfg.n_layer * cfg.d_model * 4}
    manifest = Path(model.engine) / "manifest.json"
    if manifest.exists():
        info["int8_parity"] = json.loads(manifest.read_text())["parity"].get("decoder_step_int8")
    return info


def notes(presets: list[str], backends: list[str], plan: dict, settings: Settings,
          load_average: float) -> list[str]:
    """What a reader must know to trust the figures."""
    fps = frames_per_second(MelleConfig(**PRESETS[presets[0]]).mel_preset)
    lines = [
        "Each (preset, backend) ran in a fresh process; torch figures with "
        + " ".join(f"{k}={os.environ.get(k)}" for k in TORCH_ENV) + ".",
        f"Every decode: {TEXT_TOKENS} text tokens + EOS and a {settings.prompt_seconds:g} s acoustic prompt in the "
        "prefill, random weights, stop disabled (exact length), seed "
        f"{settings.seed}.",
        "Per-step latency: the cache is filled by a prefill of P tokens, then one step at position P is timed "
        "(median). ORT 'prefix' hands the filled prefix, 'full' the whole fixed-capacity cache.",
        f"Table 5: prefill + ceil({frames_for(TABLE5_SECONDS, fps)}/r) steps + "
        "post-net; vocoder excluded (the 'with vocoder' column adds the vocoder's own time on 10 s of mel). "
        "RTF = time / 10 s.",
        f"Time to first audio: prefill + the steps of {FIRST_AUDIO_SECONDS:g} s + post-net + vocoder on that chunk.",
        f"Batch throughput: B candidates of {settings.batch_seconds:g} s of the same text in one decode.",
    ]
    lines += [f"{name} is capped ({effort.why}): no timing or decode beyond position {effort.max_position}, "
              f"{effort.trials} Table 5 trial(s), batch <= {effort.max_batch}, no Table 5 or batch runs at "
              f"{', '.join(effort.skip_presets)} size."
              for name, effort in EFFORT.items() if name in backends]
    lines += [f"{preset}: max_len raised from {PRESETS[preset]['max_len']} to {m.max_len} at r={r} to hold "
              f"{TABLE5_SECONDS:g} s" for preset in presets for r, m in plan[preset].items()
              if m.max_len > PRESETS[preset]["max_len"]]
    if load_average > 0.5:
        lines.append(f"Load average was {load_average:.1f} at the start: another process was using the CPU, "
                     "so these timings are inflated.")
    return lines


def run(args: argparse.Namespace, settings: Settings, cache: Path, out: Path) -> dict:
    """Every task in its own process, the report rewritten after each; returns the report."""
    presets, backends = args.presets, args.backends
    skipped = {b: unavailable(b) for b in backends}
    active = [b for b in backends if skipped[b] is None]
    plan = plan_models(presets, settings, cache)
    machine = machine_info()
    report: dict[str, Any] = {
        "benchmark": "latency", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "settings": {**asdict(settings), "presets": presets, "backends": backends},
        "notes": notes(presets, backends, plan, settings, machine["load_average_at_start"]),
        "models": {}, "vocoder_10s": {},
        "results": {p: {b: {"skipped": skipped[b]} if skipped[b] else {"pending": True} for b in backends}
                    for p in presets},
    }
    onnx = any(b not in TORCH_BACKENDS for b in active)
    cells = [Cell(p, b, plan[p], settings) for p in presets for b in active]
    vocoders = sorted({VOCODER_RUNTIME[b] for b in active}) if args.table5_vocoder else []
    with tqdm(total=1 + len(cells) + len(vocoders), desc="benchmark", unit="task") as bar:
        bar.set_postfix_str("models")
        in_fresh_process(prepare, [m for p in presets for m in plan[p].values()], settings.seed, onnx,
                         "ort-cpu-int8" in active, max(settings.batches))
        report["models"] = {p: {str(r): describe_model(m) for r, m in plan[p].items()} for p in presets}
        bar.update()
        for cell in cells:
            bar.set_postfix_str(f"{cell.preset} {cell.backend}")
            report["results"][cell.preset][cell.backend] = guarded(run_cell, cell)
            write_text_atomic(out / "latency.json", json.dumps(report, indent=1) + "\n")
            bar.update()
        first = plan[presets[0]][settings.rs[0]]
        cfg = MelleConfig(**PRESETS[first.preset])
        for runtime in vocoders:
            bar.set_postfix_str(f"vocoder {runtime}")
            report["vocoder_10s"][runtime] = guarded(time_vocoder, runtime, first.engine, cfg.n_mels,
                                                     frames_per_second(cfg.mel_preset))
            bar.update()
    return report


def guarded(fn: Callable, *args) -> dict:
    """``fn(*args)`` in a fresh process; an exception becomes an ``error`` entry so the run goes on."""
    try:
        return in_fresh_process(fn, *args)
    except Exception as err:  # any failure of one backend must not cost the other results
        print(f"error in {fn.__name__}: {type(err).__name__}: {err}", file=sys.stderr)
        return {"error": f"{type(err).__name__}: {err}"}


# -- derived figures ------------------------------------------------------------------------


def measured(entry: dict | None) -> bool:
    return bool(entry) and "step" in entry


def add_vocoder_times(report: dict) -> None:
    """Table 5 with the paired vocoder's measured time on 10 s of mel added."""
    for backends in report["results"].values():
        for backend, entry in backends.items():
            vocoder = report["vocoder_10s"].get(VOCODER_RUNTIME[backend], {})
            if "seconds" not in vocoder:
                continue
            for row in entry.get("table5", {}).values():
                if "mean_s" in row:
                    row["mean_with_vocoder_s"] = row["mean_s"] + vocoder["seconds"]


def cost_growth(report: dict) -> list[dict]:
    """Per-step cost at the lowest and highest timed position, beside what reading the extra cache costs."""
    bandwidth = report["machine"]["memory_read_gbs"]
    r0 = str(report["settings"]["rs"][0])
    rows = []
    for preset, backends in report["results"].items():
        for backend, entry in backends.items():
            steps = entry.get("step", {}).get("prefix", {})
            if len(steps) < 2:
                continue
            lo, hi = min(steps, key=int), max(steps, key=int)
            t_lo, t_hi = steps[lo]["median_ms"], steps[hi]["median_ms"]
            row = {"preset": preset, "backend": backend, "from_position": int(lo), "to_position": int(hi),
                   "from_ms": t_lo, "to_ms": t_hi, "extra_ms": t_hi - t_lo,
                   "exponent": math.log(t_hi / t_lo) / math.log(int(hi) / int(lo))}
            if backend != "torch-nocache":  # a cached step reads the past once more per position
                extra = (int(hi) - int(lo)) * report["models"][preset][r0]["kv_bytes_per_position"]
                row.update(extra_cache_mb=extra / 1e6, read_floor_ms=1e3 * extra / (bandwidth * 1e9))
            rows.append(row)
    return rows


def speedups(report: dict) -> list[dict]:
    """Faster over slower backend, from the raw figures of this run (paths point into the JSON)."""
    rows = []
    for preset, backends in report["results"].items():
        for fast, slow in SPEEDUPS:
            if not (measured(backends.get(fast)) and measured(backends.get(slow))):
                continue
            for metric, path in comparable(backends[fast], backends[slow]):
                fast_path, slow_path = ["results", preset, fast, *path], ["results", preset, slow, *path]
                rows.append({"preset": preset, "fast": fast, "slow": slow, "metric": metric,
                             "fast_path": fast_path, "slow_path": slow_path,
                             "speedup": lookup(report, slow_path) / lookup(report, fast_path)})
    return rows


def comparable(a: dict, b: dict) -> list[tuple[str, list[str]]]:
    """(metric, path inside an entry) both entries measured: one per-step position and every Table 5 r."""
    pairs = []
    common = set(a["step"]["prefix"]) & set(b["step"]["prefix"])
    if common:
        position = str(RATIO_POSITION) if str(RATIO_POSITION) in common else max(common, key=int)
        pairs.append((f"step ms at position {position}", ["step", "prefix", position, "median_ms"]))
    pairs += [(f"Table 5 s at r={r}", ["table5", r, "mean_s"]) for r in a["table5"]
              if "mean_s" in a["table5"][r] and "mean_s" in b["table5"].get(r, {})]
    return pairs


def lookup(report: dict, path: list[str]) -> float:
    value: Any = report
    for key in path:
        value = value[key]
    return value


# -- markdown -------------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def section(title: str, header: list[str], rows: list[list[str]], intro: str = "") -> list[str]:
    """A markdown section with one table; nothing when there are no rows."""
    if not rows:
        return []
    return [f"## {title}", "", *([intro, ""] if intro else []), "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows), ""]


def measured_entries(report: dict) -> Iterator[tuple[str, str, dict]]:
    for preset, backends in report["results"].items():
        for backend, entry in backends.items():
            if measured(entry):
                yield preset, backend, entry


def step_section(report: dict) -> list[str]:
    positions = report["settings"]["positions"]
    rows = []
    for preset, backend, entry in measured_entries(report):
        for mode, steps in entry["step"].items():
            name = f"{backend} ({mode})" if len(entry["step"]) > 1 else backend
            rows.append([preset, name, *(fmt(steps.get(str(p), {}).get("median_ms")) for p in positions)])
    return section("Per-step latency (ms, median)", ["preset", "backend", *map(str, positions)], rows)


def growth_section(report: dict) -> list[str]:
    rows = [[g["preset"], g["backend"], f"{g['from_position']} → {g['to_position']}",
             f"{fmt(g['from_ms'])} → {fmt(g['to_ms'])}", fmt(g["extra_ms"]), f"{g['exponent']:.2f}",
             fmt(g.get("extra_cache_mb")), fmt(g.get("read_floor_ms"))] for g in report["growth"]]
    intro = (f"Exponent k in step time ∝ position^k (0 flat, 1 linear). A cached step reads the past once: the "
             f"floor is the extra cache divided by the measured read bandwidth "
             f"({report['machine']['memory_read_gbs']:.1f} GB/s). The no-cache baseline recomputes the prefix, so "
             "its steps grow with position and a whole decode grows quadratically.")
    return section("Cost growth with position", ["preset", "backend", "positions", "step ms", "extra ms", "k",
                                                 "extra cache MB", "read floor ms"], rows, intro)


def first_audio_section(report: dict) -> list[str]:
    rows = [[preset, backend, fmt(e["first_audio"]["total_s"]), fmt(e["first_audio"]["decode_s"]),
             fmt(e["first_audio"]["vocoder_s"]), str(e["first_audio"]["steps"])]
            for preset, backend, e in measured_entries(report)]
    return section(f"Time to first audio ({FIRST_AUDIO_SECONDS:g} s chunk, seconds)",
                   ["preset", "backend", "total", "prefill + steps + post-net", "vocoder", "steps"], rows)


def table5_cell(row: dict | None, key: str = "mean_s") -> str:
    if not row:
        return "—"
    if "skipped" in row:
        return "skipped"
    if key not in row:
        return "—"
    spread = f" ± {fmt(row['std_s'])}" if row["std_s"] is not None else ""  # one trial has no spread
    return f"{fmt(row[key])}{spread} (RTF {fmt(row[key] / TABLE5_SECONDS)})"


def table5_section(report: dict) -> list[str]:
    rs = [str(r) for r in report["settings"]["rs"]]
    rows = [[preset, backend, *(table5_cell(e["table5"].get(r)) for r in rs),
             *(table5_cell(e["table5"].get(r), "mean_with_vocoder_s") for r in rs)]
            for preset, backend, e in measured_entries(report)]
    if rows:
        rows.append(["paper", "its GPU", *(fmt(PAPER_TABLE5.get(int(r))) for r in rs), *("—" for _ in rs)])
    return section(f"Paper Table 5: time to generate {TABLE5_SECONDS:g} s of speech (seconds)",
                   ["preset", "backend", *(f"r={r}" for r in rs), *(f"r={r} + vocoder" for r in rs)], rows,
                   f"Mean ± std of {report['settings']['trials']} trials (fewer where noted). Prefill + decode + "
                   "post-net; the right-hand columns add the vocoder's own time on 10 s of mel.")


def batch_section(report: dict) -> list[str]:
    batches = [str(b) for b in report["settings"]["batches"]]

    def cell(row: dict) -> str:
        return "skipped" if "skipped" in row else f"{fmt(row['candidates_per_s'])}/s ({fmt(row['realtime_x'])}× RT)"

    rows = [[preset, backend, *(cell(e["batch"][b]) for b in batches)] for preset, backend, e in measured_entries(report)]
    return section(f"Batch throughput (candidates of {report['settings']['batch_seconds']:g} s per second; "
                   "× real time)", ["preset", "backend", *(f"B={b}" for b in batches)], rows)


def int8_section(report: dict) -> list[str]:
    r0 = str(report["settings"]["rs"][0])
    rows = []
    for preset, backends in report["results"].items():
        fp32, int8 = backends.get("ort-cpu"), backends.get("ort-cpu-int8")
        if not (measured(fp32) and measured(int8)):
            continue
        steps = [f"{p}: {fmt(fp32['step']['prefix'][p]['median_ms'])} → {fmt(row['median_ms'])}"
                 for p, row in int8["step"]["prefix"].items()]
        rows.append([preset, f"{report['models'][preset][r0]['int8_parity']:.2e}", ", ".join(steps),
                     f"{fmt(fp32['table5'][r0].get('mean_s'))} → {fmt(int8['table5'][r0].get('mean_s'))}"])
    return section("INT8 (dynamic, weights only) against FP32 on ONNX Runtime",
                   ["preset", "step parity (max abs diff of e)", "step ms FP32 → INT8 by position",
                    f"Table 5 r={r0} s"], rows)


def speedup_section(report: dict) -> list[str]:
    rows = [[s["preset"], s["fast"], s["slow"], s["metric"], f"{s['speedup']:.2f}×"] for s in report["speedups"]]
    return section("Speed-ups (same run)", ["preset", "backend", "over", "metric", "speed-up"], rows)


def memory_section(report: dict) -> list[str]:
    rows = [[preset, backend, fmt(e["peak_rss_mb"]), fmt(e["gpu_memory_mib"])]
            for preset, backend, e in measured_entries(report)]
    return section("Memory (whole process, peak over all its measures)",
                   ["preset", "backend", "peak RSS MB", "GPU MiB"], rows)


def not_measured(report: dict) -> list[str]:
    """Every skipped or failed backend, position, Table 5 r and batch, with its reason."""
    lines = []
    for preset, backends in report["results"].items():
        for backend, e in backends.items():
            if not measured(e):
                lines.append(f"{preset} {backend}: {e.get('skipped') or e.get('error') or 'not run'}")
                continue
            lines += [f"{preset} {backend} position {p}: {why}" for p, why in e["skipped_positions"].items()]
            lines += [f"{preset} {backend} Table 5 r={r}: {row['skipped']}" for r, row in e["table5"].items()
                      if "skipped" in row]
            lines += [f"{preset} {backend} batch {b}: {row['skipped']}" for b, row in e["batch"].items()
                      if "skipped" in row]
    return ["## Not measured", "", *(f"- {line}" for line in lines), ""] if lines else []


def render_markdown(report: dict) -> str:
    m = report["machine"]
    env = " ".join(f"{k}={v}" for k, v in m["env"].items() if v)
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    vocoders = ", ".join(f"{k} {fmt(v['seconds'])} s" for k, v in report["vocoder_10s"].items() if "seconds" in v)
    lines = ["# Latency benchmark", "",
             f"{m['cpu']}, {m['cores']} cores; {versions}; {env}; memory read {m['memory_read_gbs']:.1f} GB/s; "
             f"load average at start {m['load_average_at_start']:.2f}.", ""]
    lines += [f"- {note}" for note in report["notes"]] + [""]
    if vocoders:
        lines += [f"Vocoder ({VOCODER}) on 10 s of mel: {vocoders}.", ""]
    for part in (step_section, growth_section, first_audio_section, table5_section, batch_section,
                 int8_section, speedup_section, memory_section, not_measured):
        lines += part(report)
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------


def panels(n: int):
    """A figure with ``n`` side-by-side panels, drawn with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steps(report: dict, path: Path) -> None:
    """Per-step latency against position, one panel per preset, one line per backend (and ORT mode)."""
    presets = list(report["results"])
    fig, axes = panels(len(presets))
    for ax, preset in zip(axes[0], presets):
        for backend, entry in report["results"][preset].items():
            for mode, steps in entry.get("step", {}).items():
                if steps:
                    xs = sorted(map(int, steps))
                    label = f"{backend} ({mode})" if mode != "prefix" else backend
                    ax.plot(xs, [steps[str(x)]["median_ms"] for x in xs], marker="o", label=label)
        ax.set(title=preset, xlabel="position", ylabel="ms per step", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def plot_table5(report: dict, path: Path) -> None:
    """Table 5 bars per backend, grouped by r, one panel per preset, beside the paper's figures."""
    rs = [str(r) for r in report["settings"]["rs"]]
    presets = list(report["results"])
    fig, axes = panels(len(presets))
    for ax, preset in zip(axes[0], presets):
        series = {b: [e["table5"].get(r, {}) for r in rs] for b, e in report["results"][preset].items()
                  if measured(e)}
        series[PAPER_LABEL] = [{"mean_s": PAPER_TABLE5.get(int(r), np.nan)} for r in rs]
        width = 0.8 / len(series)
        for i, (name, rows) in enumerate(series.items()):
            means = [row.get("mean_s", np.nan) for row in rows]  # skipped runs leave a gap
            stds = [row.get("std_s") or 0.0 for row in rows]
            paper = name == PAPER_LABEL  # grey and hatched: another machine, not a competitor
            ax.bar(np.arange(len(rs)) + i * width, means, width, yerr=stds, label=name,
                   color="0.75" if paper else None, hatch="//" if paper else None)
        ax.set_xticks(np.arange(len(rs)) + 0.4 - width / 2, [f"r={r}" for r in rs])
        ax.set(title=f"{preset}: time for {TABLE5_SECONDS:g} s of speech", ylabel="seconds", yscale="log")
        ax.legend(fontsize=8)
    save(fig, path)


# -- command line ---------------------------------------------------------------------------


def csv_of(kind: Callable, choices: tuple | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: expected a comma list"
                                             + (f" of {', '.join(map(str, choices))}" if choices else ""))
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="melle-bench-") as tmp:
            yield Path(tmp)


def main(argv: list[str] | None = None) -> None:
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
    """Entry point: expected failures are one line on stderr and an exit code (melle.cli)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
