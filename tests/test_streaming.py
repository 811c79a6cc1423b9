"""Streaming synthesis: audio chunks while decoding runs, which together equal the whole utterance."""

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from melle.core.manifest import EngineError
from melle.core.text import EmptyTextError
from melle_runtime.streaming import ChunkPlan, MelStream
from melle_runtime.synthesizer import SynthesisOptions, Synthesizer

# Streamed vs whole waveform, max abs: the chunks run the same graphs on windows of other lengths, so
# only float rounding differs (measured up to 1.1e-5 with one-frame chunks on the tiny voiced engine,
# samples span +-1; a chunk short of context is off by ~1e-1, see the stand-in test above).
STREAM_TOLERANCE = 1e-4
# The tiny voiced engine stops after 1-16 frames by itself; with the stop head out of reach every
# piece runs to its cap, 52 frames (0.6 s), so chunks of every size are made.
NO_STOP = 1 - 1e-12
# Pieces of a known length: no stop head, and no alignment guide (it would force a stop at the text's end).
SHORT = SynthesisOptions(max_seconds=0.6, stop_threshold=NO_STOP, align_guide="off")
PLANS = [ChunkPlan(), ChunkPlan(first_frames=1, max_frames=1), ChunkPlan(first_frames=3, max_frames=7)]


# --- MelStream on numpy stand-ins whose receptive fields are known exactly -------------------------

def conv_same(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' convolution along axis 0 (the graphs' padding), any radius."""
    radius = len(weights) // 2
    padded = np.pad(x, [(radius, radius)] + [(0, 0)] * (x.ndim - 1))
    return sum(w * padded[k: k + len(x)] for k, w in enumerate(weights))


def stand_ins(postnet_context: int, vocoder_context: int, hop: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    post_w = rng.standard_normal(2 * postnet_context + 1)
    voc_w = rng.standard_normal(2 * vocoder_context * hop + 1)
    postnet = lambda coarse: coarse + conv_same(coarse, post_w)  # noqa: E731
    # Each frame becomes `hop` samples; a conv of radius context * hop samples reaches `context` frames.
    vocode = lambda mel: conv_same(np.repeat(mel.sum(axis=1), hop), voc_w)  # noqa: E731
    return postnet, vocode


def streamed(stream: MelStream, coarse: np.ndarray, vocode, group: int) -> list[np.ndarray]:
    """Push ``coarse`` ``group`` frames at a time, as a decoder with reduction factor ``group`` would."""
    jobs = []
    for start in range(0, len(coarse), group):
        jobs += stream.push(coarse[start:start + group])
    jobs += stream.finish()
    return [job.run(vocode) for job in jobs]


@pytest.mark.parametrize("frames", [1, 2, 9, 40, 131])
@pytest.mark.parametrize("plan", PLANS + [ChunkPlan(first_frames=5, max_frames=1000)])
@pytest.mark.parametrize("group", [1, 4])
def test_mel_stream_chunks_join_to_the_whole(frames, plan, group):
    postnet, vocode = stand_ins(postnet_context=3, vocoder_context=5, hop=4)
    coarse = np.random.default_rng(frames).standard_normal((frames, 2))
    stream = MelStream(postnet, 3, 5, hop=4, plan=plan)
    chunks = streamed(stream, coarse, vocode, group)
    whole = vocode(postnet(coarse))
    assert all(len(c) for c in chunks), "no chunk is empty"
    np.testing.assert_allclose(np.concatenate(chunks), whole, rtol=0, atol=1e-9)


def test_mel_stream_sizes_follow_the_plan_and_wait_for_their_look_ahead():
    postnet, vocode = stand_ins(postnet_context=2, vocoder_context=3, hop=1)
    stream = MelStream(postnet, 2, 3, hop=1, plan=ChunkPlan(first_frames=4, max_frames=10))
    assert stream.push(np.ones((8, 1))) == []  # chunk 0 needs 4 + 3 + 2 frames
    first = stream.push(np.ones((1, 1)))
    assert [job.stop - job.start for job in first] == [4]
    jobs = stream.push(np.ones((40, 1)))
    assert [job.stop - job.start for job in jobs] == [8, 10, 10, 10]  # doubling, capped; 42 + 5 <= 49 < 52 + 5
    assert [job.stop - job.start for job in stream.finish()] == [49 - 42]


@pytest.mark.parametrize("short", ["postnet", "vocoder"])
def test_mel_stream_with_too_little_context_differs(short):
    """The equality above depends on the receptive fields: one frame less of context breaks it."""
    postnet, vocode = stand_ins(postnet_context=3, vocoder_context=5, hop=4)
    coarse = np.random.default_rng(0).standard_normal((60, 2))
    stream = MelStream(postnet, 3 - (short == "postnet"), 5 - (short == "vocoder"), hop=4,
                       plan=ChunkPlan(first_frames=4, max_frames=8))
    joined = np.concatenate(streamed(stream, coarse, vocode, 1))
    assert np.abs(joined - vocode(postnet(coarse))).max() > 1e-3


def test_chunk_plan_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="first_frames <= max_frames"):
        ChunkPlan(first_frames=0)
    with pytest.raises(ValueError, match="first_frames <= max_frames"):
        ChunkPlan(first_frames=9, max_frames=8)


# --- The receptive fields the manifest records ------------------------------------------------------

def reach(module, frames: int, n_mels: int, hop: int) -> tuple[int, int]:
    """Frames before and after a perturbed frame whose output samples change (first/last affected).

    In float64: in float32 the bump's smallest effects at the edge of the receptive field can round
    to exactly nothing (seen on an AVX-512 Intel Xeon), which would understate the reach.
    """
    import copy

    import torch

    module = copy.deepcopy(module).double()
    mel = torch.randn(1, frames, n_mels, dtype=torch.float64)
    centre = frames // 2
    bumped = mel.clone()
    bumped[0, centre] += 1.0
    with torch.no_grad():
        diff = (module(bumped) - module(mel)).abs()  # [1, samples] or [1, frames, n_mels]
    changed = (diff.amax(dim=-1) if diff.dim() == 3 else diff)[0] > 0
    where = torch.nonzero(changed)[:, 0]
    return centre - int(where.min()) // hop, int(where.max()) // hop - centre


def hifigan_generators():
    """Small random HiFi-GANs of both residual block types, and the universal V1 the exporter uses."""
    import dataclasses

    import torch

    from melle.vocoder import Generator, HifiganConfig, load_hifigan

    torch.manual_seed(0)
    small = HifiganConfig(resblock="1", upsample_rates=[4, 2, 2], upsample_kernel_sizes=[8, 4, 4],
                          upsample_initial_channel=16, resblock_kernel_sizes=[3, 7],
                          resblock_dilation_sizes=[[1, 3], [1, 3]], sampling_rate=16000, num_mels=8, n_fft=64,
                          hop_size=16, win_size=64, fmin=0, fmax=8000)
    for h in (small, dataclasses.replace(small, resblock="2")):
        yield Generator(h).eval(), h
    yield load_hifigan("hifigan-universal")


def test_vocoder_context_frames_bound_hifigan_receptive_field():
    from melle.vocoder import context_frames
    from melle_export.graphs import Vocoder

    for generator, h in hifigan_generators():
        before, after = reach(Vocoder(generator), 60, h.num_mels, hop=h.hop_size)
        bound = context_frames(h)
        assert max(before, after) <= bound  # enough context: streamed chunks are exact
        assert bound - max(before, after) <= 1  # and hardly more than needed


def test_postnet_context_is_the_postnet_receptive_field():
    from melle.init import random_model

    model = random_model("tiny", 0, r=1).eval()
    before, after = reach(model.postnet, 40, model.cfg.n_mels, hop=1)
    assert before == after == model.cfg.postnet_context


# --- Synthesizer.stream on a real engine -----------------------------------------------------------

@pytest.fixture(scope="module")
def synthesizer(voiced_engine):
    with Synthesizer(voiced_engine) as synth:
        yield synth


def stream_and_whole(synth: Synthesizer, text: str, plan: ChunkPlan = ChunkPlan(), options=SHORT, seed: int = 3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pieces cut at max_seconds say so
        chunks = list(synth.stream(text, seed=seed, options=options, chunks=plan))
        whole = synth.speak(text, seed=seed, options=options)
    return chunks, whole


@pytest.mark.parametrize("plan", PLANS)
def test_stream_equals_whole_synthesis(synthesizer, plan):
    chunks, whole = stream_and_whole(synthesizer, "Hello there. How are you today?", plan)
    joined = np.concatenate([c.wav for c in chunks])
    assert joined.shape == whole.wav.shape
    assert np.abs(joined - whole.wav).max() < STREAM_TOLERANCE
    assert all(len(c.wav) and c.sample_rate == synthesizer.sample_rate for c in chunks)
    assert [c.piece for c in chunks] == sorted(c.piece for c in chunks) and chunks[-1].piece == 1
    if plan.max_frames == 1:  # one frame per chunk: the first chunk is one hop of audio
        assert len(chunks[0].wav) == synthesizer.preset.hop_length


def test_a_guided_stream_equals_the_guided_whole(synthesizer):
    guided = SynthesisOptions(max_seconds=0.6, align_guide="on")
    chunks, whole = stream_and_whole(synthesizer, "Hello there. How are you today?", ChunkPlan(3, 7), guided)
    assert np.abs(np.concatenate([c.wav for c in chunks]) - whole.wav).max() < STREAM_TOLERANCE


@pytest.mark.parametrize("options", [SHORT, SynthesisOptions()], ids=["capped", "stop-head"])
def test_one_word_streams(synthesizer, options):
    chunks, whole = stream_and_whole(synthesizer, "Hello", options=options)
    assert np.abs(np.concatenate([c.wav for c in chunks]) - whole.wav).max() < STREAM_TOLERANCE


def test_very_long_text_streams_piece_by_piece(synthesizer):
    text = " ".join(f"Sentence number {n} is here." for n in range(1, 41))
    chunks, whole = stream_and_whole(synthesizer, text, ChunkPlan(first_frames=2, max_frames=4),
                                     SynthesisOptions(max_seconds=0.3))  # the stop head ends most pieces
    assert sorted({c.piece for c in chunks}) == list(range(len(whole.pieces))) and len(whole.pieces) >= 40
    assert np.abs(np.concatenate([c.wav for c in chunks]) - whole.wav).max() < STREAM_TOLERANCE


def test_rolling_prompt_streams_like_the_whole_and_prompts_with_the_previous_piece(synthesizer, monkeypatch):
    rolling = SynthesisOptions(max_seconds=0.3, stop_threshold=NO_STOP, rolling_prompt=True, align_guide="off")
    text = "First sentence here. Second one. Third."
    prompts = []
    decoding = synthesizer.decoding
    monkeypatch.setattr(synthesizer, "decoding", lambda text, mel, prompt_text, *rest: prompts.append(
        (None if mel is None else len(mel), prompt_text)) or decoding(text, mel, prompt_text, *rest))
    chunks, whole = stream_and_whole(synthesizer, text, ChunkPlan(first_frames=3, max_frames=7), options=rolling)
    assert np.abs(np.concatenate([c.wav for c in chunks]) - whole.wav).max() < STREAM_TOLERANCE
    frames = 26  # max_seconds 0.3 at r = 1
    assert len(whole.pieces) >= 3
    assert prompts == [(None, None)] + [(frames, piece.text) for piece in whole.pieces[:-1]]
    _, fixed = stream_and_whole(synthesizer, text, options=dataclasses.replace(rolling, rolling_prompt=False))
    assert fixed.wav.shape != whole.wav.shape or np.abs(fixed.wav - whole.wav).max() > 1e-2  # prompts mattered


def test_rolling_prompt_falls_back_when_the_previous_piece_leaves_no_room(synthesizer):
    rolling = SynthesisOptions(rolling_prompt=True)
    piece = synthesizer.pieces("Hello there.", rolling=True)[0]
    user = (np.zeros((8, 80), np.float32), "a user prompt")
    small = (np.zeros((40, 80), np.float32), "before")
    huge = (np.zeros((synthesizer.backend.capacity, 80), np.float32), "before")
    assert synthesizer.piece_prompt(piece, user, small, rolling) is small
    assert synthesizer.piece_prompt(piece, user, huge, rolling) is user
    assert synthesizer.piece_prompt(piece, user, small, SynthesisOptions()) is user
    assert synthesizer.piece_budget(rolling=True) < synthesizer.piece_budget()


def test_nothing_to_say_fails_before_the_first_chunk(synthesizer):
    with pytest.raises(EmptyTextError):
        synthesizer.stream("  ... !! ")
    with pytest.warns(UserWarning, match="cannot speak"), pytest.raises(EmptyTextError):
        synthesizer.stream("\u4e16\u754c")  # only characters the voice cannot speak: not a mid-stream failure
    with pytest.raises(ValueError, match="one candidate"):
        synthesizer.stream("Hello.", options=SynthesisOptions(candidates=2))


def test_stopping_the_iteration_stops_the_decoding(synthesizer, monkeypatch):
    steps = []
    step = synthesizer.backend.step
    monkeypatch.setattr(synthesizer.backend, "step", lambda *a: steps.append(1) or step(*a))
    chunks = synthesizer.stream("One sentence. " * 20, seed=0,
                                options=SynthesisOptions(max_seconds=2, stop_threshold=NO_STOP),
                                chunks=ChunkPlan(first_frames=2, max_frames=4))
    next(chunks)
    made = len(steps)
    chunks.close()
    assert made < 500  # the first chunk came long before the whole text (20 pieces of 172 steps)
    assert not [t for t in threading.enumerate() if t.name.startswith("vocoder")]  # the worker is gone
    with pytest.raises(StopIteration):
        next(chunks)
    assert len(steps) == made


def test_engine_without_receptive_fields_cannot_stream(voiced_engine, tmp_path):
    import shutil

    engine = tmp_path / "old"
    shutil.copytree(voiced_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        graph.pop("context_frames", None)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    with Synthesizer(engine) as synth:
        with pytest.raises(EngineError, match="re-export"):
            synth.stream("Hello.")
        assert len(synth.synthesize("Hello.", seed=0)[0])  # whole synthesis still works


def test_manifest_records_the_receptive_fields(voiced_engine):
    from melle.core.manifest import read_manifest
    from melle.vocoder import context_frames, load_hifigan

    manifest = read_manifest(voiced_engine)
    assert manifest.graphs["postnet"].context_frames == manifest.config.postnet_context
    vocoder_context = context_frames(load_hifigan("hifigan-universal")[1])
    assert manifest.graphs["vocoder"].context_frames == vocoder_context
    assert manifest.to_dict()["graphs"]["vocoder"]["context_frames"] == vocoder_context


# --- synth.py --stream, run as a user runs it --------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def synth(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "runtime/synth.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          timeout=600, **kwargs)


def test_cli_stream_writes_the_same_audio_as_whole_synthesis(voiced_engine, tmp_path):
    text = "Hello there. How are you today?"
    whole = synth("--engine", voiced_engine, "--text", text, "--out", tmp_path / "whole.wav", "--seed", 4)
    streamed = synth("--engine", voiced_engine, "--text", text, "--out", tmp_path / "stream.wav", "--seed", 4,
                     "--stream")
    assert whole.returncode == 0 and streamed.returncode == 0, streamed.stderr.decode()
    assert b"first audio after" in streamed.stderr
    a, rate_a = sf.read(tmp_path / "whole.wav", dtype="int16")
    b, rate_b = sf.read(tmp_path / "stream.wav", dtype="int16")
    assert rate_a == rate_b == 22050 and a.shape == b.shape
    assert np.abs(a.astype(int) - b).max() <= 1  # 16-bit rounding of a < 1e-4 difference

    raw = synth("--engine", voiced_engine, "--text", text, "--out", "-", "--seed", 4, "--stream")
    assert raw.returncode == 0, raw.stderr.decode()
    pcm = np.frombuffer(raw.stdout, dtype="<f4")  # stdout holds audio only; messages go to stderr
    assert pcm.shape == a.shape and np.abs(pcm - a / 32768).max() < 1e-3


def test_cli_stream_reads_a_whole_text_file_as_one_text(voiced_engine, tmp_path):
    story = "First line.\n\nSecond line.\n"  # two paragraphs: the longer pause between them
    (tmp_path / "story.txt").write_text(story)
    done = synth("--engine", voiced_engine, "--text-file", tmp_path / "story.txt", "--out", tmp_path / "s.wav",
                 "--stream")
    assert done.returncode == 0, done.stderr.decode()
    assert not (ROOT / "synth_out").exists()
    streamed, _ = sf.read(tmp_path / "s.wav", dtype="int16")
    with Synthesizer(voiced_engine) as whole:
        expected = whole.synthesize(story, seed=0)[0]
    assert streamed.shape == expected.shape and np.abs(streamed / 32768 - expected).max() < 2 / 32768


@pytest.mark.parametrize("args, message", [
    (["--text", "Hi.", "--out", "-"], "--out - (raw PCM on stdout) needs --stream"),
    (["--text", "Hi.", "--out", "x.mp3", "--stream"], "--stream writes .wav files or raw PCM"),
    (["--text", "Hi.", "--out", "x.wav", "--stream", "--candidates", "2"], "drop --candidates 2"),
    (["--text", "Hi.", "--out", "x.wav", "--stream", "--mel-png", "x.png"], "drop --mel-png"),
])
def test_cli_stream_refuses_what_it_cannot_do(voiced_engine, tmp_path, args, message):
    done = subprocess.run([sys.executable, str(ROOT / "runtime/synth.py"), "--engine", str(voiced_engine), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # relative outputs land here
    assert done.returncode == 2 and message in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_stream_keeps_an_existing_file(voiced_engine, tmp_path):
    (tmp_path / "keep.wav").write_bytes(b"mine")
    done = synth("--engine", voiced_engine, "--text", "Hi.", "--out", tmp_path / "keep.wav", "--stream")
    assert done.returncode == 5 and b"--overwrite" in done.stderr
    assert (tmp_path / "keep.wav").read_bytes() == b"mine"


def test_cli_stream_stops_when_the_player_goes_away(voiced_engine):
    text = "One sentence after another. " * 30
    player = subprocess.Popen([sys.executable, "runtime/synth.py", "--engine", str(voiced_engine), "--text", text,
                               "--out", "-", "--stream"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    player.stdout.read(4096)  # the player heard a little, then quit
    player.stdout.close()
    _, err = player.communicate(timeout=600)
    assert player.returncode == 0 and b"stdout was closed by its reader" in err and b"Traceback" not in err


def test_cli_stream_interrupted_keeps_a_valid_wav_of_what_was_made(voiced_engine, tmp_path):
    out = tmp_path / "long.wav"
    run = subprocess.Popen([sys.executable, "runtime/synth.py", "--engine", str(voiced_engine), "--text",
                            "One more sentence. " * 300, "--out", str(out), "--stream"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(1200):
        if out.exists() and sf.info(out).frames > 0:
            break
        time.sleep(0.05)
    assert run.poll() is None, "the stream ended before it could be interrupted"
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and b"interrupted; " in err and b"Traceback" not in err
    audio, rate = sf.read(out)
    assert rate == 22050 and len(audio) > 0


def test_wav_stream_is_a_complete_file_after_every_chunk(tmp_path):
    from melle_runtime.stream_output import WavStream

    sink = WavStream(tmp_path / "grow.wav", 22050)
    for n in (1, 3):
        sink.write(np.full(100 * n, 0.5, np.float32))
        audio, rate = sf.read(tmp_path / "grow.wav")  # read while the writer still holds it open
        assert rate == 22050 and len(audio) == 100 * (1 if n == 1 else 4)
    sink.close()
