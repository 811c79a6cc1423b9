"""The latency benchmark end to end on the tiny preset: bookkeeping, not speed."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from melle.core.decoding import DecodeOptions, decode
from melle.generate import NoCacheTorchBackend, TorchBackend
from melle_bench.latency_figures import speedups

BACKENDS = ["torch-nocache", "torch-cache", "torch-cuda", "ort-cpu", "ort-cpu-int8", "ort-cpu-nbits8", "ort-cpu-nbits4",
            "ort-cpu-gqa", "ort-cpu-gqa-int8", "ort-cpu-gqa-kv8", "ort-cpu-gqa-kv8-int8", "ort-cpu-gqa-kv8-nbits4",
            "ort-cuda", "trt"]
RS = [1, 2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "benchmarks/latency.py", "--presets", "tiny", "--backends", ",".join(BACKENDS),
         "--r", ",".join(map(str, RS)), "--batch", "1,2", "--positions", "16,64", "--trials", "2",
         "--no-table5-vocoder", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "latency.json").read_text())


def test_every_requested_entry_is_there_or_says_why_not(run):
    _, report = run
    entries = report["results"]["tiny"]
    assert list(entries) == BACKENDS
    for backend, entry in entries.items():
        if "skipped" in entry:  # torch-cuda, ort-cuda and trt without a GPU
            assert isinstance(entry["skipped"], str) and entry["skipped"]
            continue
        assert set(entry["step"]["prefix"]) == {"16", "64"}
        assert set(entry["batch"]) == {"1", "2"}
        assert all("candidates_per_s" in row or row["skipped"] for row in entry["batch"].values())
        assert set(entry["table5"]) == {"1", "2"}
        assert entry["peak_rss_mb"] > 0
    assert set(entries["ort-cpu"]["step"]) == {"prefix", "full"}
    assert "skipped" in entries["torch-nocache"]["table5"]["1"]  # 10 s at r=1 needs 1270 positions
    assert len(entries["torch-nocache"]["table5"]["2"]["trials_s"]) == 1
    assert all(len(entries["torch-cache"]["table5"][str(r)]["trials_s"]) == 2 for r in RS)
    assert report["models"]["tiny"]["1"]["int8_parity"] is not None
    assert report["machine"]["env"]["OMP_WAIT_POLICY"] and report["machine"]["memory_read_gbs"] > 0


def test_decodes_make_exactly_the_requested_length(run):
    _, report = run
    for entry in report["results"]["tiny"].values():
        if "skipped" in entry:
            continue
        for r in RS:
            row = entry["table5"][str(r)]
            if "skipped" in row:  # the no-cache baseline stops at position 1000
                assert "position" in row["skipped"]
                continue
            assert row["steps"] == math.ceil(861 / r) and row["frames"] == row["steps"] * r
            assert row["rtf"] == pytest.approx(row["mean_s"] / 10)
        assert entry["first_audio"]["steps"] == 43  # 0.5 s at r=1
        assert entry["batch"]["1"]["steps"] == 172  # 2 s at r=1


def test_speedups_are_slow_over_fast_from_the_raw_timings(run):
    _, report = run
    entries = report["results"]["tiny"]

    def step_ms(backend):  # position 1000 is not timed here: the largest both timed is 64
        return np.median(entries[backend]["step"]["prefix"]["64"]["raw_ms"])

    def table5_s(backend, r):
        return np.mean(entries[backend]["table5"][r]["trials_s"])

    expected = {}
    measured_pairs = [("ort-cpu", "torch-cache"), ("ort-cpu-int8", "ort-cpu"), ("torch-cache", "torch-nocache"),
                      ("ort-cpu-gqa", "ort-cpu"), ("ort-cpu-gqa-int8", "ort-cpu"), ("ort-cpu-gqa-int8", "ort-cpu-int8"),
                      ("ort-cpu-nbits8", "ort-cpu"), ("ort-cpu-nbits4", "ort-cpu"), ("ort-cpu-gqa-kv8", "ort-cpu-gqa"),
                      ("ort-cpu-gqa-kv8-int8", "ort-cpu"), ("ort-cpu-gqa-kv8-int8", "ort-cpu-gqa-int8"),
                      ("ort-cpu-gqa-kv8-nbits4", "ort-cpu")]
    for fast, slow in measured_pairs:  # torch-cuda over torch-cache is not measured without a GPU
        expected[fast, slow, "step ms at position 64"] = step_ms(slow) / step_ms(fast)
        for r in ["2"] if slow == "torch-nocache" else ["1", "2"]:  # 10 s at r=1 is beyond the baseline's cap
            expected[fast, slow, f"Table 5 s at r={r}"] = table5_s(slow, r) / table5_s(fast, r)
    found = {(s["fast"], s["slow"], s["metric"]): s["speedup"] for s in report["speedups"]}
    assert found == pytest.approx(expected)
    growth = {g["backend"]: g for g in report["growth"]}
    assert "read_floor_ms" in growth["ort-cpu"] and "read_floor_ms" not in growth["torch-nocache"]


def test_read_floor_is_the_step_graph_and_its_cache_at_the_measured_bandwidth(run):
    _, report = run
    model = report["models"]["tiny"]["1"]
    floors = {(f["backend"], f["position"]): f for f in report["floors"]}
    bandwidth = report["machine"]["memory_read_gbs"] * 1e9
    for backend, variant, graph, kv_element_bytes in [("ort-cpu", "standard", "decoder_step", 4),
                                                       ("ort-cpu-nbits4", "standard", "decoder_step_nbits4", 4),
                                                       ("ort-cpu-gqa-kv8-int8", "gqa-kv8", "decoder_step_int8", 1)]:
        weights = model["step_bytes"][variant][graph]
        cache = 64 * model["kv_bytes_per_position"] * kv_element_bytes / 4
        floor = floors[backend, 64]
        assert floor["floor_ms"] == pytest.approx(1e3 * (weights + cache) / bandwidth)
        assert floor["over_floor"] == pytest.approx(floor["step_ms"] / floor["floor_ms"])
    sizes = model["step_bytes"]["standard"]
    assert sizes["decoder_step_nbits4"] < sizes["decoder_step_int8"] < sizes["decoder_step"]
    assert model["step_parity"]["gqa-kv8"]["decoder_step_int8"] > 0


def test_speedups_of_a_hand_made_report():
    def entry(step_ms, table5_s):
        return {"step": {"prefix": {p: {"median_ms": ms} for p, ms in step_ms.items()}},
                "table5": {r: {"mean_s": s} if s else {"skipped": "capped"} for r, s in table5_s.items()}}

    report = {"results": {"paper": {
        "torch-cache": entry({"100": 40.0, "1000": 50.0, "2000": 60.0}, {"1": 40.0, "2": 20.0}),
        "ort-cpu": entry({"100": 20.0, "1000": 20.0, "2000": 24.0}, {"1": 10.0, "2": None}),
        "ort-cpu-int8": {"skipped": "no INT8 step"},
    }}}
    found = {(s["fast"], s["slow"], s["metric"]): s["speedup"] for s in speedups(report)}
    assert found == pytest.approx({("ort-cpu", "torch-cache", "step ms at position 1000"): 2.5,
                                   ("ort-cpu", "torch-cache", "Table 5 s at r=1"): 4.0})


def test_writes_markdown_and_plots(run):
    out, _ = run
    markdown = (out / "latency.md").read_text()
    for heading in ("Per-step latency", "Time to first audio", "Paper Table 5", "Batch throughput",
                    "Quantized decoder steps", "read floor", "Speed-ups", "Memory"):
        assert heading in markdown
    for png in ("step_latency.png", "table5.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_cache_baseline_decodes_like_the_cached_reference(tiny_checkpoint):
    from melle.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_checkpoint(2))
    options = DecodeOptions(max_steps=12, stop_enabled=False)
    prompt = np.random.default_rng(0).standard_normal((6, model.cfg.n_mels)).astype(np.float32)
    cached = decode(TorchBackend(model), model.cfg, [3, 4, 5, 6], prompt, options, seed=1)
    recomputed = decode(NoCacheTorchBackend(model), model.cfg, [3, 4, 5, 6], prompt, options, seed=1)
    np.testing.assert_allclose(recomputed.mel, cached.mel, atol=1e-4)
