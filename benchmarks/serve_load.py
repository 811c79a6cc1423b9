"""Load test of the speech server: concurrent streaming clients, then a storm of clients that hang up.

    python benchmarks/serve_load.py --engine engines/demo [--levels 1,2,4,8] [--requests 8] [--max-queue 8]
        [--max-batch 1,4] [--disconnects 16 --disconnect-rounds 3] [--time-limit 600] [--note TEXT] [--out DIR]

Starts ``python -m melle_runtime.serve`` (uvicorn, loopback, its own process) on the engine, once per
``--max-batch`` value (1: one request at a time; more: continuous batching, which needs an engine
exported with ``--attention gqa``), and runs everything below against each, in one run so that their
throughputs compare. Each distinct sentence is first synthesised alone (the reference; every server
must give the first one's references). Then, per level of concurrent clients,
``--requests`` requests stream wav (client i takes the next sentence as it finishes one), and the
report gives time to first audio and per-request RTF (wall time / audio seconds) at p50 and p90,
throughput (audio seconds per wall second, requests per second), errors and 429s. Every response
must equal its sentence's reference byte for byte: the server decodes with a fixed seed, so a
different body means audio lost, cut short or mixed up between requests.

Then ``--disconnects`` clients at once, ``--disconnect-rounds`` times (after one warm-up round), each
leave early: half after the first audio, half after 0.3 s, most still queued; those past the queue
get 429. The report says whether the queue drained, the server's RSS before and after, and whether
a request after the storm still gets its reference audio. Writes DIR/serve_load.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

from melle.core.cli import UserError, run_cli
from melle.core.fileio import write_text_atomic
from melle.core.manifest import read_manifest
from melle_bench.latency_machine import machine_info

TEXTS = ("The morning was cold and clear when we left the village.",
         "Nobody spoke much during the first hour.",
         "By nine o'clock the sun had reached the valley floor.",
         "We stopped at a wooden bridge to drink some tea and to look at the map.",
         "The afternoon was harder than anyone expected.",
         "The wind turned to the north and brought dark clouds over the peaks.",
         "Inside, a fire was burning, and the keeper had made a large pot of soup.",
         "Outside the first stars appeared, one after another.")
WAV_HEADER_BYTES = 44
QUEUED_HANG_UP_S = 0.3  # the storm's impatient clients leave this long after asking
START_TIMEOUT_S = 300  # the server loads the engine and speaks once before /health says ok
BUSY_LOAD = 0.5  # a load average above this before the server starts: something else was using the CPU


@dataclass
class Result:
    """One streamed request as the client saw it."""

    text: int  # index into TEXTS
    status: int | None  # HTTP status; None when the request failed in transport or timed out
    first_audio_s: float | None = None
    total_s: float | None = None
    audio_s: float | None = None
    sha256: str | None = None
    error: str | None = None

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s


class Server:
    """``python -m melle_runtime.serve`` in a subprocess on a loopback port, until ``close``."""

    def __init__(self, engine: str, max_queue: int, max_batch: int, log_dir: Path):
        self.log = log_dir / "server.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "melle_runtime.serve", "--engine", engine, "--port", str(port),
                 "--max-queue", str(max_queue), "--max-batch", str(max_batch)], stdout=out, stderr=subprocess.STDOUT)

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"the server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise UserError(f"the server was not healthy within {START_TIMEOUT_S} s: {self.log_tail()}")

    def queue(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=10).json()["queue"]

    def rss_mb(self) -> float:
        """The server's resident memory now (Linux /proc)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kilobytes = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(kilobytes) / 1024

    def close(self) -> None:
        self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


@contextmanager
def serving(engine: str, max_queue: int, max_batch: int) -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as log_dir:
        server = Server(engine, max_queue, max_batch, Path(log_dir))
        try:
            server.wait_until_healthy()
            yield server
        finally:
            server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def speech_body(text: int) -> dict:
    return {"model": "melle", "voice": "demo", "input": TEXTS[text], "response_format": "wav"}


async def stream_one(client: httpx.AsyncClient, url: str, text: int, deadline: float) -> Result:
    """One request, streamed to the end; its timings, audio length and the hash of its body."""
    began, first, rate, size, digest = time.perf_counter(), None, None, 0, hashlib.sha256()
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
            async with client.stream("POST", f"{url}/v1/audio/speech", json=speech_body(text)) as response:
                if response.status_code != 200:
                    return Result(text, response.status_code, error=(await response.aread()).decode()[:200])
                async for data in response.aiter_raw():
                    if not data:
                        continue
                    if first is None:  # the header comes with the first audio chunk
                        first, rate = time.perf_counter() - began, struct.unpack("<I", data[24:28])[0]
                    size += len(data)
                    digest.update(data)
    except (httpx.HTTPError, TimeoutError) as err:
        return Result(text, None, error=f"{type(err).__name__}: {err}")
    if first is None:
        return Result(text, None, error="the response held no audio")
    audio_s = (size - WAV_HEADER_BYTES) / 2 / rate
    return Result(text, 200, first, time.perf_counter() - began, audio_s, digest.hexdigest())


async def run_level(url: str, concurrency: int, requests: int, deadline: float) -> tuple[list[Result], float]:
    """``requests`` requests from ``concurrency`` clients; each client takes the next one when done."""
    todo = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> list[Result]:
        results = []
        for i in todo:
            if time.monotonic() > deadline:
                break
            results.append(await stream_one(client, url, i % len(TEXTS), deadline))
        return results

    async with httpx.AsyncClient(timeout=None) as client:
        began = time.perf_counter()
        parts = await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return [r for part in parts for r in part], time.perf_counter() - began


def percentiles(values: list[float]) -> dict | None:
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90))} if values else None


def summarize(concurrency: int, results: list[Result], wall_s: float, references: dict[int, Result]) -> dict:
    """One level's figures; a response counts as mismatched when its body differs from its reference."""
    ok = [r for r in results if r.status == 200]
    audio_s = sum(r.audio_s for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "ok": len(ok),
            "rate_limited": sum(r.status == 429 for r in results),
            "errors": sum(r.status not in (200, 429) for r in results),
            "mismatched": sum(r.sha256 != references[r.text].sha256 for r in ok),
            "wall_s": wall_s, "first_audio_s": percentiles([r.first_audio_s for r in ok]),
            "rtf": percentiles([r.rtf for r in ok]), "audio_s_per_s": audio_s / wall_s,
            "requests_per_s": len(ok) / wall_s, "results": [asdict(r) for r in results]}


async def hang_up_early(client: httpx.AsyncClient, url: str, text: int, after_first_audio: bool) -> str:
    """A client that leaves early: after its first audio bytes, or after QUEUED_HANG_UP_S. What happened."""
    try:
        async with asyncio.timeout(None if after_first_audio else QUEUED_HANG_UP_S):
            async with client.stream("POST", f"{url}/v1/audio/speech", json=speech_body(text)) as response:
                if response.status_code != 200:
                    return str(response.status_code)
                async for data in response.aiter_raw():
                    if data:
                        return "left mid-stream"  # leaving the block closes the connection
                return "finished"
    except TimeoutError:
        return "left before audio"


async def storm(url: str, clients: int) -> dict[str, int]:
    """``clients`` clients at once, all leaving early; counts of what happened to them."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        outcomes = await asyncio.gather(*(hang_up_early(client, url, i % len(TEXTS), i % 2 == 0)
                                          for i in range(clients)))
    return {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}


def wait_for_empty_queue(server: Server, timeout_s: float = 60) -> float | None:
    """Seconds until every queue slot was released; None if some never were."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if server.queue() == 0:
            return time.monotonic() - began
        time.sleep(0.1)
    return None


def disconnect_storms(server: Server, clients: int, rounds: int, reference: Result, deadline: float) -> dict:
    """A warm-up storm, then ``rounds`` more with the server's RSS measured around them."""
    asyncio.run(storm(server.url, clients))  # lets the allocator and connection handling reach their steady size
    drained = [wait_for_empty_queue(server)]
    rss_before = server.rss_mb()
    counts: dict[str, int] = {}
    rss = []
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        for outcome, n in asyncio.run(storm(server.url, clients)).items():
            counts[outcome] = counts.get(outcome, 0) + n
        drained.append(wait_for_empty_queue(server))
        rss.append(server.rss_mb())
    after = asyncio.run(stream_one_alone(server.url, reference.text, time.monotonic() + 120))
    return {"clients_per_round": clients, "rounds": len(rss), "outcomes": counts,
            "queue_drained": all(d is not None for d in drained),
            "drain_s": [d for d in drained if d is not None], "rss_mb_before": rss_before, "rss_mb_after_round": rss,
            "rss_growth_mb": (rss[-1] - rss_before) if rss else None,
            "served_after": after.status == 200 and after.sha256 == reference.sha256}


async def stream_one_alone(url: str, text: int, deadline: float) -> Result:
    async with httpx.AsyncClient(timeout=None) as client:
        return await stream_one(client, url, text, deadline)


def take_references(server: Server, requests: int, deadline: float) -> dict[int, Result]:
    """Each distinct sentence synthesised alone on ``server``."""
    references = {}
    for text in range(min(requests, len(TEXTS))):
        references[text] = asyncio.run(stream_one_alone(server.url, text, deadline))
        if references[text].status != 200:
            raise UserError(f"the reference request for {TEXTS[text]!r} failed: {references[text].error}")
    return references


def measure_server(args: argparse.Namespace, max_batch: int, references: dict[int, Result],
                   deadline: float) -> tuple[dict, dict[int, Result]]:
    """One server (``--max-batch max_batch``): its references against ``references``, the levels, the storms."""
    mode = {"max_batch": max_batch, "levels": [], "skipped_levels": []}
    with serving(args.engine, args.max_queue, max_batch) as server:
        own = take_references(server, args.requests, deadline)
        references = references or own
        mode["references_differing"] = sum(own[i].sha256 != references[i].sha256 for i in own)
        for concurrency in args.levels:
            if time.monotonic() > deadline:
                mode["skipped_levels"].append(concurrency)
                continue
            results, wall_s = asyncio.run(run_level(server.url, concurrency, args.requests, deadline))
            mode["levels"].append(summarize(concurrency, results, wall_s, references))
            print(f"--max-batch {max_batch}, {concurrency} clients: {wall_s:.1f} s", file=sys.stderr)
        if args.disconnects and time.monotonic() < deadline:
            mode["disconnects"] = disconnect_storms(server, args.disconnects, args.disconnect_rounds,
                                                    references[0], deadline)
    return mode, references


def measure(args: argparse.Namespace) -> dict:
    """Per server mode: start it, check its references, run the levels and the storms."""
    deadline = time.monotonic() + args.time_limit
    report = {"load_average_before": os.getloadavg(), "modes": []}
    references: dict[int, Result] = {}
    for max_batch in args.max_batch:
        mode, references = measure_server(args, max_batch, references, deadline)
        report["modes"].append(mode)
    report["references"] = [asdict(r) for r in references.values()]
    report["load_average_after"] = os.getloadavg()
    return report


def render_markdown(report: dict) -> str:
    machine, settings = report["machine"], report["settings"]
    cpu = f"{machine['cpu']}, {machine['cores']} cores"
    load = report["load_average_before"][0]
    lines = [f"# Speech server under load ({settings['engine']})", "",
             f"{report['date']}. CPU: {cpu}; onnxruntime {machine['versions']['onnxruntime']}. Servers: "
             f"`python -m melle_runtime.serve --max-queue {settings['max_queue']} --max-batch N` (uvicorn on "
             "loopback; N = 1 decodes one request at a time, N > 1 batches up to N requests continuously), one "
             "after the other in this run. Clients: httpx in one process on the same CPU, streaming wav; "
             f"{settings['requests']} requests per level over {settings['sentences']} distinct sentences; each "
             "response compared byte for byte with its sentence synthesised alone on the first server."]
    if load > BUSY_LOAD:
        lines += ["", f"Load average {load:.2f} on {machine['cores']} cores before the server started: other "
                      "work was using the CPU, so these figures are slower than on an idle machine."]
    if settings["note"]:
        lines += ["", settings["note"]]
    lines += ["", "| max batch | clients | CPU | requests | ok | 429 | errors | mismatched | first audio p50 / p90 s "
                  "| RTF p50 / p90 | audio s per s | requests per s |", "|---:|---:|---|---:|" + "---:|" * 8]
    for mode in report["modes"]:
        for level in mode["levels"]:
            first, rtf = level["first_audio_s"] or {"p50": 0, "p90": 0}, level["rtf"] or {"p50": 0, "p90": 0}
            lines.append(f"| {mode['max_batch']} | {level['concurrency']} | {cpu} | {level['requests']} | "
                         f"{level['ok']} | {level['rate_limited']} | {level['errors']} | {level['mismatched']} | "
                         f"{first['p50']:.2f} / {first['p90']:.2f} | {rtf['p50']:.2f} / {rtf['p90']:.2f} | "
                         f"{level['audio_s_per_s']:.2f} | {level['requests_per_s']:.2f} |")
    lines += ["", *batching_markdown(report["modes"])]
    for mode in report["modes"]:
        if mode["references_differing"]:
            lines += ["", f"**--max-batch {mode['max_batch']}: {mode['references_differing']} sentences alone "
                          "differ from the first server's audio.**"]
        if mode["skipped_levels"]:
            lines += ["", f"--max-batch {mode['max_batch']}, not run (the {settings['time_limit_s']:g} s time limit "
                          f"was reached): {', '.join(map(str, mode['skipped_levels']))} clients."]
        if "disconnects" in mode:
            lines += ["", *storm_markdown(mode["disconnects"], cpu, mode["max_batch"])]
    return "\n".join(lines) + "\n"


def batching_markdown(modes: list[dict]) -> list[str]:
    """Throughput of each batching server over the one-at-a-time server, level by level."""
    unbatched = next((m for m in modes if m["max_batch"] == 1), None)
    batched = [m for m in modes if m["max_batch"] > 1]
    if unbatched is None or not batched:
        return ["Batching across requests: not compared in this run (give --max-batch 1,N)."]
    lines = ["## Batching", "", "Throughput (audio seconds per second) with continuous batching over one request "
             "at a time, same clients, same run:", ""]
    alone = {level["concurrency"]: level["audio_s_per_s"] for level in unbatched["levels"]}
    for mode in batched:
        ratios = [f"{level['concurrency']} clients {level['audio_s_per_s'] / alone[level['concurrency']]:.2f}x"
                  for level in mode["levels"] if alone.get(level["concurrency"])]
        lines.append(f"- --max-batch {mode['max_batch']}: {', '.join(ratios) or 'no level in common'}")
    return lines


def storm_markdown(storm: dict, cpu: str, max_batch: int) -> list[str]:
    outcomes = ", ".join(f"{what}: {n}" for what, n in storm["outcomes"].items())
    rss = ", ".join(f"{mb:.0f}" for mb in storm["rss_mb_after_round"])
    growth = storm["rss_growth_mb"]
    return [f"## Clients that hang up (--max-batch {max_batch})", "",
            f"{storm['rounds']} round{'s' * (storm['rounds'] != 1)} (after one warm-up round) of "
            f"{storm['clients_per_round']} clients at once, "
            f"half leaving after their first audio bytes, half after {QUEUED_HANG_UP_S} s; CPU: {cpu}.", "",
            f"- what happened to them: {outcomes}",
            f"- every queue slot released after each round: {'yes' if storm['queue_drained'] else 'NO'} "
            f"(within {max(storm['drain_s'], default=0):.1f} s)",
            f"- server RSS: {storm['rss_mb_before']:.0f} MB after the warm-up round, then {rss} MB"
            + (f" ({growth:+.1f} MB)" if growth is not None else ""),
            f"- a request after the storms got its reference audio: {'yes' if storm['served_after'] else 'NO'}"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="engine directory with a vocoder (export/to_onnx.py)")
    p.add_argument("--levels", default="1,2,4,8", help="concurrent clients per level (default: %(default)s)")
    p.add_argument("--requests", type=int, default=8, help="requests per level (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue (default: %(default)s)")
    p.add_argument("--max-batch", default="1", help="the servers' --max-batch, one server each, comma-separated: "
                   "1,4 compares batching with one request at a time (default: %(default)s)")
    p.add_argument("--disconnects", type=int, default=16, help="clients per storm; 0 skips it (default: %(default)s)")
    p.add_argument("--disconnect-rounds", type=int, default=3, help="storms after the warm-up (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=600, help="seconds for everything (default: %(default)s)")
    p.add_argument("--note", default="", help="a sentence for the report, e.g. what else ran on the machine")
    p.add_argument("--out", default="benchmarks/results/serve_load", help="directory for serve_load.json and .md")
    args = p.parse_args(argv)
    for option, example in (("levels", "1,2,4,8"), ("max_batch", "1,4")):
        try:
            setattr(args, option, [int(n) for n in getattr(args, option).split(",")])
        except ValueError:
            p.error(f"--{option.replace('_', '-')} takes comma-separated counts such as {example}, "
                    f"got {getattr(args, option)!r}")
    for option, value, least in (("--levels", min(args.levels), 1), ("--max-batch", min(args.max_batch), 1),
                                 ("--requests", args.requests, 1),
                                 ("--max-queue", args.max_queue, 1), ("--disconnects", args.disconnects, 0),
                                 ("--disconnect-rounds", args.disconnect_rounds, 1),
                                 ("--time-limit", args.time_limit, 1)):
        if value < least:
            p.error(f"{option} must be at least {least}, got {value}")
    manifest = read_manifest(args.engine)
    if not manifest.has_vocoder:
        raise UserError(f"{args.engine} has no vocoder; export it with one (the default of export/to_onnx.py)")
    if max(args.max_batch) > 1 and manifest.attention != "gqa":
        raise UserError(f"--max-batch above 1 needs an engine exported with --attention gqa; {args.engine} has "
                        f"{manifest.attention} attention")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"engine": str(args.engine), "levels": args.levels, "requests": args.requests,
                "sentences": min(args.requests, len(TEXTS)), "max_queue": args.max_queue, "max_batch": args.max_batch,
                "time_limit_s": args.time_limit, "note": args.note, "response_format": "wav"}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "settings": settings,
              "texts": TEXTS, **measure(args)}
    write_text_atomic(out / "serve_load.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "serve_load.md", render_markdown(report))
    print(f"wrote {out}/serve_load.json and serve_load.md")


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
