"""Alignment-guided decoding: the guide's rule, the guided heads' bias and attention in the step, and
the same guided decode on PyTorch and ONNX Runtime."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from melle.checkpoint import load_checkpoint, save_checkpoint
from melle.core.alignment import FORCE_STOP, HOLD_STOP, AlignmentGuide, AlignOptions
from melle.core.decoding import DecodeOptions, Decoding, decode
from melle.core.manifest import EngineError, read_manifest
from melle.generate import TorchBackend
from melle_export.to_onnx import export
from melle_runtime.ort_backend import OrtBackend
from melle_runtime.synthesizer import SynthesisOptions, Synthesizer

from conftest import GUIDED_HEADS, ROOT, decisive_stop_model

TRAJECTORY_TOL = 1e-3
QUICK = AlignOptions(ahead=2, stall_steps=2, end_steps=3)  # a random model does not move on by itself


def attention_at(tokens: list[int], n_text: int) -> np.ndarray:
    """Attention ``[B, n_text]`` peaked on one token per row."""
    out = np.full((len(tokens), n_text), 0.01, np.float32)
    out[np.arange(len(tokens)), tokens] = 0.9
    return out


def test_the_bias_opens_a_window_around_each_rows_position():
    guide = AlignmentGuide(10, 2, options=AlignOptions(behind=1, ahead=2))
    guide.position[:] = [0, 5]
    bias = guide.bias()
    assert bias.shape == (2, 10) and bias.dtype == np.float32
    assert np.flatnonzero(bias[0] == 0).tolist() == [0, 1, 2]
    assert np.flatnonzero(bias[1] == 0).tolist() == [4, 5, 6, 7]
    assert set(bias[bias != 0].tolist()) == {AlignOptions().off_window}


def test_the_position_follows_the_attention_forward_within_the_window_only():
    guide = AlignmentGuide(10, 3, options=AlignOptions(behind=1, ahead=2))
    guide.position[:] = 4
    # Row 0 moves on to 6; row 1 looks back (ignored: no repeats); row 2 jumps to the end (outside the window).
    guide.observe(attention_at([6, 3, 9], 10))
    assert guide.position.tolist() == [6, 4, 4]
    assert guide.stalled.tolist() == [0, 1, 1]


def test_a_stalled_position_moves_on_one_token_and_never_past_the_end():
    guide = AlignmentGuide(4, 1, options=AlignOptions(stall_steps=3))
    for step in range(1, 12):
        guide.observe(attention_at([0], 4))  # the heads stay on the first token
        assert guide.position[0] == min(step // 3, 3)


def test_the_stop_is_held_before_the_end_of_the_text_and_forced_after_it():
    guide = AlignmentGuide(10, 2, options=AlignOptions(end_tokens=3, end_steps=2))
    stop = np.array([5.0, -5.0], np.float32)  # the stop head wants row 0 to stop, row 1 to go on
    assert guide.gate_stop(stop).tolist() == [HOLD_STOP, HOLD_STOP]
    guide.position[:] = 7  # among the last 3 tokens: the stop head decides
    guide.observe(attention_at([7, 7], 10))
    assert guide.gate_stop(stop).tolist() == [5.0, -5.0]
    guide.observe(attention_at([7, 7], 10))  # 2 steps at the end: stop now
    assert guide.gate_stop(stop).tolist() == [FORCE_STOP, FORCE_STOP]


def test_the_guide_starts_after_a_prompts_transcript():
    guide = AlignmentGuide(12, 1, start=5)
    assert guide.position.tolist() == [5]
    with pytest.raises(ValueError, match="starts at token 12 of 12"):
        AlignmentGuide(12, 1, start=12)


@pytest.mark.parametrize("field, value", [("ahead", 0), ("stall_steps", 0), ("end_steps", 0), ("behind", -1),
                                          ("off_window", 0.0)])
def test_bad_align_options_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        AlignOptions(**{field: value})


def peaked_guided_model():
    """The tiny test model with sharpened guided heads: their attention has a clear peak, so the
    guide's argmax is decided by a margin, not by rounding (as a trained model's would be)."""
    model = decisive_stop_model(1, seed=3)
    d, head_dim = model.cfg.d_model, model.cfg.head_dim
    with torch.no_grad():
        for layer, head in model.cfg.guided_heads:
            rows = model.blocks[layer].attn.qkv.weight
            for offset in (0, d):  # the head's query and key rows
                rows[offset + head * head_dim: offset + (head + 1) * head_dim] *= 3.0
    return model


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """(model, engine manifest) of the peaked model, exported with standard attention."""
    model = peaked_guided_model()
    ckpt = tmp_path_factory.mktemp("aligned_ckpt")
    save_checkpoint(ckpt, model)
    engine = export(ckpt, tmp_path_factory.mktemp("aligned") / "engine", vocoder="none")
    return load_checkpoint(ckpt), read_manifest(engine)


def prefilled(model, ids, steps):
    """A TorchBackend with ``ids`` prefilled and ``steps`` random frame groups stepped."""
    rng = np.random.default_rng(0)
    backend = TorchBackend(model)
    backend.start(1, 64)
    backend.prefill(np.array([ids], np.int64), np.zeros((1, 0, model.cfg.frame_dim), np.float32),
                    np.ones((1, 0, 2, model.cfg.prenet_dim), np.float32))
    frames = [rng.standard_normal((1, model.cfg.frame_dim)).astype(np.float32) for _ in range(steps)]
    masks = np.ones((1, 2, model.cfg.prenet_dim), np.float32)
    return backend, frames, masks


def test_a_zero_bias_step_is_the_plain_step_and_returns_the_guided_heads_attention(aligned):
    model, _ = aligned
    ids = [3, 4, 5, 6, 7, 8]
    plain, frames, masks = prefilled(model, ids, 3)
    guided, _, _ = prefilled(model, ids, 3)
    for i, group in enumerate(frames):
        position = len(ids) + i
        e = plain.step(group, masks, position)
        e_guided, attention = guided.step_aligned(group, masks, position, np.zeros((1, len(ids)), np.float32))
        np.testing.assert_allclose(e_guided, e, atol=1e-5, rtol=0)
        for layer in range(model.cfg.n_layer):
            np.testing.assert_allclose(guided.cache.k[layer][position], plain.cache.k[layer][position], atol=1e-5)
        assert attention.shape == (1, len(ids)) and (attention >= 0).all() and attention.sum() <= 1 + 1e-5


def test_the_bias_keeps_the_guided_heads_inside_the_window(aligned):
    model, _ = aligned
    ids = list(range(3, 15))
    guide = AlignmentGuide(len(ids), 1, options=AlignOptions(behind=0, ahead=1))
    guide.position[:] = 5
    attention = {}
    for name, bias in (("free", np.zeros((1, len(ids)), np.float32)), ("guided", guide.bias())):
        backend, frames, masks = prefilled(model, ids, 1)
        attention[name] = backend.step_aligned(frames[0], masks, len(ids), bias)[1][0]
    outside = {name: np.delete(a, [5, 6]).sum() for name, a in attention.items()}
    assert outside["free"] > 0.1  # without the bias the heads look elsewhere too
    assert outside["guided"] < 1e-3 * outside["free"]  # exp(-12) per head, here with both heads
    assert attention["guided"][5:7].sum() > attention["free"][5:7].sum()


def test_a_guided_decode_is_the_same_on_onnx_runtime_as_on_pytorch(aligned):
    model, manifest = aligned
    ids = [5, 9, 3, 12, 7, 4, 8, 10]
    guided = DecodeOptions(max_steps=120, align=QUICK)
    reference = decode(TorchBackend(model), model.cfg, ids, None, guided, seed=2)
    free = decode(TorchBackend(model), model.cfg, ids, None, DecodeOptions(max_steps=120), seed=2)
    assert reference.n_groups != free.n_groups or not np.allclose(reference.mel, free.mel[: len(reference.mel)])
    # The stop came from the guide's rule: held while the text was being read, then forced or taken.
    assert reference.stopped == [True] and reference.n_groups[0] > len(ids) // 2
    for kv_mode in ("prefix", "full"):
        ours = decode(OrtBackend(manifest, kv_mode=kv_mode), manifest.config, ids, None, guided, seed=2)
        assert ours.n_groups == reference.n_groups and ours.stopped == reference.stopped
        np.testing.assert_allclose(ours.stop_logits, reference.stop_logits, atol=TRAJECTORY_TOL, rtol=0)
        np.testing.assert_allclose(ours.mel, reference.mel, atol=TRAJECTORY_TOL, rtol=0)


def test_guided_positions_advance_through_the_text_on_both_backends(aligned):
    model, manifest = aligned
    ids = [5, 9, 3, 12, 7, 4, 8, 10]
    tracks = []
    for backend in (TorchBackend(model), OrtBackend(manifest)):
        run = Decoding(backend, model.cfg, ids, None, DecodeOptions(max_steps=120, align=QUICK), seed=2)
        positions = [run.guide.position[0] for _ in run]
        tracks.append(positions)
    assert tracks[0] == tracks[1]
    assert np.all(np.diff(tracks[0]) >= 0) and tracks[0][-1] >= len(ids) + 1 - QUICK.end_tokens


def test_a_model_without_guided_heads_cannot_be_guided():
    model = decisive_stop_model(1)
    model.cfg.guided_heads = []
    with pytest.raises(ValueError, match="guided heads"):
        Decoding(TorchBackend(model), model.cfg, [4, 5], None, DecodeOptions(align=AlignOptions()))


def test_the_cli_guides_by_alignment(voiced_engine, tmp_path):
    assert read_manifest(voiced_engine).config.guided_heads == GUIDED_HEADS
    out = tmp_path / "guided.wav"
    done = subprocess.run([sys.executable, "runtime/synth.py", "--engine", str(voiced_engine), "--text", "hello there.",
                           "--out", str(out), "--max-seconds", "2", "--align-guide", "on"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wav, rate = sf.read(out)
    assert rate == 22050 and np.abs(wav).max() > 0


def test_a_gqa_engine_refuses_required_guidance_and_auto_decodes_unguided(voiced_gqa_engine):
    with Synthesizer(voiced_gqa_engine) as synth:
        with pytest.raises(EngineError, match="--align-guide"):
            synth.speak("hello there.", options=SynthesisOptions(align_guide="on", max_seconds=1))
        auto, off = (synth.speak("hello there.", seed=0, options=SynthesisOptions(align_guide=mode, max_seconds=1))
                     for mode in ("auto", "off"))
    np.testing.assert_array_equal(auto.wav, off.wav)


def test_auto_guides_where_the_engine_can(voiced_engine):
    with Synthesizer(voiced_engine) as synth:
        decoding = {mode: synth.decoding("hello there.", None, None, 0, SynthesisOptions(align_guide=mode))
                    for mode in ("auto", "on", "off")}
    assert decoding["auto"].guide is not None and decoding["on"].guide is not None and decoding["off"].guide is None
    with pytest.raises(ValueError, match="align_guide"):
        SynthesisOptions(align_guide="yes")
