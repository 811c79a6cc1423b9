"""The latency report as markdown tables."""

from __future__ import annotations

from typing import Iterator

from melle_bench.latency_backends import ONNX_BACKENDS, VOCODER, step_graph, step_weights
from melle_bench.latency_figures import measured
from melle_bench.latency_workload import FIRST_AUDIO_SECONDS, PAPER_TABLE5, TABLE5_SECONDS


def fmt(x: float | None) -> str:
    """A number rounded for a table (1 decimal from 10, 2 from 1, 3 below); '—' for None."""
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
    """(preset, backend, entry) of every measured backend, in report order."""
    for preset, backends in report["results"].items():
        for backend, entry in backends.items():
            if measured(entry):
                yield preset, backend, entry


def step_section(report: dict) -> list[str]:
    """Per-step latency by position, one row per backend (and ORT cache mode)."""
    positions = report["settings"]["positions"]
    rows = []
    for preset, backend, entry in measured_entries(report):
        for mode, steps in entry["step"].items():
            name = f"{backend} ({mode})" if len(entry["step"]) > 1 else backend
            rows.append([preset, name, *(fmt(steps.get(str(p), {}).get("median_ms")) for p in positions)])
    return section("Per-step latency (ms, median)", ["preset", "backend", *map(str, positions)], rows)


def growth_section(report: dict) -> list[str]:
    """How the per-step cost grows with position, beside the cache-read floor."""
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
    """Time to the first 0.5 s chunk of audio, split into decode and vocoder."""
    rows = [[preset, backend, fmt(e["first_audio"]["total_s"]), fmt(e["first_audio"]["decode_s"]),
             fmt(e["first_audio"]["vocoder_s"]), str(e["first_audio"]["steps"])]
            for preset, backend, e in measured_entries(report)]
    return section(f"Time to first audio ({FIRST_AUDIO_SECONDS:g} s chunk, seconds)",
                   ["preset", "backend", "total", "prefill + steps + post-net", "vocoder", "steps"], rows)


def table5_cell(row: dict | None, key: str = "mean_s") -> str:
    """One Table 5 cell: mean ± std with its RTF, 'skipped' or '—'."""
    if not row:
        return "—"
    if "skipped" in row:
        return "skipped"
    if key not in row:
        return "—"
    spread = f" ± {fmt(row['std_s'])}" if row["std_s"] is not None else ""  # one trial has no spread
    return f"{fmt(row[key])}{spread} (RTF {fmt(row[key] / TABLE5_SECONDS)})"


def table5_section(report: dict) -> list[str]:
    """Paper Table 5 per backend and r, without and with the vocoder, and the paper's row."""
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
    """Candidates per second (and multiples of real time) per batch size."""
    batches = [str(b) for b in report["settings"]["batches"]]

    def cell(row: dict) -> str:
        return "skipped" if "skipped" in row else f"{fmt(row['candidates_per_s'])}/s ({fmt(row['realtime_x'])}× RT)"

    rows = [[preset, backend, *(cell(e["batch"][b]) for b in batches)] for preset, backend, e in measured_entries(report)]
    return section(f"Batch throughput (candidates of {report['settings']['batch_seconds']:g} s per second; "
                   "× real time)", ["preset", "backend", *(f"B={b}" for b in batches)], rows)


def quantized_section(report: dict) -> list[str]:
    """Each quantized decoder step's error against FP32 (at export) beside its speed."""
    r0 = str(report["settings"]["rs"][0])
    rows = []
    for preset, backend, entry in measured_entries(report):
        if backend not in ONNX_BACKENDS or step_weights(backend) == "fp32":
            continue
        variant, graph = step_graph(backend)
        parity = report["models"][preset][r0].get("step_parity", {}).get(variant, {}).get(graph)
        steps = ", ".join(f"{p}: {fmt(row['median_ms'])}" for p, row in entry["step"]["prefix"].items())
        rows.append([preset, backend, "—" if parity is None else f"{parity:.2e}", steps,
                     fmt(entry["table5"].get(r0, {}).get("mean_s"))])
    return section("Quantized decoder steps", ["preset", "backend", "e max abs diff vs the FP32 step",
                                               "step ms by position", f"Table 5 r={r0} s"], rows,
                   "Export-time parity of the quantized step's e against its FP32 step on random inputs; "
                   "decoding error and WER of the demo voice are in benchmarks/README.md.")


def floor_section(report: dict) -> list[str]:
    """Per-step time over the time to read the step's weights and cache once at the measured bandwidth."""
    rows = [[f["preset"], f["backend"], str(f["position"]), fmt(f["step_ms"]), fmt(f["weights_mb"]),
             fmt(f["floor_ms"]), f"{f['over_floor']:.2f}×"] for f in report.get("floors", [])]
    return section("Per-step time against the read floor", ["preset", "backend", "position", "step ms",
                                                             "weights MB", "floor ms", "step / floor"], rows,
                   "Floor: the decoder step's graph file (its weights) plus the cache up to the position, read once "
                   f"at {report['machine']['memory_read_gbs']:.1f} GB/s.")


def speedup_section(report: dict) -> list[str]:
    """The speed-ups of this run."""
    rows = [[s["preset"], s["fast"], s["slow"], s["metric"], f"{s['speedup']:.2f}×"] for s in report["speedups"]]
    return section("Speed-ups (same run)", ["preset", "backend", "over", "metric", "speed-up"], rows)


def memory_section(report: dict) -> list[str]:
    """Peak resident and GPU memory per backend."""
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
    """The whole report as markdown: machine, notes and every table."""
    m = report["machine"]
    env = " ".join(f"{k}={v}" for k, v in m["env"].items() if v)
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    vocoders = ", ".join(f"{k} {fmt(v['seconds'])} s" for k, v in report["vocoder_10s"].items() if "seconds" in v)
    gpus = "".join(f", {name}" for name in m.get("gpus", []))  # reports before GPUs were recorded lack the key
    lines = ["# Latency benchmark", "",
             f"{m['cpu']}, {m['cores']} cores{gpus}; {versions}; {env}; memory read {m['memory_read_gbs']:.1f} GB/s; "
             f"load average at start {m['load_average_at_start']:.2f}.", ""]
    lines += [f"- {note}" for note in report["notes"]] + [""]
    if vocoders:
        lines += [f"Vocoder ({VOCODER}) on 10 s of mel: {vocoders}.", ""]
    for part in (step_section, growth_section, first_audio_section, table5_section, batch_section,
                 quantized_section, floor_section, speedup_section, memory_section, not_measured):
        lines += part(report)
    return "\n".join(lines)
