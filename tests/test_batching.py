"""Continuous batching: requests that decode together each sound exactly as they would alone."""

import threading
from concurrent.futures import CancelledError
import time
import warnings

import numpy as np
import pytest

from melle.core.manifest import EngineError, read_manifest
from melle_runtime.batching import ContinuousBatcher, PriorityExecutor
from melle_runtime.ort_gqa_backend import OrtGqaBackend
from melle_runtime.synthesizer import SynthesisOptions, Synthesizer

# The stop head of the tiny voiced engine ends pieces after 1-16 frames; capping them at 0.3 s with
# the stop head out of reach makes every piece run 26 frames, so requests overlap for many steps.
LONG = SynthesisOptions(max_seconds=0.3, stop_threshold=1 - 1e-12)
REQUESTS = [  # (text, seed, options): one piece, several pieces, stop head on, rolling prompt
    ("Hello there.", 0, LONG),
    ("One sentence. Then another one. And a third.", 5, LONG),
    ("The stop head decides.", 2, SynthesisOptions()),
    ("Rolling along. Piece by piece.", 7, SynthesisOptions(max_seconds=0.3, rolling_prompt=True)),
]


def start(source, text: str, seed: int, options: SynthesisOptions):
    return source.stream(text, seed=seed, options=options)


def speak(source, *request) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pieces cut at max_seconds say so
        return np.concatenate([chunk.wav for chunk in start(source, *request)])


@pytest.fixture(scope="module")
def alone(voiced_gqa_engine):
    """Each request's audio with the engine to itself (Synthesizer.stream)."""
    with Synthesizer(voiced_gqa_engine) as synth:
        return [speak(synth, *request) for request in REQUESTS]


@pytest.fixture
def batcher(voiced_gqa_engine):
    rows_per_step: list[int] = []
    batcher = ContinuousBatcher(Synthesizer(voiced_gqa_engine), max_batch=3, on_step=rows_per_step.append)
    batcher.rows_per_step = rows_per_step
    yield batcher
    batcher.close()


def test_requests_decoded_together_equal_each_alone(batcher, alone):
    with warnings.catch_warnings(), batcher.wake:  # the decode thread seats none before all are asked for
        warnings.simplefilter("ignore")  # pieces cut at max_seconds say so
        streams = [start(batcher, *request) for request in REQUESTS]
    out = [None] * len(REQUESTS)

    def consume(i: int) -> None:
        out[i] = np.concatenate([chunk.wav for chunk in streams[i]])

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # Three rows for four requests: three decoded together and the fourth joined when a row came
    # free, mid-decode of the others. Each row's arithmetic is its own: the same bits, not merely close.
    assert max(batcher.rows_per_step) == 3
    for ours, reference in zip(out, alone):
        assert ours is not None and ours.shape == reference.shape
        assert np.array_equal(ours, reference)
    assert batcher.rows == [None] * 3


def test_rows_at_different_positions_step_as_each_alone(voiced_gqa_engine):
    manifest = read_manifest(voiced_gqa_engine)
    cfg, rng = manifest.config, np.random.default_rng(0)
    batched, single = OrtGqaBackend(manifest), OrtGqaBackend(manifest)
    batched.start(2, 64)
    texts = [rng.integers(2, 20, (1, n)).astype(np.int64) for n in (9, 5)]
    empty = np.zeros((1, 0, cfg.frame_dim), np.float32), np.zeros((1, 0, 2, cfg.prenet_dim), np.float32)
    other_row = batched.buffers[0][1].copy()
    batched.prefill_row(0, texts[0], *empty)
    assert np.array_equal(batched.buffers[0][1], other_row)  # a prefill fills its row only
    batched.prefill_row(1, texts[1], *empty)
    frames = rng.standard_normal((2, cfg.frame_dim)).astype(np.float32)
    masks = np.ones((2, 2, cfg.prenet_dim), np.float32)
    e = batched.step_rows(frames, masks, np.array([9, 5]))
    for row, (text, position) in enumerate(zip(texts, (9, 5))):
        single.start(1, 64)
        single.prefill(text, *empty)
        assert np.array_equal(single.step(frames[row:row + 1], masks[row:row + 1], position), e[row:row + 1])
        assert np.array_equal(single.buffers[0][0, :, :position + 1], batched.buffers[0][row, :, :position + 1])


def test_a_client_that_leaves_frees_its_row(batcher, alone):
    chunks = start(batcher, *REQUESTS[1])
    next(chunks)
    chunks.close()
    for _ in range(200):
        if batcher.rows == [None] * 3:
            break
        time.sleep(0.01)
    assert batcher.rows == [None] * 3
    assert np.array_equal(speak(batcher, *REQUESTS[0]), alone[0])  # and the batch goes on serving


def test_bad_input_fails_before_the_first_chunk(batcher):
    with pytest.raises(ValueError, match="one candidate"):
        batcher.stream("Hello.", options=SynthesisOptions(candidates=2))
    assert not batcher.waiting


def test_closing_ends_requests_in_flight_with_an_error(voiced_gqa_engine):
    batcher = ContinuousBatcher(Synthesizer(voiced_gqa_engine), max_batch=1)
    chunks = [start(batcher, *REQUESTS[1]) for _ in range(2)]  # one decoding, one waiting
    next(chunks[0])
    batcher.close()
    for stream in chunks:
        with pytest.raises((RuntimeError, CancelledError)):  # never a short stream that looks complete
            list(stream)


def test_standard_engines_and_oversized_batches_are_refused_with_what_to_do(voiced_engine, voiced_gqa_engine):
    with pytest.raises(EngineError, match="--attention gqa"):
        ContinuousBatcher(Synthesizer(voiced_engine), max_batch=2)
    with pytest.raises(EngineError, match="batch_max"):
        ContinuousBatcher(Synthesizer(voiced_gqa_engine), max_batch=1000)


def test_vocoder_jobs_run_lowest_priority_value_first():
    executor = PriorityExecutor("test")
    gate, ran = threading.Event(), []
    executor.submit(0, gate.wait)  # holds the thread while the others queue up
    jobs = [executor.submit(priority, ran.append, priority) for priority in (3.0, 1.0, 2.0)]
    gate.set()
    for job in jobs:
        job.result(timeout=10)
    assert ran == [1.0, 2.0, 3.0]
    executor.shutdown()


def test_a_bug_in_one_step_fails_the_requests_in_the_batch_and_it_goes_on_serving(batcher, alone, monkeypatch):
    def broken(*_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(batcher.synth, "mel_stream", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        list(start(batcher, *REQUESTS[0]))
    monkeypatch.undo()
    assert np.array_equal(speak(batcher, *REQUESTS[0]), alone[0])
