"""ONNX export: per-graph parity, both KV modes, and free-running ORT == PyTorch with one seed."""

import json
import shutil

import numpy as np
import onnx
import pytest

from melle.core.audio import get_preset
from melle.checkpoint import load_checkpoint
from melle.core.decoding import DecodeOptions, decode
from melle.generate import generate
from melle_export.fp16_check import relative_error
from melle_export.graphs import model_graphs, run_torch
from melle_export.to_onnx import ExportError, export, ort_run
from melle.core.manifest import EngineError, engine_entries, read_manifest
from melle_runtime.ort_backend import OrtBackend

GRAPH_TOL, TRAJECTORY_TOL = 1e-4, 1e-3


@pytest.mark.parametrize("r", [1, 4])
def test_each_graph_matches_pytorch(r, tiny_checkpoint, tiny_engine):
    engine = tiny_engine(r)
    manifest = read_manifest(engine)
    specs = {s.name: s for s in model_graphs(load_checkpoint(tiny_checkpoint(r)))}
    rng = np.random.default_rng(123)  # inputs the exporter did not see
    for name, spec in specs.items():
        assert manifest.parity[name] < GRAPH_TOL
        inputs = spec.example(rng)
        ours = ort_run(manifest.graph_path(name), spec.inputs, inputs)
        for a, b in zip(ours, run_torch(spec, inputs)):
            np.testing.assert_allclose(a, b, atol=GRAPH_TOL, rtol=0, err_msg=name)
        onnx.checker.check_model(str(manifest.graph_path(name)), full_check=True)


def test_prefill_without_prompt_and_symbolic_axes(tiny_checkpoint, tiny_engine):
    manifest = read_manifest(tiny_engine(1))
    spec = model_graphs(load_checkpoint(tiny_checkpoint(1)))[0]
    text, frames, masks = spec.example(np.random.default_rng(0))
    inputs = [text[:1, :4], frames[:1, :0], masks[:1, :0]]  # batch 1, 4 tokens, no prompt
    for a, b in zip(ort_run(manifest.graph_path("prefill"), spec.inputs, inputs), run_torch(spec, inputs)):
        np.testing.assert_allclose(a, b, atol=GRAPH_TOL, rtol=0)
    shapes = {io.name: io.shape for io in manifest.graphs["decoder_step"].inputs}
    assert shapes["past_key_0"][:2] == ["past_len", "batch"]
    assert shapes["frames"] == ["batch", manifest.config.frame_dim]


def decisive_reference(model, ids, prompt, options):
    """The first seed whose reference decode stops after a few steps, never near the threshold.

    The parity test is about the loop, not a coin flip: with a random model some seeds
    stop at once or hover at the threshold; those are skipped, deterministically.
    """
    for seed in range(50):
        result = generate(model, ids, prompt, options, seed=seed)
        considered = result.stop_logits[:, options.min_steps - 1:]  # the rule ignores earlier steps
        if result.stopped == [True] and result.n_groups[0] >= 5 and np.abs(considered).min() > 0.05:
            return seed, result
    raise AssertionError("no decisive seed: the stop head of the test model is miscalibrated")


@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_free_running_ort_equals_reference(r, with_prompt, tiny_checkpoint, tiny_engine):
    model = load_checkpoint(tiny_checkpoint(r))
    manifest = read_manifest(tiny_engine(r))
    prompt = np.random.default_rng(5).standard_normal((11, model.cfg.n_mels)).astype(np.float32) if with_prompt else None
    options = DecodeOptions(max_steps=200, min_steps=3)
    ids = [5, 9, 3, 12, 7]
    seed, reference = decisive_reference(model, ids, prompt, options)
    ours = decode(OrtBackend(manifest), manifest.config, ids, prompt, options, seed=seed)
    assert ours.n_groups == reference.n_groups and ours.stopped == reference.stopped
    np.testing.assert_allclose(ours.mel, reference.mel, atol=TRAJECTORY_TOL, rtol=0)


def test_prefix_and_full_buffer_kv_modes_agree(tiny_engine):
    manifest = read_manifest(tiny_engine(4))
    options = DecodeOptions(max_steps=40, stop_enabled=False, candidates=2)
    prefix = decode(OrtBackend(manifest, kv_mode="prefix"), manifest.config, [4, 5, 6], None, options, seed=1)
    full = decode(OrtBackend(manifest, kv_mode="full"), manifest.config, [4, 5, 6], None, options, seed=1)
    for a, b in zip(prefix.mels, full.mels):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


# Measured on the tiny r=1 test model and three other random tiny models (noise seeds 0-2): the INT8
# step's e is 0.013-0.016 (max abs) from the FP32 step's (0.012 on an AVX2-only AMD EPYC, where the
# signed weights used before gave 0.21: U8S8 saturation without VNNI), and a 20-step free-running INT8 decode's mel
# 0.24-0.41% (relative_error) from the FP32 decode's. MatMulNBits on tiny r=1 and r=2 models, noise seeds
# 0-2 (AMD EPYC): 8-bit e 0.011-0.020, mel 0.28-0.43%; 4-bit (block 32) e 0.14-0.18, mel 3.1-4.5% (random
# Gaussian weights are 4-bit's worst case). The bounds leave 2.5-5x margin; the floor proves the step was
# quantised at all.
QUANTISED = 1e-4
WEIGHT_BOUNDS = {"int8": (0.05, 0.02), "nbits8": (0.05, 0.02), "nbits4": (0.5, 0.15)}  # e max abs, mel relative


@pytest.mark.parametrize("weights", sorted(WEIGHT_BOUNDS))
def test_quantized_steps_track_fp32(tiny_engine, weights):
    e_bound, mel_bound = WEIGHT_BOUNDS[weights]
    manifest = read_manifest(tiny_engine(1))
    assert QUANTISED < manifest.parity[f"decoder_step_{weights}"] < e_bound
    options = DecodeOptions(max_steps=20, stop_enabled=False)
    quantized = decode(OrtBackend(manifest, weights=weights), manifest.config, [4, 5], None, options, seed=0)
    fp32 = decode(OrtBackend(manifest), manifest.config, [4, 5], None, options, seed=0)
    assert quantized.mel.shape == fp32.mel.shape
    assert QUANTISED < relative_error(quantized.mel, fp32.mel) < mel_bound


def test_nbits_steps_hold_matmulnbits_of_their_width(tiny_engine):
    manifest = read_manifest(tiny_engine(1))
    for bits in (4, 8):
        graph = onnx.load(str(manifest.graph_path(f"decoder_step_nbits{bits}")))
        quantized = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
        assert quantized and all(onnx.helper.get_attribute_value(a) == bits
                                 for n in quantized for a in n.attribute if a.name == "bits")
        assert not [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in
                    {i.name for i in graph.graph.initializer}]  # every weight MatMul quantized


def test_vocoder_graph_matches_pytorch_hifigan(voiced_engine):
    import torch

    from melle.vocoder import load_hifigan

    manifest = read_manifest(voiced_engine)
    assert manifest.parity["vocoder"] < 1e-3
    mel = (np.random.default_rng(9).standard_normal((1, 40, 80)) - 5).astype(np.float32)
    generator, _ = load_hifigan("hifigan-universal")
    with torch.no_grad():
        expected = generator(torch.from_numpy(mel).transpose(1, 2))[:, 0].numpy()
    ours = ort_run(manifest.graph_path("vocoder"), ["mel"], [mel])[0]
    assert ours.shape == (1, 40 * 256)
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


def test_vocoder_of_another_preset_is_refused(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(1), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["mel_preset"] = "paper-16k"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="mel preset"):
        export(ckpt, tmp_path / "engine", vocoder="hifigan-universal")
    assert not (tmp_path / "engine").exists(), "a failed export must leave nothing behind"


def test_manifest_round_trips_and_lists_its_files(tiny_engine):
    engine = tiny_engine(1)
    written = json.loads((engine / "manifest.json").read_text())
    manifest = read_manifest(engine)
    assert manifest.to_dict() == written  # format 1 as the exporter writes it, key for key
    assert manifest.mel_preset == get_preset(manifest.config.mel_preset)
    assert {"manifest.json", "prefill.onnx", "decoder_step_int8.onnx"} <= engine_entries(engine)


def test_tampered_or_missing_engine_is_a_clear_error(tiny_engine, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine(1), engine)
    with open(engine / "postnet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match="sha256"):
        read_manifest(engine)
    with pytest.raises(EngineError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    (engine / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_manifest(engine)


def test_verify_command_passes_on_a_fresh_export_and_refuses_a_foreign_checkpoint(tiny_checkpoint, tiny_engine):
    from melle_export.verify import main as verify

    assert verify([str(tiny_engine(4)), "--ckpt", str(tiny_checkpoint(4)), "--seeds", "0", "--max-steps", "60"]) == 0
    assert verify([str(tiny_engine(4)), "--ckpt", str(tiny_checkpoint(1)), "--seeds", "0"]) == 2
