"""The machine a latency run measured on: CPU, versions, thread settings, load and memory bandwidth."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from melle_bench.latency_measures import timed

# PyTorch's 2-thread GEMMs run slower than 1 thread on small CPUs without these (DESIGN.md).
TORCH_ENV = {"OMP_PROC_BIND": "true", "OMP_WAIT_POLICY": "ACTIVE"}


def cpu_model() -> str:
    """The CPU's model name."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor()


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
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


def gpu_names() -> list[str]:
    """The NVIDIA GPUs nvidia-smi lists (empty without one)."""
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True)
    return [line.strip() for line in listing.stdout.splitlines() if line.strip()] if listing.returncode == 0 else []


def machine_info() -> dict:
    """CPU, cores, GPUs, platform, versions, thread variables, load average and memory bandwidth."""
    import onnxruntime

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpus": gpu_names(), "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {"torch": package_version("torch"), "onnxruntime": onnxruntime.__version__,
                         "numpy": np.__version__},
            "env": {key: os.environ.get(key) for key in (*TORCH_ENV, "OMP_NUM_THREADS")},
            "load_average_at_start": os.getloadavg()[0], "memory_read_gbs": memory_bandwidth()}
