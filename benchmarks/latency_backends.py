"""The backends the latency benchmark times: names, availability, and opening them with their vocoders.

Torch and the torch backends load only inside the processes that time them: ONNX Runtime's
processes (and the parent) never import torch.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Callable

import numpy as np

from melle_bench.latency_workload import Model

TORCH_BACKENDS = ("torch-nocache", "torch-cache", "torch-cuda")
# Each ONNX backend: the engine variant it times and the runtime backend (make_backend) that opens it.
ONNX_BACKENDS = {
    "ort-cpu": ("standard", "ort-cpu"), "ort-cpu-int8": ("standard", "ort-cpu-int8"),
    "ort-cpu-nbits8": ("standard", "ort-cpu-nbits8"), "ort-cpu-nbits4": ("standard", "ort-cpu-nbits4"),
    "ort-cpu-gqa": ("gqa", "ort-cpu"), "ort-cpu-gqa-int8": ("gqa", "ort-cpu-int8"),
    "ort-cpu-gqa-kv8": ("gqa-kv8", "ort-cpu"), "ort-cpu-gqa-kv8-int8": ("gqa-kv8", "ort-cpu-int8"),
    "ort-cpu-gqa-kv8-nbits8": ("gqa-kv8", "ort-cpu-nbits8"), "ort-cpu-gqa-kv8-nbits4": ("gqa-kv8", "ort-cpu-nbits4"),
    "ort-cuda": ("standard", "ort-cuda"), "trt": ("standard", "trt"),
}
# How each engine variant is exported (to_onnx.export options); the standard one holds the vocoder.
ENGINE_VARIANTS = {"standard": {}, "gqa": {"attention": "gqa"}, "gqa-kv8": {"attention": "gqa", "kv_cache": "int8"}}
BACKENDS = (*TORCH_BACKENDS, *ONNX_BACKENDS)
GPU_BACKENDS = ("torch-cuda", "ort-cuda", "trt")
# The vocoder each backend is paired with (the synth CLI's choice): one timing per runtime.
VOCODER_RUNTIME = {"torch-nocache": "torch-cache", "torch-cache": "torch-cache", "torch-cuda": "torch-cuda",
                   **{b: "ort-cuda" if b in GPU_BACKENDS else "ort-cpu" for b in ONNX_BACKENDS}}
VOCODER = "hifigan-universal"


def has_nvidia_gpu() -> bool:
    """Whether nvidia-smi is here and lists a GPU."""
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
    if backend in GPU_BACKENDS and not has_nvidia_gpu():
        return "no NVIDIA GPU (nvidia-smi finds none)"
    return None


def torch_device(backend: str) -> str:
    """Where a torch backend runs; the CUDA one says so plainly when this torch cannot reach a GPU."""
    if backend != "torch-cuda":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch-cuda needs a CUDA build of torch that sees a GPU; torch {torch.__version__} "
                           "does not (the CPU build cannot)")
    return "cuda"


def torch_vocoder(device: str) -> Callable[[np.ndarray], np.ndarray]:
    """The PyTorch HiFi-GAN on ``device`` as mel ``[frames, n_mels]`` -> waveform."""
    from melle.vocoder import load_hifigan, numpy_vocoder

    return numpy_vocoder(load_hifigan(VOCODER)[0].to(device))


def open_vocoder(backend: str, engine: str) -> Callable[[np.ndarray], np.ndarray]:
    """The vocoder ``backend`` is paired with: PyTorch for torch backends, the engine's graph otherwise."""
    if backend in TORCH_BACKENDS:
        return torch_vocoder(torch_device(backend))
    from melle.core.manifest import read_manifest
    from melle_runtime.ort_backend import available_providers, make_session

    device = "cuda" if backend in GPU_BACKENDS else "cpu"
    session = make_session(read_manifest(engine).graph_path("vocoder"), available_providers(device))
    return lambda mel: session.run(None, {"mel": mel[None]})[0][0]


def open_backend(backend: str, model: Model):
    """(decoder backend, model config) for a backend name over one model."""
    if backend in TORCH_BACKENDS:
        from melle.checkpoint import load_checkpoint
        from melle.generate import NoCacheTorchBackend, TorchBackend  # imports torch: only in its own processes

        net = load_checkpoint(model.checkpoint, device=torch_device(backend))
        return (NoCacheTorchBackend(net) if backend == "torch-nocache" else TorchBackend(net)), net.cfg
    from melle.core.manifest import read_manifest
    from melle_runtime.synthesizer import make_backend

    variant, runtime_backend = ONNX_BACKENDS[backend]
    manifest = read_manifest(model.engine_of(variant))
    return make_backend(manifest, runtime_backend), manifest.config


def step_weights(backend: str) -> str:
    """The decoder-step weights an ONNX backend runs: fp32, int8, nbits8 or nbits4."""
    from melle_runtime.synthesizer import CPU_STEP_WEIGHTS

    return CPU_STEP_WEIGHTS.get(ONNX_BACKENDS[backend][1], "fp32")


def step_graph(backend: str) -> tuple[str, str]:
    """(engine variant, decoder-step graph name) an ONNX backend runs."""
    from melle.core.manifest import step_graph_name

    return ONNX_BACKENDS[backend][0], step_graph_name(step_weights(backend))


def export_options(variant: str, weights: set[str]) -> dict:
    """``to_onnx.export`` options of an engine variant holding decoder steps with ``weights`` beside FP32."""
    return {"int8": "int8" in weights, "nbits": tuple(sorted(int(w.removeprefix("nbits")) for w in weights
                                                            if w.startswith("nbits"))), **ENGINE_VARIANTS[variant]}


def step_graphs(weights: set[str]) -> set[str]:
    """Names of the decoder step graphs with ``weights``."""
    from melle.core.manifest import step_graph_name

    return {step_graph_name(w) for w in weights}


def kv_bytes_per_element(backend: str) -> int:
    return 1 if ONNX_BACKENDS.get(backend, ("standard",))[0] == "gqa-kv8" else 4


def engines_needed(backends: list[str]) -> dict[str, set[str]]:
    """Per engine variant the backends need, the quantized step weights it must hold."""
    # The standard engine holds the vocoder every ONNX backend's Table 5 row is paired with.
    needed: dict[str, set[str]] = {"standard": set()} if any(b in ONNX_BACKENDS for b in backends) else {}
    for backend in backends:
        if backend in ONNX_BACKENDS:
            needed.setdefault(ONNX_BACKENDS[backend][0], set()).add(step_weights(backend))
    return {variant: weights - {"fp32"} for variant, weights in needed.items()}
