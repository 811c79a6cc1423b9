"""Engines on ONNX Runtime's GroupQueryAttention (``--attention gqa``): equal to the reference, cache in place."""

import numpy as np
import pytest

from melle.checkpoint import load_checkpoint
from melle.core.decoding import DecodeOptions, decode
from melle.core.manifest import EngineError, read_manifest
from melle.generate import generate
from melle_export.fp16_check import relative_error
from melle_export.gqa_graphs import scales_of_graph
from melle_export.kv_calibration import DEFAULT_SENTENCES, calibrate_kv, read_sentences
from melle_export.to_onnx import GRAPH_TOLERANCE, ExportError, export
from melle_export.to_trt import require_standard_attention
from melle_runtime.ort_gqa_backend import OrtGqaBackend
from melle_runtime.synthesizer import make_backend

SAMPLE_IDS = [2 + (7 * i) % 20 for i in range(20)]
MEL_TOLERANCE = 1e-3  # runtime vs reference, free-running (DESIGN.md)
INT8_MEL_RELATIVE = 0.02  # as the standard INT8 step (tests/test_export.py)


@pytest.fixture(scope="module")
def gqa_engine(tiny_checkpoint, tmp_path_factory):
    """GroupQueryAttention engines (no vocoder, with INT8 step) per reduction factor and cache type."""
    made = {}

    def make(r: int, kv_cache: str = "fp32"):
        if (r, kv_cache) not in made:
            made[r, kv_cache] = export(tiny_checkpoint(r), tmp_path_factory.mktemp(f"gqa_r{r}_{kv_cache}") / "engine",
                                       vocoder="none", int8=True, attention="gqa", kv_cache=kv_cache)
        return made[r, kv_cache]

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


@pytest.mark.parametrize("kv_cache", ["fp32", "int8"])
def test_each_step_writes_its_kv_into_the_shared_buffer_in_place(gqa_engine, kv_cache):
    manifest = read_manifest(gqa_engine(1, kv_cache))
    backend = OrtGqaBackend(manifest)
    cfg = manifest.config
    rng = np.random.default_rng(0)
    backend.start(1, 32)
    buffers = list(backend.buffers)
    assert all(b.dtype == np.dtype(kv_cache.replace("fp", "float")) for b in buffers)
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


# INT8 cache (--kv-cache int8). Measured on the tiny r=1 model: a 60-step decode is 0.05% (relative)
# from the FP32 reference's mel, the graphs match their PyTorch twins (which quantise the same way)
# within 1e-6. The bound leaves 10x margin; the floor proves the cache was quantised at all.
KV8_MEL_RELATIVE, QUANTISED = 0.005, 1e-5


def test_int8_cache_manifest_records_its_calibration(gqa_engine):
    manifest = read_manifest(gqa_engine(1, "int8"))
    assert manifest.kv_cache["dtype"] == "int8" and manifest.kv_cache["frames"] > 0
    assert manifest.kv_cache["sentences"] == len(read_sentences(DEFAULT_SENTENCES))
    assert all(manifest.parity[name] < GRAPH_TOLERANCE for name in ("prefill", "decoder_step"))
    assert all(manifest.graphs[name].cache_max_step_diff <= 1 for name in ("prefill", "decoder_step"))
    for graph in ("prefill", "decoder_step", "decoder_step_int8"):
        caches = [t for t in manifest.graphs[graph].inputs + manifest.graphs[graph].outputs if "key" in t.name]
        assert caches and all(t.dtype == "int8" for t in caches)
    assert read_manifest(gqa_engine(1)).kv_cache is None


def test_calibration_is_deterministic(tiny_checkpoint):
    sentences = read_sentences(DEFAULT_SENTENCES)[:3]
    first, second = (calibrate_kv(load_checkpoint(tiny_checkpoint(1)), sentences) for _ in range(2))
    np.testing.assert_array_equal(first.key, second.key)
    np.testing.assert_array_equal(first.value, second.value)
    assert first.record == second.record
    other = calibrate_kv(load_checkpoint(tiny_checkpoint(1)), sentences, seed=5)
    assert not np.array_equal(first.key, other.key)  # the scales do come from the decodes


@pytest.mark.parametrize("r", [1, 2])
def test_int8_cache_decode_tracks_the_fp32_reference(tiny_checkpoint, gqa_engine, r):
    manifest = read_manifest(gqa_engine(r, "int8"))
    reference = generate(load_checkpoint(tiny_checkpoint(r)), SAMPLE_IDS, seed=3)
    ours = decode(make_backend(manifest, "ort-cpu"), manifest.config, SAMPLE_IDS, None, DecodeOptions(), seed=3)
    assert ours.n_groups == reference.n_groups  # the same stop step
    options = DecodeOptions(max_steps=60, stop_enabled=False)
    reference = generate(load_checkpoint(tiny_checkpoint(r)), SAMPLE_IDS, options=options, seed=3)
    ours = decode(make_backend(manifest, "ort-cpu"), manifest.config, SAMPLE_IDS, None, options, seed=3)
    assert QUANTISED < relative_error(ours.mel, reference.mel) < KV8_MEL_RELATIVE


def test_int8_cache_with_a_prompt_and_candidates_tracks_the_reference(tiny_checkpoint, gqa_engine):
    manifest = read_manifest(gqa_engine(2, "int8"))
    prompt = np.random.default_rng(0).standard_normal((14, manifest.config.n_mels)).astype(np.float32) - 4
    options = DecodeOptions(candidates=3, max_steps=40, stop_enabled=False)
    reference = generate(load_checkpoint(tiny_checkpoint(2)), SAMPLE_IDS, prompt, options, seed=1)
    ours = decode(make_backend(manifest, "ort-cpu"), manifest.config, SAMPLE_IDS, prompt, options, seed=1)
    for mel, expected in zip(ours.mels, reference.mels):
        assert QUANTISED < relative_error(mel, expected) < KV8_MEL_RELATIVE


def test_int8_cache_needs_gqa_and_calibration_sentences(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--attention gqa"):
        export(tiny_checkpoint(1), tmp_path / "a", vocoder="none", kv_cache="int8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ExportError, match="no sentences"):
        export(tiny_checkpoint(1), tmp_path / "b", vocoder="none", attention="gqa", kv_cache="int8",
               kv_calibration=empty)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_missing_quantized_step_says_how_to_export_it(gqa_engine):
    with pytest.raises(EngineError, match="re-export with --nbits 4"):
        make_backend(read_manifest(gqa_engine(1)), "ort-cpu-nbits4")


@pytest.mark.parametrize("kv_cache", ["fp32", "int8"])
def test_verify_suite_passes_on_gqa_engines(tiny_checkpoint, gqa_engine, kv_cache, capsys):
    from melle_export.verify import main as verify

    assert verify([str(gqa_engine(2, kv_cache)), "--ckpt", str(tiny_checkpoint(2)), "--seeds", "0",
                   "--max-steps", "60"]) == 0
    if kv_cache == "int8":
        assert "INT8 cache: mel relative error" in capsys.readouterr().out


def test_scales_read_back_from_the_graph_are_the_calibrated_ones(tiny_checkpoint, gqa_engine):
    manifest = read_manifest(gqa_engine(1, "int8"))
    scales = scales_of_graph(manifest.graph_path("decoder_step"))
    calibration = calibrate_kv(load_checkpoint(tiny_checkpoint(1)), read_sentences(DEFAULT_SENTENCES))
    np.testing.assert_array_equal(scales.key.numpy(), calibration.key)
    np.testing.assert_array_equal(scales.value.numpy(), calibration.value)
    assert manifest.kv_cache == calibration.record
