"""An OpenAI-compatible speech server over the runtime: ``POST /v1/audio/speech`` and friends.

    python -m melle_runtime.serve --engine engines/demo [--host 127.0.0.1 --port 8000] [--voices DIR]
        [--max-queue 8] [--max-chars 4096] [--threads N] [--max-batch N]

Speech is streamed as it is made (``Synthesizer.stream``): as raw bytes of ``response_format``
(``stream_format="audio"``) or as server-sent events (``"sse"``: ``speech.audio.delta`` events
with base64 audio, then ``speech.audio.done``). Decoding runs off the event loop. By default one
engine decodes one request at a time; with ``--max-batch N`` (engines exported with
``--attention gqa``) up to N requests decode together, joining and leaving the batch between steps
(``melle_runtime.batching``). Up to ``--max-queue`` requests are admitted (decoding or waiting),
more get 429. A client that disconnects stops its decoding at the next chunk (batched: frees its
row at the next step). Errors found before the audio starts are
OpenAI-shaped JSON (400 bad input, 422 schema, 429 queue full, 503 loading); a failure once the
audio flows ends the stream without its final bytes and is counted in ``/metrics``.

Voices: ``demo`` (the engine's own voice, no prompt) and, with ``--voices DIR``, one voice per
``NAME.wav`` with its transcript in ``NAME.txt``, listed by ``GET /v1/audio/voices``.

The app is built from :class:`ServerSettings` by :func:`build_app`, here behind uvicorn and in
``melle_runtime.serve_ray`` once per Ray Serve replica.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict

from melle.core.audio import AudioError
from melle.core.cli import ExitCode, UserError, run_cli
from melle.core.manifest import EngineError, read_manifest
from melle.core.text import EmptyTextError, UnknownSymbolError
from melle_runtime.audio_encoding import CONTENT_TYPES, chunk_encoder
from melle_runtime.batching import ContinuousBatcher
from melle_runtime.synthesizer import BACKENDS, AudioChunk, Synthesizer

DEFAULT_VOICE = "demo"
MODEL_ID = "melle"
# Names OpenAI clients send by default; they all mean this engine.
MODEL_ALIASES = (MODEL_ID, "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
BAD_INPUT = (EmptyTextError, UnknownSymbolError, AudioError, EngineError, ValueError)


class SpeechRequest(BaseModel):
    """OpenAI's ``/v1/audio/speech`` body; unknown fields are a schema error (422), not ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str
    voice: str = DEFAULT_VOICE
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"


class ApiError(Exception):
    """An error answered before any audio: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


@dataclass(frozen=True)
class Voice:
    name: str
    prompt_wav: Path | None = None  # None: the engine's own voice, unprompted
    prompt_text: str | None = None


def load_voices(directory: str | Path | None) -> dict[str, Voice]:
    """``demo`` plus one voice per ``NAME.wav`` + ``NAME.txt`` in ``directory``."""
    voices = {DEFAULT_VOICE: Voice(DEFAULT_VOICE)}
    if directory is None:
        return voices
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--voices {directory} is not a directory: give a folder of NAME.wav + NAME.txt pairs")
    for wav in sorted(directory.glob("*.wav")):
        transcript = wav.with_suffix(".txt")
        if not transcript.is_file():
            raise UserError(f"voice {wav.name} has no transcript: write what it says into {transcript.name}")
        voices[wav.stem] = Voice(wav.stem, wav, transcript.read_text(encoding="utf-8").strip())
    return voices


class Metrics:
    """What ``/metrics`` reports, in the app's own Prometheus registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("melle_speech_requests", "speech requests by outcome", ["outcome"],
                                registry=self.registry)
        self.queue_depth = Gauge("melle_queue_depth", "speech requests admitted and not finished",
                                 registry=self.registry)
        self.first_audio = Histogram("melle_time_to_first_audio_seconds", "request in -> first audio bytes out",
                                     registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.rtf = Histogram("melle_real_time_factor", "synthesis seconds per second of audio",
                             registry=self.registry, buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 4))
        self.batch_rows = Histogram("melle_decode_batch_rows", "requests advanced by each decoder step (--max-batch)",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16))


class SpeechService:
    """The engine, its voices and the worker threads that stream requests' audio, with a bounded queue.

    Unbatched, one worker decodes one request at a time. Batched, each admitted request has a worker
    that hands on the chunks the batcher's decode thread makes for it.
    """

    def __init__(self, engine: str | Path, voices: dict[str, Voice], backend: str = "ort-cpu",
                 max_queue: int = 8, max_chars: int = 4096, threads: int | None = None, max_batch: int = 1):
        self.engine, self.backend, self.voices, self.threads = engine, backend, voices, threads
        self.max_queue, self.max_chars, self.max_batch = max_queue, max_chars, max_batch
        self.synth: Synthesizer | None = None  # set once loaded and warmed up
        self.batcher: ContinuousBatcher | None = None  # with max_batch > 1
        self.load_error: str | None = None  # why loading failed, if it did
        self.worker = ThreadPoolExecutor(max_workers=1 if max_batch == 1 else max_queue + 1,
                                         thread_name_prefix="speech")
        self.admitted = 0
        self.lock = threading.Lock()
        self.metrics = Metrics()

    def load(self) -> None:
        """Load the engine, check every voice's prompt and run one synthesis (on the worker thread)."""
        try:
            synth = Synthesizer(self.engine, backend=self.backend, threads=self.threads)
            for voice in self.voices.values():
                if voice.prompt_wav is not None:
                    synth.prompt_mel(voice.prompt_wav, voice.prompt_text)
            if self.max_batch > 1:
                self.batcher = ContinuousBatcher(synth, self.max_batch, on_step=self.metrics.batch_rows.observe)
            list((self.batcher or synth).stream("Ready.", seed=0))
        except Exception as err:  # noqa: BLE001 - the server stays up and says why in /health
            self.load_error = f"{type(err).__name__}: {err}"
            print(f"error: the engine did not load: {self.load_error}", file=sys.stderr)
            return
        self.synth = synth

    def chunks(self, text: str, voice: Voice) -> Iterator[AudioChunk]:
        """``text`` spoken by ``voice`` as audio chunks (seed 0: a request's audio does not depend on the load)."""
        return (self.batcher or self.synth).stream(text, voice.prompt_wav, voice.prompt_text, seed=0)

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.close()

    def check(self, request: SpeechRequest) -> Voice:
        """The request's voice, once everything that can be checked without decoding is fine."""
        if self.synth is None:
            message = (f"the engine failed to load ({self.load_error})" if self.load_error else
                       "the engine is still loading; retry shortly (GET /health says when it is ready)")
            raise ApiError(503, message, kind="server_error")
        if request.model not in MODEL_ALIASES:
            raise ApiError(400, f"unknown model {request.model!r}; use {MODEL_ID!r} (GET /v1/models)", "model")
        if request.response_format not in CONTENT_TYPES:
            raise ApiError(400, f"unknown response_format {request.response_format!r}; choose one of "
                                f"{sorted(CONTENT_TYPES)}", "response_format")
        if request.stream_format not in ("audio", "sse"):
            raise ApiError(400, f"unknown stream_format {request.stream_format!r}; choose 'audio' or 'sse'",
                           "stream_format")
        if request.speed != 1.0:
            raise ApiError(400, f"speed {request.speed} is not supported: this voice speaks at its own pace; "
                                "send 1.0", "speed")
        if not request.input.strip():
            raise ApiError(400, "input is empty: send the text to speak", "input")
        if len(request.input) > self.max_chars:
            raise ApiError(400, f"input has {len(request.input)} characters, more than this server's "
                                f"{self.max_chars} (--max-chars); split it into several requests", "input")
        if request.voice not in self.voices:
            raise ApiError(400, f"unknown voice {request.voice!r}; this server has {sorted(self.voices)} "
                                "(GET /v1/audio/voices)", "voice")
        return self.voices[request.voice]

    def admit(self) -> None:
        with self.lock:
            if self.admitted >= self.max_queue:
                raise ApiError(429, f"{self.admitted} requests are in the queue (--max-queue {self.max_queue}); "
                                    "retry later", kind="rate_limit_error")
            self.admitted += 1
            self.metrics.queue_depth.set(self.admitted)

    def release(self) -> None:
        with self.lock:
            self.admitted -= 1
            self.metrics.queue_depth.set(self.admitted)


class AudioStream:
    """One request's audio: decoded on the worker thread, handed to the event loop as encoded bytes."""

    def __init__(self, service: SpeechService, request: SpeechRequest, voice: Voice):
        self.service, self.request, self.voice = service, request, voice
        self.loop = asyncio.get_running_loop()
        self.messages: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.began = time.perf_counter()
        self.outcome = "disconnected"  # until the audio is done or has failed

    def _send(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (kind, value))

    def produce(self) -> None:
        """Worker thread: check the text (an error here is answered as JSON), then stream its audio.

        The request's queue slot is released here, whatever happens to the client, and before the
        client hears that its request ended: its next request (or one Ray sends) finds the slot free.
        """
        last = None
        try:
            last = self._produce(self.service.synth)
        finally:
            self.service.release()
            if last is not None:
                self._send(*last)

    def _produce(self, synth: Synthesizer) -> tuple[str, object] | None:
        """Send the audio; returns the message that ends the request (None: the client has left)."""
        if self.cancelled.is_set():  # the client left while queued: decode nothing for it
            return None
        try:
            chunks = self.service.chunks(self.request.input, self.voice)
            encoder = chunk_encoder(self.request.response_format, synth.sample_rate)
        except BAD_INPUT as err:
            return "refused", ApiError(400, str(err), "input")
        except Exception as err:  # noqa: BLE001 - a bug, answered as a 500 rather than a hung request
            return "refused", ApiError(500, f"{type(err).__name__}: {err}", kind="server_error")
        self._send("ready")
        samples = 0
        try:
            for chunk in chunks:
                if self.cancelled.is_set():  # the client hung up
                    return None
                samples += len(chunk.wav)
                self._send("audio", encoder.encode(chunk.wav))
            self._send("audio", encoder.finish())
            return "done", samples / synth.sample_rate
        except Exception as err:  # noqa: BLE001 - reported to the client's stream and counted
            return "failed", err
        finally:
            chunks.close()

    async def start(self) -> None:
        """Queue the work and wait until it is either refused (ApiError) or producing audio."""
        self.service.worker.submit(self.produce)
        try:
            kind, value = await self.messages.get()
        except asyncio.CancelledError:  # the client left while queued and Ray Serve cancelled this handler
            self.cancelled.set()
            self.service.metrics.requests.labels(self.outcome).inc()
            raise
        if kind == "refused":
            raise value

    async def audio(self) -> AsyncIterator[bytes]:
        """Encoded bytes as they come; ends (without the final bytes) on failure or disconnect."""
        metrics, first = self.service.metrics, True
        try:
            while True:
                kind, value = await self.messages.get()
                if kind == "audio":
                    if value:
                        if first:
                            metrics.first_audio.observe(time.perf_counter() - self.began)
                            first = False
                        yield value
                elif kind == "done":
                    metrics.rtf.observe((time.perf_counter() - self.began) / max(value, 1e-9))
                    self.outcome = "ok"
                    return
                else:  # "failed": the stream ends short, and is counted as such
                    self.outcome = "failed"
                    print(f"speech request failed mid-stream: {value!r}", file=sys.stderr)
                    return
        finally:
            self.cancelled.set()  # a disconnected client's decoding stops at its next chunk
            metrics.requests.labels(self.outcome).inc()

    async def events(self) -> AsyncIterator[bytes]:
        """The audio as OpenAI's server-sent events."""
        async for data in self.audio():
            yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        if self.outcome == "ok":
            yield sse({"type": "speech.audio.done"})


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def create_app(service: SpeechService, load_in_background: bool = True) -> FastAPI:
    """The FastAPI app over ``service``; the engine loads at startup (in the background: /health says when)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = asyncio.get_running_loop().run_in_executor(service.worker, service.load)
        if not load_in_background:
            await loading
        yield
        service.close()

    app = FastAPI(title="melle-rt speech", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        if err.status != 429:
            service.metrics.requests.labels(f"refused_{err.status}").inc()
        else:
            service.metrics.requests.labels("queue_full").inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def schema_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        service.metrics.requests.labels("refused_422").inc()
        return ApiError(422, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param).response()

    @app.post("/v1/audio/speech")
    async def speech(request: SpeechRequest) -> Response:
        voice = service.check(request)
        service.admit()
        stream = AudioStream(service, request, voice)
        await stream.start()
        headers = {"Cache-Control": "no-cache"}
        if request.stream_format == "sse":
            return StreamingResponse(stream.events(), media_type="text/event-stream", headers=headers)
        return StreamingResponse(stream.audio(), media_type=CONTENT_TYPES[request.response_format], headers=headers)

    @app.get("/v1/audio/voices")
    async def voices() -> dict:
        return {"voices": [{"id": v.name, "name": v.name, "prompted": v.prompt_wav is not None}
                           for v in service.voices.values()]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "melle-rt"}
                                           for name in MODEL_ALIASES]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.load_error:
            return JSONResponse({"status": "failed", "error": service.load_error}, status_code=500)
        if service.synth is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "queue": service.admitted, "max_queue": service.max_queue})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


@dataclass(frozen=True)
class ServerSettings:
    """What the app is built from. Paths are absolute: a Ray replica may start in another directory."""

    engine: Path
    voices: dict[str, Voice]
    backend: str = "ort-cpu"
    max_queue: int = 8  # requests decoding or waiting; more get 429
    max_chars: int = 4096  # longest input accepted
    threads: int | None = None  # ONNX Runtime intra-op threads; None: one per core
    max_batch: int = 1  # requests decoded together (continuous batching; > 1 needs a gqa engine)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The options every way of serving shares (uvicorn here, Ray Serve in serve_ray)."""
    p.add_argument("--engine", required=True, help="engine directory with a vocoder (export/to_onnx.py)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--voices", help="folder of NAME.wav + NAME.txt voice prompts")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    p.add_argument("--max-queue", type=int, default=8, help="requests decoding or waiting; more get 429")
    p.add_argument("--max-chars", type=int, default=4096, help="longest input accepted")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per engine (default: one per core)")
    p.add_argument("--max-batch", type=int, default=1,
                   help="requests decoded together by continuous batching; above 1 needs an engine exported "
                        "with --attention gqa (default: 1, one request at a time)")


def server_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> ServerSettings:
    """Checked settings: bad limits are usage errors, a missing engine or voice an error before serving."""
    limits = {"--max-queue": args.max_queue, "--max-chars": args.max_chars, "--threads": args.threads,
              "--max-batch": args.max_batch}
    for option, value in limits.items():
        if value is not None and value < 1:
            p.error(f"{option} must be at least 1, got {value}")
    engine = Path(args.engine).resolve()
    manifest = read_manifest(engine)  # a missing or damaged engine is an error before the server starts
    if args.max_batch > 1 and manifest.attention != "gqa":
        raise UserError(f"--max-batch {args.max_batch} needs an engine exported with --attention gqa (each request "
                        f"decodes at its own position); {engine} has {manifest.attention} attention: re-export "
                        "it with --attention gqa, or leave out --max-batch")
    if args.max_batch > manifest.batch_max:
        p.error(f"--max-batch {args.max_batch} is more than the engine's batch_max {manifest.batch_max}")
    voices = load_voices(Path(args.voices).resolve() if args.voices else None)
    return ServerSettings(engine, voices, args.backend, args.max_queue, args.max_chars, args.threads,
                          args.max_batch)


def build_app(settings: ServerSettings, load_in_background: bool = True) -> FastAPI:
    """A new service over ``settings`` and its app; each call loads its own engine at startup."""
    service = SpeechService(settings.engine, settings.voices, settings.backend, settings.max_queue,
                            settings.max_chars, settings.threads, settings.max_batch)
    return create_app(service, load_in_background)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(p)
    args = p.parse_args(argv)
    settings = server_settings(p, args)
    import uvicorn

    uvicorn.run(build_app(settings), host=args.host, port=args.port)


def cli() -> None:
    sys.exit(run_cli(main, {EngineError: ExitCode.MODEL}))


if __name__ == "__main__":
    cli()
