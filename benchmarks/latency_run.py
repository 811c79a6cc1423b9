"""The latency run: every (preset, backend) cell in its own fresh process, the report rewritten after each.

This is the parent process: it never imports torch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from melle.core.config import PRESETS, MelleConfig
from melle.core.fileio import write_text_atomic
from melle_bench.latency_backends import VOCODER_RUNTIME, engines_needed, unavailable
from melle_bench.latency_machine import TORCH_ENV, machine_info
from melle_bench.latency_measures import run_cell, time_vocoder
from melle_bench.latency_models import describe_model, plan_models, prepare
from melle_bench.latency_workload import (EFFORT, FIRST_AUDIO_SECONDS, TABLE5_SECONDS, TEXT_TOKENS, Cell,
                                          Settings, frames_for, frames_per_second)


def in_fresh_process(fn: Callable, *args) -> Any:
    """``fn(*args)`` in a new interpreter: timings, threads and peak memory start from nothing."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


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
    cells = [Cell(p, b, plan[p], settings) for p in presets for b in active]
    vocoders = sorted({VOCODER_RUNTIME[b] for b in active}) if args.table5_vocoder else []
    with tqdm(total=1 + len(cells) + len(vocoders), desc="benchmark", unit="task") as bar:
        bar.set_postfix_str("models")
        in_fresh_process(prepare, [m for p in presets for m in plan[p].values()], settings.seed,
                         engines_needed(active), max(settings.batches))
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
