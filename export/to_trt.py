"""Build TensorRT engines from an engine directory's ONNX graphs.

    python export/to_trt.py ENGINE_DIR [--fp16/--no-fp16] [--batch-max B] [--max-len N]
                            [--max-prompt-seconds S] [--timing-cache PATH] [--workspace-gb G] [--check]

NOT VALIDATED ON A GPU: written against the documented TensorRT 10 Python API on a
machine without TensorRT or a GPU; ``--check`` (the static compatibility check of
trt_support.py) and the error paths are what ran there.

One engine per graph (prefill, decoder_step, latent_head, postnet, vocoder if exported),
written beside its ONNX file as ``NAME.plan``; ``manifest.json`` gains a ``trt`` entry:
GPU name, compute capability, TensorRT version, build flags, profiles, and per engine
its file, sha256 and the sha256 of the ONNX it came from (the runtime refuses a mismatch).

Precision. ``--fp16`` (default) builds FP16 kernels with FP32 islands pinned per layer
(``layer.precision`` / ``set_output_type`` = FP32, honoured because of
OBEY_PRECISION_CONSTRAINTS; ``INormalizationLayer.compute_precision`` = FP32 as well):

- LayerNormalization: the mean/variance reductions over d_model overflow or lose the
  small terms in FP16; TensorRT itself warns that layernorm after self-attention in FP16
  may overflow and recommends FP32 for these layers;
- Softmax: its exp-sum over up to max_len scores;
- exp(0.5 * logvar) in the latent head (Exp, the Mul feeding it, the Mul applying it to
  eps): exp overflows FP16 for logvar above ~22;
- the stop head (the Gemm/MatMul and the ops between it and ``stop_logit``): a logit near
  the threshold must not flip with FP16 rounding, or candidates stop at another step.

Layers are matched to ONNX nodes by the parser's layer metadata ("[ONNX Layer: NAME]"),
the layer name (the node name, made unique) or an output tensor name; the islands come
from ``trt_support.fp32_islands``, the same ones fp16_check.py measures on CPU. A build
that finds none of them in the network stops instead of silently running all in FP16.
(TensorRT 10.12 deprecates these weakly-typed flags and TensorRT 11 removes them in
favour of STRONGLY_TYPED networks, where the islands would come from an FP16 ONNX with
Casts like the one fp16_check.to_fp16 writes; with TensorRT 11 this script builds FP32
only, ``--no-fp16``, and says so.)

Profiles. Decoder step: batch 1..B with the past fixed at max_len (min = opt = max),
the shape the runtime always binds, so one CUDA-graph capture serves every step.
Prefill: batch 1..B, 0 to ``--max-prompt-seconds`` of prompt groups and text of 1 token up
to the rest of max_len (TensorRT reserves activation memory for the largest profile shape,
and the prefill's attention is quadratic in text + prompt, so prompt length is capped rather
than allowed the whole cache). The prompt gets at most half of max_len, so the largest
text + prompt the profile admits still fits the position table. Latent head: batch 1..B.
Post-net and vocoder: batch 1, 1..max_len*r mel frames, tuned for 10 s. The timing cache
persists across builds (``--timing-cache``) so rebuilding on the same GPU is fast.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import onnx
from tqdm import tqdm

from melle.core.cli import ExitCode, OutputError, run_cli
from melle.core.fileio import atomic_path
from melle.core.alignment import ALIGN_BIAS
from melle.core.kv_names import past_names
from melle_export.trt_support import TRT_GRAPHS, TrtCompatibilityError, fp32_islands, require_compatible
from melle.core.manifest import (TIMING_CACHE_FILE, EngineError, EngineManifest, TrtBuild, TrtEngine,
                                    read_manifest, sha256_of, write_manifest)
from melle_runtime.trt_backend import require_gpu

OPT_TEXT_TOKENS = 128  # profile optimum: a sentence
OPT_PROMPT_SECONDS = 3.0  # the paper's continuation prompt
MAX_PROMPT_SECONDS = 20.0
OPT_AUDIO_SECONDS = 10.0  # post-net / vocoder optimum: the paper's Table 5 utterance
METADATA = re.compile(r"\[ONNX Layer: (.*?)(?: \|.*)?\]")

Shape = tuple[int, ...]


def profiles(manifest: EngineManifest, batch_max: int, max_len: int, max_prompt_seconds: float = MAX_PROMPT_SECONDS
             ) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """Per graph, per input: (min, opt, max) shapes of its one optimisation profile."""
    cfg = manifest.config
    frames_per_second = manifest.mel_preset.sample_rate / manifest.mel_preset.hop_length
    max_frames = max_len * cfg.r
    opt_frames = min(max_frames, round(OPT_AUDIO_SECONDS * frames_per_second))
    # Text and prompt share the position table: at most half of it for the prompt, the rest for text,
    # so the largest prefill the profile admits still fits the exported capacity.
    max_prompt = min(math.ceil(max_prompt_seconds * frames_per_second / cfg.r), max_len // 2)
    max_text = max_len - max_prompt
    opt_text = min(OPT_TEXT_TOKENS, max_len // 2)
    opt_prompt = min(math.ceil(OPT_PROMPT_SECONDS * frames_per_second / cfg.r), max_prompt)
    fd, masks, kv = cfg.frame_dim, (2, cfg.prenet_dim), (cfg.n_head, cfg.head_dim)

    def batched(*tail):
        return (1, *tail), (1, *tail), (batch_max, *tail)

    past = {name: ((max_len, 1, *kv), (max_len, 1, *kv), (max_len, batch_max, *kv))
            for name in past_names(cfg.n_layer)}
    mel = ((1, 1, cfg.n_mels), (1, opt_frames, cfg.n_mels), (1, max_frames, cfg.n_mels))
    return {
        # Zero prompt groups (plain TTS) is an empty tensor, which TensorRT 10 accepts.
        "prefill": {"text": ((1, 1), (1, opt_text), (batch_max, max_text)),
                    "prompt_frames": ((1, 0, fd), (1, opt_prompt, fd), (batch_max, max_prompt, fd)),
                    "prompt_masks": ((1, 0, *masks), (1, opt_prompt, *masks), (batch_max, max_prompt, *masks))},
        "decoder_step": {"frames": batched(fd), "prenet_masks": batched(*masks),
                         "position": ((1,), (1,), (1,)), **past,
                         # The guided heads' bias covers the whole fixed-capacity cache, like the past.
                         **({ALIGN_BIAS: batched(max_len)} if cfg.guided_heads else {})},
        "latent_head": {"e": batched(cfg.d_model), "eps": batched(fd)},
        "postnet": {"coarse": mel},
        "vocoder": {"mel": mel},
    }


def _onnx_node(layer) -> str:
    """The ONNX node a parsed layer came from, from its metadata when the parser set it."""
    match = METADATA.fullmatch(getattr(layer, "metadata", "") or "")
    return match.group(1) if match else layer.name


def pin_fp32(trt, network, model: onnx.ModelProto) -> int:
    """Pin the layers of the FP32 islands to FP32; returns how many were pinned."""
    islands = fp32_islands(model)
    tensors = {out for node in model.graph.node if node.name in islands for out in node.output}
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if _onnx_node(layer) not in islands and not any(o.name in tensors for o in outputs):
            continue
        if not all(o.dtype in floats for o in outputs):
            continue  # index / shape arithmetic inside an island: no precision to pin
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer  # the Python API's documented downcast
            layer.compute_precision = trt.float32
        pinned += 1
    if islands and not pinned:
        raise EngineError(f"none of the FP32 islands {sorted(islands)[:3]}... were found among the TensorRT "
                          "layers (has the parser's layer naming changed?); build with --no-fp16")
    return pinned


def build_engine(trt, builder, logger, onnx_path: Path, shapes: dict, fp16: bool, workspace_gb: float,
                 timing_cache) -> tuple[bytes, int]:
    """Serialised engine of one ONNX graph and the number of FP32-pinned layers."""
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        raise EngineError(f"TensorRT refused the timing cache while building {onnx_path.name}; delete it "
                          "(or pass another --timing-cache) and build again")
    pinned = 0
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_fp32(trt, network, onnx.load(str(onnx_path), load_external_data=False))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise EngineError(f"{onnx_path.name}: no profile for input {name}")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {onnx_path.name} (see its log above)")
    return bytes(serialized), pinned


def _timing_cache(config, path: Path):
    """The persistent timing cache, or a fresh one when the file is absent or from another GPU."""
    cache = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"warning: {path} was made on another GPU or TensorRT; starting a fresh timing cache",
              file=sys.stderr)
        cache = config.create_timing_cache(b"")
    return cache


def build(engine_dir: str | Path, fp16: bool = True, batch_max: int | None = None, max_len: int | None = None,
          max_prompt_seconds: float = MAX_PROMPT_SECONDS, timing_cache: str | Path | None = None,
          workspace_gb: float = 4.0) -> TrtBuild:
    """Build every engine of ``engine_dir`` and record them in its manifest; returns the ``trt`` entry."""
    trt, _, device = require_gpu()
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineError(f"TensorRT {trt.__version__} has no weakly-typed FP16 builds (removed in TensorRT 11): "
                          "install TensorRT 10 (pip install 'tensorrt-cu12>=10,<11') or build FP32 with --no-fp16")
    manifest = read_manifest(engine_dir)
    require_standard_attention(manifest)
    require_compatible(engine_dir)
    batch_max = batch_max or manifest.batch_max
    max_len = max_len or manifest.max_len
    if not 1 < max_len <= manifest.max_len:
        raise EngineError(f"--max-len {max_len} must be in 2..{manifest.max_len} (the exported cache capacity)")
    directory = manifest.directory
    cache_path = Path(timing_cache) if timing_cache else directory / TIMING_CACHE_FILE
    shapes = profiles(manifest, batch_max, max_len, max_prompt_seconds)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache = _timing_cache(builder.create_builder_config(), cache_path)
    engines = {}
    for name in tqdm([g for g in TRT_GRAPHS if g in manifest.graphs], desc="build engines", unit="engine"):
        plan, pinned = build_engine(trt, builder, logger, manifest.graph_path(name), shapes[name], fp16,
                                    workspace_gb, cache)
        path = directory / f"{name}.plan"
        with atomic_path(path) as tmp:
            tmp.write_bytes(plan)
        engines[name] = TrtEngine(path.name, sha256_of(path), manifest.graphs[name].sha256, pinned,
                                  {k: [list(s) for s in v] for k, v in shapes[name].items()})
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(bytes(cache.serialize()))

    entry = TrtBuild(trt.__version__, device["gpu"], device["compute_capability"], fp16,
                     ["FP16", "OBEY_PRECISION_CONSTRAINTS"] if fp16 else [], batch_max, max_len, max_prompt_seconds,
                     workspace_gb, datetime.now(timezone.utc).isoformat(timespec="seconds"), engines)
    write_manifest(directory, manifest.with_trt(entry))
    return entry


def require_standard_attention(manifest: EngineManifest) -> None:
    """TensorRT parses standard ONNX ops only: an engine of ORT's contrib attention cannot be built."""
    if manifest.attention != "standard":
        raise EngineError(f"{manifest.directory} was exported with --attention {manifest.attention} (ONNX Runtime "
                          "contrib ops, which TensorRT cannot parse); export another engine directory without "
                          "--attention for TensorRT")


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options and an unusable engine directory before TensorRT is loaded.

    Values: ``p.error`` (exit 2); the engine directory and its graphs: ``EngineError`` (exit 4); where
    the engines and the timing cache would be written: ``OutputError`` (exit 5).
    """
    for option, value, ok, what in (
            ("--batch-max", args.batch_max, args.batch_max is None or args.batch_max >= 1, ">= 1"),
            ("--max-len", args.max_len, args.max_len is None or args.max_len >= 2, ">= 2"),
            ("--max-prompt-seconds", args.max_prompt_seconds, 0 <= args.max_prompt_seconds < math.inf, ">= 0"),
            ("--workspace-gb", args.workspace_gb, 0 < args.workspace_gb < math.inf, "> 0")):
        if not ok:
            p.error(f"{option} must be {what}, got {value}")
    manifest = read_manifest(args.engine)  # the directory, its manifest and every ONNX graph it lists
    require_standard_attention(manifest)
    if args.max_len is not None and args.max_len > manifest.max_len:
        p.error(f"--max-len must be in 2..{manifest.max_len} (the exported cache capacity), got {args.max_len}")
    if args.check:
        return
    if not os.access(manifest.directory, os.W_OK):
        raise OutputError(f"cannot write the engines into {manifest.directory}: the directory is not writable")
    if args.timing_cache:
        cache = Path(args.timing_cache)
        if cache.is_dir():
            raise OutputError(f"--timing-cache {cache} is a directory; give a file path")
        if not cache.parent.is_dir():
            raise OutputError(f"--timing-cache {cache}: the directory {cache.parent} does not exist; create it first")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="engine directory written by export/to_onnx.py")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="FP16 kernels with FP32 islands (default: on)")
    p.add_argument("--batch-max", type=int, help="largest candidate batch (default: the manifest's batch_max)")
    p.add_argument("--max-len", type=int, help="KV cache capacity in positions (default: the manifest's max_len)")
    p.add_argument("--max-prompt-seconds", type=float, default=MAX_PROMPT_SECONDS,
                   help=f"longest voice prompt the prefill engine takes (default: {MAX_PROMPT_SECONDS:g})")
    p.add_argument("--timing-cache", help=f"timing cache file (default: ENGINE_DIR/{TIMING_CACHE_FILE})")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit (default: 4)")
    p.add_argument("--check", action="store_true",
                   help="only run the static TensorRT compatibility check (needs no TensorRT or GPU)")
    args = p.parse_args(argv)
    check_options(p, args)
    if args.check:
        require_compatible(args.engine)
        print(f"{args.engine}: every graph passes the static TensorRT compatibility check")
        return
    # build() checks for TensorRT and a GPU before anything else: a missing one is one EngineError.
    entry = build(args.engine, args.fp16, args.batch_max, args.max_len, args.max_prompt_seconds,
                  args.timing_cache, args.workspace_gb)
    print(f"built {len(entry.engines)} engines for {entry.gpu} (compute capability {entry.compute_capability}) "
          f"with TensorRT {entry.tensorrt} in {args.engine}")


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli): 2 options,
    4 engine directory, compatibility, TensorRT or GPU, 5 where the engines would be written."""
    sys.exit(run_cli(main, {EngineError: ExitCode.MODEL, TrtCompatibilityError: ExitCode.MODEL}))


if __name__ == "__main__":
    cli()
