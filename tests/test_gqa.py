"""Engines on ONNX Runtime's GroupQueryAttention (``--attention gqa``): equal to the reference, cache in place."""

import numpy as np
import pytest

from melle.checkpoint import load_checkpoint
from melle.core.decoding import DecodeOptions, decode
from melle.core.manifest import EngineError, read_manifest
from melle.generate import generate
from melle_export.fp16_check import relative_error
from melle_export.to_onnx import GRAPH_TOLERANCE, export
from melle_export.to_trt import require_standard_attention
from melle_runtime.ort_gqa_backend import OrtGqaBackend
from melle_runtime.synthesizer import make_backend

SAMPLE_IDS = [2 + (7 * i) % 20 for i in range(20)]
MEL_TOLERANCE = 1e-3  # runtime vs reference, free-running (DESIGN.md)
INT8_MEL_RELATIVE = 0.02  # as the standard INT8 step (tests/test_export.py)


@pytest.fixture(scope="module")
def gqa_engine(tiny_checkpoint, tmp_path_factory):
    """GroupQueryAttention engines (no vocoder, with INT8 step) per reduction factor."""
    made = {}

    def make(r: int):
        if r not in made:
            made[r] = export(tiny_checkpoint(r), tmp_path_factory.mktemp(f"gqa_r{r}") / "engine", vocoder="none",
                             int8=True, attention="gqa")
        return made[r]

    return make


def test_manifest_records_the_variant_and_graph_parity(gqa_engine):
    manifest = read_manifest(gqa_engine(1))
    assert manifest.attention == "gqa"
    assert manifest.kv_layout.startswith("[batch, n_head, max_len, head_dim]")
    assert all(manifest.parity[name] < GRAPH_TOLERANCE for name in ("prefill", "decoder_step"))
    step_inputs = [spec.name for spec in manifest.graphs["decoder_step"].inputs]
    assert step_inputs[:4] == ["frames", "prenet_masks", "seqlens_k", "total_length"]


@pytest.mark.parametrize("r", [1, 2])
def test_free_running_decode_equals_the_reference(tiny_checkpoint, gqa_engine, r):
    manifest = read_manifest(gqa_engine(r))
    reference = generate(load_checkpoint(tiny_checkpoint(r)), SAMPLE_IDS, seed=3)
    ours = decode(make_backend(manifest, "ort-cpu"), manifest.config, SAMPLE_IDS, None, DecodeOptions(), seed=3)
    assert reference.stopped == [True]
    assert ours.n_groups == reference.n_groups
    assert np.abs(ours.mel - reference.mel).max() < MEL_TOLERANCE


def test_candidates_and_a_prompt_equal_the_reference(tiny_checkpoint, gqa_engine):
    manifest = read_manifest(gqa_engine(2))
    prompt = np.random.default_rng(0).standard_normal((14, manifest.config.n_mels)).astype(np.float32) - 4
    options = DecodeOptions(candidates=3, max_steps=40, stop_enabled=False)
    reference = generate(load_checkpoint(tiny_checkpoint(2)), SAMPLE_IDS, prompt, options, seed=1)
    ours = decode(make_backend(manifest, "ort-cpu"), manifest.config, SAMPLE_IDS, prompt, options, seed=1)
    for mel, expected in zip(ours.mels, reference.mels):
        assert mel.shape == expected.shape
        assert np.abs(mel - expected).max() < MEL_TOLERANCE


def test_each_step_writes_its_kv_into_the_shared_buffer_in_place(gqa_engine):
    manifest = read_manifest(gqa_engine(1))
    backend = OrtGqaBackend(manifest)
    cfg = manifest.config
    rng = np.random.default_rng(0)
    backend.start(1, 32)
    buffers = list(backend.buffers)
    addresses = [b.ctypes.data for b in buffers]
    backend.prefill(np.array([SAMPLE_IDS[:9]]), np.zeros((1, 0, cfg.frame_dim), np.float32),
                    np.ones((1, 0, 2, cfg.prenet_dim), np.float32))
    before = [b.copy() for b in buffers]
    backend.step(rng.standard_normal((1, cfg.frame_dim)).astype(np.float32),
                 np.ones((1, 2, cfg.prenet_dim), np.float32), 9)
    assert [b.ctypes.data for b in backend.buffers] == addresses  # the same arrays, not replacements
    for old, new in zip(before, buffers):
        assert np.abs(old[:, :, 9]).max() == 0 and np.abs(new[:, :, 9]).max() > 0  # slot 9 written
        np.testing.assert_array_equal(new[:, :, :9], old[:, :, :9])  # the prefill's slots untouched
        np.testing.assert_array_equal(new[:, :, 10:], old[:, :, 10:])


def test_int8_step_tracks_fp32(gqa_engine):
    manifest = read_manifest(gqa_engine(1))
    options = DecodeOptions(max_steps=20, stop_enabled=False)
    int8 = decode(make_backend(manifest, "ort-cpu-int8"), manifest.config, [4, 5], None, options, seed=0)
    fp32 = decode(make_backend(manifest, "ort-cpu"), manifest.config, [4, 5], None, options, seed=0)
    assert int8.mel.shape == fp32.mel.shape
    assert 1e-4 < relative_error(int8.mel, fp32.mel) < INT8_MEL_RELATIVE


@pytest.mark.parametrize("backend", ["ort-cuda", "trt"])
def test_gpu_backends_refuse_a_gqa_engine_with_what_to_do(gqa_engine, backend):
    with pytest.raises(EngineError, match="--attention gqa"):
        make_backend(read_manifest(gqa_engine(1)), backend)


def test_tensorrt_build_refuses_a_gqa_engine(gqa_engine):
    with pytest.raises(EngineError, match="contrib ops"):
        require_standard_attention(read_manifest(gqa_engine(1)))


def test_standard_engines_stay_standard(tiny_engine):
    manifest = read_manifest(tiny_engine(1))
    assert manifest.attention == "standard"
    with pytest.raises(EngineError, match="not gqa"):
        OrtGqaBackend(manifest)
