"""The speech server on Ray Serve, as its users run it: the CLI on a local Ray, called with the real `openai` client."""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from melle_runtime.serve_ray import REPLICA_HEADER, main
from melle_runtime.synthesizer import Synthesizer
from test_serve import decode, free_port

START_TIMEOUT_S = 240  # a local Ray, its Serve controller and proxy, and two replicas loading the tiny engine
STOP_TIMEOUT_S = 90


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Ray's gcs, raylet and their workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    running = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
        except OSError:
            pass
    return running


class RayServer:
    """``python -m melle_runtime.serve_ray`` in its own session; ``stop`` ends it the way a user would."""

    def __init__(self, engine: Path, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "melle_runtime.serve_ray", "--engine", str(engine), "--replicas", "2",
                   "--replica-cpus", "0.5", "--num-cpus", "2", "--max-queue", "2", "--port", str(self.port)]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        self.processes: set[int] = set()  # the driver and all it started, recorded once serving

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve_ray exited with {self.process.returncode}:\n{self.log_tail()}")
            if b"serving http" in self.log.read_bytes():
                self.processes = {self.process.pid} | descendants(self.process.pid)
                return
            time.sleep(0.5)
        raise AssertionError(f"serve_ray was not serving within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> set[int]:
        """SIGTERM to the driver alone; returns the processes still running once it has had its time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 30  # workers notice the raylet is gone within seconds
        while alive(self.processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        return alive(self.processes)

    def kill(self) -> None:
        """Whatever is left of what this test started: never leave processes behind."""
        for pid in alive(self.processes | {self.process.pid}):
            os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def ray_server(voiced_engine, tmp_path_factory):
    server = RayServer(voiced_engine, tmp_path_factory.mktemp("ray") / "serve_ray.log")
    try:
        server.wait_until_serving()
        yield server
    finally:
        server.stop()
        server.kill()


@pytest.fixture
def client(ray_server):
    return openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_streamed_audio_passes_through_the_proxy_unchanged(client, voiced_engine):
    text = "One sentence here. Another one there. And a third one."
    with client.audio.speech.with_streaming_response.create(model="melle", voice="demo", input=text,
                                                            response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        parts = list(response.iter_bytes())
    assert len(parts) > 1 and parts[0].startswith(b"RIFF")  # chunks as they were made, not one buffered body
    audio, rate = decode(b"".join(parts))
    with Synthesizer(voiced_engine) as synth:
        expected = synth.synthesize(text, seed=0)[0]
    # Streamed and whole synthesis differ by float rounding (< 1e-4, tests/test_streaming.py), then 16-bit rounding.
    assert rate == 22050 and len(audio) == len(expected) and np.abs(audio - expected).max() < 1e-4 + 1 / 32768


def test_whole_responses_and_sse_decode(client, ray_server):
    data = client.audio.speech.create(model="tts-1", voice="demo", input="Hello there.", response_format="mp3").read()
    assert len(decode(data)[0]) > 0
    body = {"model": "melle", "input": "Hello there.", "voice": "demo", "response_format": "pcm",
            "stream_format": "sse"}
    with httpx.stream("POST", f"{ray_server.url}/v1/audio/speech", json=body, timeout=120) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2 and '"speech.audio.done"' in events[-1]


def test_requests_are_served_by_both_replicas(client):
    def replica(i: int) -> str:
        response = client.audio.speech.with_raw_response.create(
            model="melle", voice="demo", input=f"Request number {i} is this one.", response_format="wav")
        assert len(decode(response.content)[0]) > 0
        return response.headers[REPLICA_HEADER]

    seen: set[str] = set()
    with ThreadPoolExecutor(4) as pool:  # concurrent requests: Ray sends the next to the less busy replica
        for round_ in range(5):
            seen |= set(pool.map(replica, range(4 * round_, 4 * round_ + 4)))
            if len(seen) == 2:
                break
    assert len(seen) == 2, seen


def test_a_client_that_hangs_up_stops_its_replicas_decoding(ray_server):
    body = {"model": "melle", "input": "Short one. " * 25, "voice": "demo", "response_format": "wav"}
    with httpx.stream("POST", f"{ray_server.url}/v1/audio/speech", json=body, timeout=120) as response:
        replica = response.headers[REPLICA_HEADER]
        next(response.iter_raw())  # the first bytes, then hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the proxy spreads these over both replicas: read the one that decoded
        metrics = httpx.get(f"{ray_server.url}/metrics", timeout=10)
        if (metrics.headers[REPLICA_HEADER] == replica
                and 'melle_speech_requests_total{outcome="disconnected"} 1.0' in metrics.text
                and "melle_queue_depth 0.0" in metrics.text):
            return
        time.sleep(0.1)
    raise AssertionError(f"replica {replica} did not count the hang-up and free its slot within 30 s")


def replica_counters(url: str) -> dict[str, dict[str, float]]:
    """Each replica's requests by outcome, and its queue depth as "queue", read until both have answered."""
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        response = httpx.get(f"{url}/metrics", timeout=10)
        counters = dict(re.findall(r'melle_speech_requests_total\{outcome="(\w+)"\} ([\d.]+)', response.text))
        counters["queue"] = re.search(r"^melle_queue_depth ([\d.]+)", response.text, re.M).group(1)
        seen[response.headers[REPLICA_HEADER]] = {k: float(v) for k, v in counters.items()}
    assert len(seen) == 2, "the proxy did not reach both replicas in 30 s"
    return seen


def test_a_client_that_leaves_while_queued_is_counted_and_costs_no_decoding(ray_server):
    url, long = ray_server.url, {"model": "melle", "input": "Short one. " * 60, "voice": "demo",
                                 "response_format": "wav"}
    before = replica_counters(url)
    with ThreadPoolExecutor(3) as pool:  # both replicas busy, one with a request waiting behind
        busy = [pool.submit(httpx.post, f"{url}/v1/audio/speech", json=long, timeout=120) for _ in range(3)]
        time.sleep(0.2)
        with pytest.raises(httpx.TimeoutException):  # queued: not a byte within 0.5 s, so it leaves
            httpx.post(f"{url}/v1/audio/speech", json=long, timeout=0.5)
        assert [f.result().status_code for f in busy] == [200] * 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = replica_counters(url)
        if all(counters["queue"] == 0 for counters in after.values()):
            break
        time.sleep(0.2)
    added = {outcome: sum(after[r].get(outcome, 0) - before[r].get(outcome, 0) for r in after)
             for outcome in ("ok", "disconnected", "queue")}
    assert added == {"ok": 3, "disconnected": 1, "queue": 0}


def test_past_the_replicas_and_the_proxy_queue_requests_get_429(ray_server):
    body = {"model": "melle", "input": "Short one. " * 25, "voice": "demo", "response_format": "wav"}

    def status(_) -> int:
        return httpx.post(f"{ray_server.url}/v1/audio/speech", json=body, timeout=120).status_code

    # 2 replicas x --max-queue 2 at the replicas, 2 more held at the proxy: of 10 at once, some must be refused
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(status, range(10)))
    assert set(statuses) == {200, 429} and statuses.count(200) >= 6, statuses


def test_bad_input_keeps_its_openai_shaped_error(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="melle", voice="nobody", input="Hello.", response_format="wav")
    assert caught.value.body["param"] == "voice"


def test_stopping_leaves_no_process_running(ray_server):
    assert len(ray_server.processes) > 3  # the driver, Ray's own processes and both replicas
    assert ray_server.stop() == set(), ray_server.log_tail()
    assert ray_server.process.returncode == 0, ray_server.log_tail()


@pytest.mark.parametrize("options, words", [
    (["--min-replicas", "1"], "give both"),
    (["--replicas", "2", "--min-replicas", "1", "--max-replicas", "2"], "not both"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas <= --max-replicas"),
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--replica-cpus", "0"], "must be positive"),
    (["--num-cpus", "2", "--address", "auto"], "has its own CPUs"),
])
def test_bad_scaling_options_are_usage_errors_before_ray_starts(capsys, options, words):
    with pytest.raises(SystemExit) as caught:
        main(["--engine", "unused", *options])
    assert caught.value.code == 2 and words in capsys.readouterr().err
