"""Figures derived from a latency report's raw timings: vocoder-inclusive Table 5, cost growth, speed-ups."""

from __future__ import annotations

import math
from typing import Any

from melle_bench.latency_backends import GPU_BACKENDS, ONNX_BACKENDS, VOCODER_RUNTIME, kv_bytes_per_element, step_graph

RATIO_POSITION = 1000  # where per-step speed-ups are read (or the largest position both timed)
SPEEDUPS = (("ort-cpu", "torch-cache"), ("ort-cpu-int8", "ort-cpu"), ("torch-cache", "torch-nocache"),
            ("torch-cuda", "torch-cache"), ("ort-cpu-gqa", "ort-cpu"), ("ort-cpu-gqa-int8", "ort-cpu"),
            ("ort-cpu-gqa-int8", "ort-cpu-int8"), ("ort-cpu-nbits8", "ort-cpu"), ("ort-cpu-nbits4", "ort-cpu"),
            ("ort-cpu-gqa-kv8", "ort-cpu-gqa"), ("ort-cpu-gqa-kv8-int8", "ort-cpu"),
            ("ort-cpu-gqa-kv8-int8", "ort-cpu-gqa-int8"), ("ort-cpu-gqa-kv8-nbits8", "ort-cpu"),
            ("ort-cpu-gqa-kv8-nbits4", "ort-cpu"))


def measured(entry: dict | None) -> bool:
    """Whether a backend's entry holds measures (not skipped, failed or pending)."""
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
            # A cached step reads the past once more per position; on a GPU it reads device memory,
            # whose bandwidth the host measurement says nothing about.
            if backend != "torch-nocache" and backend not in GPU_BACKENDS:
                extra = (int(hi) - int(lo)) * kv_bytes(report, preset, backend)
                row.update(extra_cache_mb=extra / 1e6, read_floor_ms=1e3 * extra / (bandwidth * 1e9))
            rows.append(row)
    return rows


def kv_bytes(report: dict, preset: str, backend: str) -> float:
    """Cache bytes one more position adds for ``backend`` (an INT8 cache holds a quarter)."""
    r0 = str(report["settings"]["rs"][0])
    return report["models"][preset][r0]["kv_bytes_per_position"] * kv_bytes_per_element(backend) / 4


def step_floors(report: dict) -> list[dict]:
    """Per CPU ONNX backend and position: the step's time beside the time to read its weights and cache once."""
    bandwidth, r0 = report["machine"]["memory_read_gbs"], str(report["settings"]["rs"][0])
    rows = []
    for preset, backends in report["results"].items():
        for backend, entry in backends.items():
            if backend not in ONNX_BACKENDS or backend in GPU_BACKENDS or not measured(entry):
                continue
            variant, graph = step_graph(backend)
            weights = report["models"][preset][r0].get("step_bytes", {}).get(variant, {}).get(graph)
            if weights is None:
                continue
            for position, row in entry["step"]["prefix"].items():
                floor_ms = 1e3 * (weights + int(position) * kv_bytes(report, preset, backend)) / (bandwidth * 1e9)
                rows.append({"preset": preset, "backend": backend, "position": int(position),
                             "step_ms": row["median_ms"], "weights_mb": weights / 1e6, "floor_ms": floor_ms,
                             "over_floor": row["median_ms"] / floor_ms})
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
    """The value at ``path`` (keys, outermost first) inside the report."""
    value: Any = report
    for key in path:
        value = value[key]
    return value
