"""Small wrapper modules, one per exported graph, around the same ``Melle`` weights.

Each wrapper's ``forward`` is the graph's signature; ``GraphSpec`` names its inputs,
outputs and symbolic axes and draws example inputs for tracing and parity checks.
KV tensors are time-major ``[positions, batch, n_head, head_dim]`` and named by ``melle.core.kv_names``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from melle.core.config import MelleConfig
from melle.core.alignment import ALIGN_ATTENTION, ALIGN_BIAS
from melle.core.kv_names import past_names, present_names
from melle.model import Melle
from melle.vocoder import HifiganConfig, context_frames
from melle.core.noise import dropout_masks


class Prefill(nn.Module):
    """text [B, Lx] + prompt groups [B, Gp, frame_dim] -> e of the last position, the prefix's K/V."""

    def __init__(self, model: Melle):
        super().__init__()
        self.model = model

    def forward(self, text, prompt_frames, prompt_masks):
        hidden, kv = self.model.decode(self.model.embed(text, prompt_frames, prompt_masks))
        return (hidden[:, -1], *[t for pair in kv for t in pair])


class DecoderStep(nn.Module):
    """One frame group at ``position`` against a read-only past -> e and the new K/V slice.

    A model with guided heads also takes ``align_bias [B, past_len]`` (after the past) and returns
    their mean attention over the past ``align [B, past_len]`` (last): alignment-guided decoding.
    """

    def __init__(self, model: Melle):
        super().__init__()
        self.model = model

    def forward(self, frames, prenet_masks, position, *past_and_bias):
        aligned = bool(self.model.cfg.guided_heads)
        past = past_and_bias[:-1] if aligned else past_and_bias
        x = self.model.embed_step(frames, prenet_masks, position)
        hidden, new_k, new_v, align = self.model.decode_past(x, list(past[0::2]), list(past[1::2]), position,
                                                             past_and_bias[-1] if aligned else None)
        return (hidden[:, 0], *[t for pair in zip(new_k, new_v) for t in pair], *([align] if aligned else []))


class LatentHeadGraph(nn.Module):
    """e [B, d] + eps [B, frame_dim] -> mu, logvar, y' and the stop logit."""

    def __init__(self, model: Melle):
        super().__init__()
        self.model = model

    def forward(self, e, eps):
        return self.model.latent(e, eps)


class PostNetGraph(nn.Module):
    """y' [B, frames, n_mels] -> y''."""

    def __init__(self, model: Melle):
        super().__init__()
        self.model = model

    def forward(self, coarse):
        return self.model.refine(coarse)


class Vocoder(nn.Module):
    """mel [B, frames, n_mels] (our frames-major layout) -> waveform [B, samples]."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, mel):
        return self.generator(mel.transpose(1, 2))[:, 0]


@dataclass
class GraphSpec:
    name: str  # file stem and manifest key
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    example: Callable[[np.random.Generator], list[np.ndarray]]  # inputs for tracing and parity
    context_frames: int | None = None  # frame graphs: receptive radius in frames (manifest, streaming)
    custom_opsets: dict[str, int] | None = None  # non-standard op domains the graph uses (ORT contrib ops)


def _past(cfg: MelleConfig, rng: np.random.Generator, batch: int, length: int) -> list[np.ndarray]:
    shape = (length, batch, cfg.n_head, cfg.head_dim)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(2 * cfg.n_layer)]


def model_graphs(model: Melle) -> list[GraphSpec]:
    """The four model graphs with names, symbolic axes and example-input makers."""
    cfg = model.cfg
    batch = {0: "batch"}
    kv_axes_prefix = {0: "prefix_len", 1: "batch"}
    masks_of = lambda rng, shape: dropout_masks(rng, shape, cfg)  # noqa: E731
    prefill = GraphSpec(
        "prefill", Prefill(model), ["text", "prompt_frames", "prompt_masks"],
        ["e"] + present_names(cfg.n_layer),
        {"text": {0: "batch", 1: "text_len"}, "prompt_frames": {0: "batch", 1: "prompt_groups"},
         "prompt_masks": {0: "batch", 1: "prompt_groups"}, "e": batch,
         **{n: kv_axes_prefix for n in present_names(cfg.n_layer)}},
        lambda rng: [rng.integers(2, cfg.n_text_vocab, (2, 9)).astype(np.int64),
                     rng.standard_normal((2, 3, cfg.frame_dim)).astype(np.float32), masks_of(rng, (2, 3))],
    )
    aligned = bool(cfg.guided_heads)
    step = GraphSpec(
        "decoder_step", DecoderStep(model),
        ["frames", "prenet_masks", "position"] + past_names(cfg.n_layer) + [ALIGN_BIAS] * aligned,
        ["e"] + present_names(cfg.n_layer) + [ALIGN_ATTENTION] * aligned,
        {"frames": batch, "prenet_masks": batch, "e": batch,
         **{n: {0: "past_len", 1: "batch"} for n in past_names(cfg.n_layer)},
         **{n: {1: "batch"} for n in present_names(cfg.n_layer)},
         **{n: {0: "batch", 1: "past_len"} for n in [ALIGN_BIAS, ALIGN_ATTENTION][: 2 * aligned]}},
        lambda rng: [rng.standard_normal((2, cfg.frame_dim)).astype(np.float32), masks_of(rng, (2,)),
                     np.array([12], np.int64), *_past(cfg, rng, 2, 12),
                     # A window of open slots in a sea of strongly biased ones, as a guided decode gives.
                     *[np.where(np.arange(12) % 5 == 0, 0.0, -4.0)[None].repeat(2, 0).astype(np.float32)] * aligned],
    )
    latent = GraphSpec(
        "latent_head", LatentHeadGraph(model), ["e", "eps"], ["mu", "logvar", "y_coarse", "stop_logit"],
        {"e": batch, "eps": batch, "mu": batch, "logvar": batch, "y_coarse": batch, "stop_logit": batch},
        lambda rng: [rng.standard_normal((2, cfg.d_model)).astype(np.float32),
                     rng.standard_normal((2, cfg.frame_dim)).astype(np.float32)],
    )
    postnet = GraphSpec(
        "postnet", PostNetGraph(model), ["coarse"], ["refined"],
        {"coarse": {0: "batch", 1: "frames"}, "refined": {0: "batch", 1: "frames"}},
        lambda rng: [rng.standard_normal((1, 37, cfg.n_mels)).astype(np.float32)],
        context_frames=cfg.postnet_context,
    )
    return [prefill, step, latent, postnet]


def vocoder_graph(generator: nn.Module, config: HifiganConfig) -> GraphSpec:
    """The vocoder graph of a HiFi-GAN ``generator`` built from ``config`` (mels in, receptive field)."""
    n_mels = config.num_mels
    return GraphSpec(
        "vocoder", Vocoder(generator), ["mel"], ["wav"],
        {"mel": {0: "batch", 1: "frames"}, "wav": {0: "batch", 1: "samples"}},
        # Log-mel values in the vocoder's usual range.
        lambda rng: [(rng.standard_normal((1, 24, n_mels)) * 2 - 6).astype(np.float32)],
        context_frames=context_frames(config),
    )


def export_graph(spec: GraphSpec, path, opset: int) -> None:
    """Trace ``spec.module`` on its example inputs into an ONNX file at ``path``."""
    example = [torch.from_numpy(a) for a in spec.example(np.random.default_rng(0))]
    spec.module.eval()
    with torch.no_grad():
        torch.onnx.export(spec.module, tuple(example), str(path), input_names=spec.inputs,
                          output_names=spec.outputs, dynamic_axes=spec.dynamic_axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True, custom_opsets=spec.custom_opsets)


def run_torch(spec: GraphSpec, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The PyTorch module on numpy inputs, outputs as numpy (for parity)."""
    with torch.no_grad():
        out = spec.module(*[torch.from_numpy(a) for a in inputs])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]

