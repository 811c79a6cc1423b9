"""Continuous batching: the decodes of many requests advanced together, one step graph call per step.

A request joins between steps (its prefill fills a free row of the shared GroupQueryAttention
cache, ``OrtGqaBackend.prefill_row``) and leaves when its text is spoken or its client is gone,
freeing the row for the next one. Each request keeps its own row, noise (its seed) and stop
(``Decoding.take``), and each row advances at its own position (``step_rows``), so a request's
audio is what it would be alone. Post-net and vocoder run per request as in ``Synthesizer.stream``;
their chunks go to one vocoder thread, the chunk of the request that has been given the least audio
first: a new request's first chunk does not wait behind the chunks of streams that are already
playing, and when the CPU cannot keep every stream in real time, they all slow down alike.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from melle.core.decoding import Decoding
from melle.core.manifest import EngineError
from melle_runtime.ort_gqa_backend import OrtGqaBackend
from melle_runtime.streaming import ChunkPlan, MelStream
from melle_runtime.synthesizer import AudioChunk, SynthesisOptions, Synthesizer
from melle_runtime.text_pieces import Piece

# A request whose vocoder jobs not yet done reach this many sits out the steps until one is done:
# decoding never runs far ahead of its audio (as in Synthesizer.stream), and a stopped client costs little.
VOCODER_JOBS_AHEAD = 2


class PriorityExecutor:
    """Runs submitted calls on one thread, lowest ``priority`` first (ties: in the order submitted)."""

    def __init__(self, name: str):
        self.jobs: queue.PriorityQueue = queue.PriorityQueue()
        self.order = itertools.count()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, priority: float, fn: Callable, *args) -> Future:
        future: Future = Future()
        self.jobs.put((priority, next(self.order), future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn, args = self.jobs.get()
            if future is None:  # shutdown
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(err)

    def shutdown(self) -> None:
        """Stop after the call in progress; calls still queued are cancelled."""
        self.jobs.put((-float("inf"), -1, None, None, None))
        self.thread.join()
        while not self.jobs.empty():
            _, _, future, _, _ = self.jobs.get_nowait()
            if future is not None:
                future.cancel()


class BatchRow:
    """One row of the batch's cache as the ``DecoderBackend`` a ``Decoding`` starts on: its prefill
    fills that row only. Its steps are the batcher's, together with the other rows'."""

    def __init__(self, backend: OrtGqaBackend, row: int):
        self.backend, self.row, self.capacity = backend, row, backend.capacity

    def start(self, batch: int, max_len: int) -> None:
        if batch != 1:
            raise ValueError(f"a batch row holds one sequence, not {batch}")
        self.backend.check_capacity(max_len)

    def prefill(self, text, prompt_frames, prompt_masks):
        return self.backend.prefill_row(self.row, text, prompt_frames, prompt_masks)


@dataclass(eq=False)
class SpeechJob:
    """One request: its pieces, where its decode stands, and its audio in playing order."""

    pieces: list[Piece]
    user_prompt: tuple[np.ndarray | None, str | None]
    seed: int | None
    options: SynthesisOptions
    piece: int = -1  # the piece being decoded
    decoding: Decoding | None = None
    stream: MelStream | None = None
    audio_seconds: float = 0.0  # audio handed to the vocoder so far: its vocoder priority
    # (piece, Future of its audio) in playing order; None: the end; an exception: the request failed.
    out: queue.Queue = field(default_factory=queue.Queue)
    vocoding: list[Future] = field(default_factory=list)  # vocoder jobs not yet done
    cancelled: threading.Event = field(default_factory=threading.Event)

    def paused(self) -> bool:
        self.vocoding = [job for job in self.vocoding if not job.done()]
        return len(self.vocoding) >= VOCODER_JOBS_AHEAD

    def fail(self, err: BaseException) -> None:
        self.out.put(err)
        self.drop()

    def drop(self) -> None:
        """Stop: no more decoding, and vocoder jobs not yet started are cancelled."""
        self.decoding = None
        for job in self.vocoding:
            job.cancel()


class ContinuousBatcher:
    """Streams speech for many callers at once over one ``Synthesizer`` whose engine has GQA graphs.

    ``stream`` is ``Synthesizer.stream`` (same arguments, same chunks, same audio) for a caller on any
    thread; up to ``max_batch`` requests decode together, more wait for a free row. ``close()`` stops
    the decode and vocoder threads; requests still in flight end with an error. ``on_step`` hears how
    many requests each step advanced (the server's batch-size metric).
    """

    def __init__(self, synth: Synthesizer, max_batch: int, chunks: ChunkPlan = ChunkPlan(),
                 on_step: Callable[[int], None] | None = None):
        if not isinstance(synth.backend, OrtGqaBackend):
            raise EngineError(f"continuous batching steps each request at its own position, which needs an engine "
                              f"exported with --attention gqa (on ort-cpu backends); {synth.manifest.directory} "
                              "holds standard attention graphs: re-export it with --attention gqa, or serve "
                              "without batching (--max-batch 1)")
        if not 1 <= max_batch <= synth.manifest.batch_max:
            raise EngineError(f"max_batch must be between 1 and the engine's batch_max "
                              f"{synth.manifest.batch_max}, got {max_batch}")
        self.synth, self.chunk_plan, self.on_step = synth, chunks, on_step
        self.backend: OrtGqaBackend = synth.backend
        self.backend.start(max_batch, self.backend.capacity)
        self.rows: list[SpeechJob | None] = [None] * max_batch
        self.waiting: deque[SpeechJob] = deque()
        self.wake = threading.Condition()
        self.closing = False
        self.vocoder = PriorityExecutor("vocoder")
        self.thread = threading.Thread(target=self._loop, name="batch-decode", daemon=True)
        self.thread.start()

    def stream(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
               options: SynthesisOptions = SynthesisOptions()) -> Iterator[AudioChunk]:
        """Audio chunks of ``text`` as the batch decodes it. Bad input raises here, before the first chunk;
        closing the iterator frees the request's row at the next step."""
        self.synth.check_streamable(options)
        prompt, pieces = self.synth.plan(text, prompt_wav, prompt_text, options)
        job = SpeechJob(pieces, (prompt, prompt_text), seed, options)
        with self.wake:
            if self.closing:
                raise RuntimeError("the batcher is closed")
            self.waiting.append(job)
            self.wake.notify()
        return self._chunks(job)

    def _chunks(self, job: SpeechJob) -> Iterator[AudioChunk]:
        try:
            while (item := job.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                piece, audio = item
                yield AudioChunk(audio.result(), self.synth.sample_rate, piece)
        finally:
            job.cancelled.set()
            self._notify()

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join()
        self.vocoder.shutdown()

    def _notify(self, *_) -> None:
        with self.wake:
            self.wake.notify()

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.closing or self._has_work()):
                    self.wake.wait()
                if self.closing:
                    break
                joining = self._seat_waiting()
            try:
                for row, job in joining:
                    self._start_piece(row, job)
                self._step()
            except Exception as err:  # noqa: BLE001 - a bug: fail the requests in the batch, keep serving
                self._fail_all([(row, job) for row, job in enumerate(self.rows) if job is not None], err)
        for job in [*self.rows, *self.waiting]:
            if job is not None:
                job.fail(RuntimeError("the speech server is shutting down"))

    def _has_work(self) -> bool:
        """Frees the rows of requests whose client left; True when a request can join or step."""
        for row, job in enumerate(self.rows):
            if job is not None and job.cancelled.is_set():
                job.drop()
                self.rows[row] = None
        self.waiting = deque(job for job in self.waiting if not job.cancelled.is_set())
        free = None in self.rows
        return (free and bool(self.waiting)) or any(job is not None and not job.paused() for job in self.rows)

    def _seat_waiting(self) -> list[tuple[int, SpeechJob]]:
        seated = []
        for row, job in enumerate(self.rows):
            if job is None and self.waiting:
                self.rows[row] = self.waiting.popleft()
                seated.append((row, self.rows[row]))
        return seated

    def _start_piece(self, row: int, job: SpeechJob) -> None:
        """Prefill ``job``'s next piece into ``row``, or end the request after its last piece."""
        job.piece += 1
        if job.piece == len(job.pieces):
            job.out.put(None)
            self._free(row, job)
            return
        piece = job.pieces[job.piece]
        previous = None if job.stream is None else (np.stack(job.stream.coarse), job.pieces[job.piece - 1].text)
        prompt, prompt_text = self.synth.piece_prompt(piece, job.user_prompt, previous, job.options)
        seed = None if job.seed is None else job.seed + job.piece
        try:
            job.decoding = self.synth.decoding(piece.text, prompt, prompt_text, seed, job.options,
                                               BatchRow(self.backend, row))
        except Exception as err:  # noqa: BLE001 - this request fails, the others go on
            return self._fail(row, job, err)
        job.stream = self.synth.mel_stream(self.chunk_plan, job.stream.chunks if job.stream else 0)

    def _free(self, row: int, job: SpeechJob) -> None:
        with self.wake:
            if self.rows[row] is job:
                self.rows[row] = None

    def _step(self) -> None:
        """One step of every request that is decoding and not paused: latent head, then the step graph."""
        active = [(row, job) for row, job in enumerate(self.rows)
                  if job is not None and job.decoding is not None and not job.paused()]
        if not active:
            return
        if self.on_step:
            self.on_step(len(active))
        drawn = [job.decoding.source.step() for _, job in active]  # (masks, eps) per request, its own noise
        e = np.concatenate([job.decoding.e for _, job in active])
        try:
            _, _, y, stop = self.backend.latent(e, np.concatenate([eps for _, eps in drawn]))
        except Exception as err:  # noqa: BLE001 - these requests fail, the server goes on
            return self._fail_all(active, err)
        going = []
        for i, (row, job) in enumerate(active):
            try:
                over = job.decoding.take(y[i:i + 1], stop[i:i + 1])
                self._vocode(job, job.stream.push(y[i].reshape(-1, self.synth.cfg.n_mels)))
            except Exception as err:  # noqa: BLE001
                self._fail(row, job, err)
                continue
            if over:
                self._end_piece(row, job)
            else:
                going.append((row, job, drawn[i][0]))
        if going:
            self._feed_back(going)

    def _feed_back(self, going: list[tuple[int, SpeechJob, np.ndarray]]) -> None:
        """The step graph over rows ``[0, k)``: the requests in ``going`` feed back their new y' group;
        any other row writes a dummy K/V at its next free slot (overwritten before it is read)."""
        k = max(row for row, _, _ in going) + 1
        cfg = self.synth.cfg
        frames = np.zeros((k, cfg.frame_dim), np.float32)
        masks = np.ones((k, *going[0][2].shape[1:]), np.float32)
        positions = np.zeros(k, np.int32)
        for row in range(k):
            job = self.rows[row]
            if job is not None and job.decoding is not None:
                positions[row] = job.decoding.position + 1  # its next free slot
        for row, job, step_masks in going:
            frames[row], masks[row] = job.decoding.outputs[-1][0], step_masks[0]
            positions[row] = job.decoding.position
        try:
            e = self.backend.step_rows(frames, masks, positions)
        except Exception as err:  # noqa: BLE001
            return self._fail_all([(row, job) for row, job, _ in going], err)
        for row, job, _ in going:
            job.decoding.e = e[row:row + 1]

    def _end_piece(self, row: int, job: SpeechJob) -> None:
        job.decoding.warn_if_cut()
        self._vocode(job, job.stream.finish())
        piece = job.pieces[job.piece]
        if piece.pause_after:
            pause: Future = Future()
            pause.set_result(self.synth.pause(piece))
            job.out.put((job.piece, pause))
            job.audio_seconds += piece.pause_after
        self._start_piece(row, job)

    def _vocode(self, job: SpeechJob, chunks) -> None:
        for chunk in chunks:
            audio = self.vocoder.submit(job.audio_seconds, chunk.run, self.synth.vocode)
            audio.add_done_callback(self._notify)
            job.vocoding.append(audio)
            job.out.put((job.piece, audio))
            job.audio_seconds += (chunk.stop - chunk.start) / self.synth.sample_rate

    def _fail(self, row: int, job: SpeechJob, err: BaseException) -> None:
        job.fail(err)
        self._free(row, job)

    def _fail_all(self, active: list[tuple[int, SpeechJob]], err: BaseException) -> None:
        for row, job in active:
            self._fail(row, job, err)
