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

BACKENDS = ("torch-nocache", "torch-cache", "torch-cuda", "ort-cpu", "ort-cpu-int8", "ort-cpu-gqa",
            "ort-cpu-gqa-int8", "ort-cuda", "trt")
TORCH_BACKENDS = ("torch-nocache", "torch-cache", "torch-cuda")
GPU_BACKENDS = ("torch-cuda", "ort-cuda", "trt")
# Backends of the GroupQueryAttention engine (to_onnx.py --attention gqa): the runtime backend each opens.
GQA_BACKENDS = {"ort-cpu-gqa": "ort-cpu", "ort-cpu-gqa-int8": "ort-cpu-int8"}
# The vocoder each backend is paired with (the synth CLI's choice): one timing per runtime.
VOCODER_RUNTIME = {"torch-nocache": "torch-cache", "torch-cache": "torch-cache", "torch-cuda": "torch-cuda",
                   "ort-cpu": "ort-cpu", "ort-cpu-int8": "ort-cpu", "ort-cpu-gqa": "ort-cpu",
                   "ort-cpu-gqa-int8": "ort-cpu", "ort-cuda": "ort-cuda", "trt": "ort-cuda"}
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

    manifest = read_manifest(model.engine_gqa if backend in GQA_BACKENDS else model.engine)
    return make_backend(manifest, GQA_BACKENDS.get(backend, backend)), manifest.config
