"""Prefill and decoder-step graphs on ONNX Runtime's fused ``com.microsoft.GroupQueryAttention``.

ORT's CPU kernel attends over a per-layer cache ``[B, n_head, max_len, head_dim]`` (BNSH) and,
when the runtime binds one buffer as both ``past_*`` input and ``present_*`` output, writes the
new K/V into it in place: no copy of the cache anywhere, and one fused kernel instead of the
matmul/mask/softmax/matmul chain ORT cannot fuse in the standard graphs. Each row carries its own
position (``seqlens_k``: the slot of its last token), so rows of a batch need not be in step.

Contrib ops run on ONNX Runtime only: these graphs are an ORT-CPU variant of an engine
(``to_onnx.py --attention gqa``); the standard graphs stay the default and TensorRT's input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from melle.core.kv_names import past_names, present_names
from melle.core.noise import dropout_masks
from melle.model import Melle
from melle_export.graphs import GraphSpec

CONTRIB_DOMAIN = "com.microsoft"


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` to the INT8 cache with one scale per channel (``scale [H*D]``), as ORT stores it."""
    return torch.clamp(torch.round(x / scale.view(1, x.shape[1], 1, x.shape[3])), -128, 127).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.view(1, q.shape[1], 1, q.shape[3])


class GroupQueryAttention(torch.autograd.Function):
    """ORT's GroupQueryAttention with as many K/V heads as query heads, no rotary, causal.

    ``forward`` is the op's math (for tracing and the parity check): query/key/value ``[B, S, H*D]``,
    past ``[B, H, M, D]``, ``seqlens_k [B]`` (int32) the slot of each row's last new token,
    ``total_length`` (int32 scalar) the longest row's length. The S new K/V go to slots
    ``seqlens_k - S + 1 .. seqlens_k``; present is past up to there, zeros after, as ORT returns
    it when the buffers are not shared (shared, the slots after are left as they were).

    With ``k_scale``/``v_scale`` (``[H*D]``, one per channel) the cache is INT8: the new K/V are
    stored quantized (``quantize``) and attention reads every slot dequantized, the new ones too.
    """

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads: int,
                k_scale=None, v_scale=None):
        batch, new, hidden = query.shape
        head_dim, max_len = hidden // num_heads, past_key.shape[2]

        def heads(t):
            return t.view(batch, new, num_heads, head_dim).transpose(1, 2)  # [B, H, S, D]

        last = seqlens_k.long()[:, None]  # [B, 1]
        new_slots = last - new + 1 + torch.arange(new, device=query.device)[None, :]  # [B, S]
        slots = torch.arange(max_len, device=query.device)[None, :]  # [1, M]
        is_new = slots[:, None, :] == new_slots[:, :, None]  # [B, S, M]
        filled = (slots <= last)[:, None, :, None]  # [B, 1, M, 1]

        def present(past, fresh, scale):  # fresh [B, H, S, D] stored at its slots, the rest of the past kept
            stored = fresh if scale is None else quantize(fresh, scale)
            placed = torch.einsum("bsm,bhsd->bhmd", is_new.float(), stored.float())
            return (torch.where(is_new.any(1)[:, None, :, None], placed, past.float()) * filled).to(past.dtype)

        def read(cache, scale):
            return cache if scale is None else dequantize(cache, scale)

        present_key = present(past_key, heads(key), k_scale)
        present_value = present(past_value, heads(value), v_scale)
        scores = torch.matmul(heads(query), read(present_key, k_scale).transpose(-1, -2)) / math.sqrt(head_dim)
        visible = slots[:, None, :] <= new_slots[:, :, None]  # [B, S, M]
        probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)  # [B, H, S, M]
        out = torch.matmul(probs, read(present_value, v_scale)).transpose(1, 2).reshape(batch, new, hidden)
        return out, present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads: int,
                 k_scale=None, v_scale=None):
        inputs = [query, key, value, past_key, past_value, seqlens_k, total_length]
        attributes = {"num_heads_i": num_heads, "kv_num_heads_i": num_heads}
        if k_scale is not None:
            # cos_cache, sin_cache, position_ids, attention_bias and head_sink come first, absent.
            inputs += [_absent(g) for _ in range(5)] + [k_scale, v_scale]
            attributes.update(k_quant_type_s="PER_CHANNEL", v_quant_type_s="PER_CHANNEL", kv_cache_bit_width_i=8)
        return g.op(f"{CONTRIB_DOMAIN}::GroupQueryAttention", *inputs, **attributes, outputs=3)


def _absent(g):
    """An omitted optional input (an empty name in the ONNX node)."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


class KvScales(nn.Module):
    """The INT8 cache's per-channel scales, ``[n_layer, H*D]`` for K and for V (exported as initializers)."""

    def __init__(self, key: np.ndarray, value: np.ndarray):
        super().__init__()
        self.register_buffer("key", torch.from_numpy(np.asarray(key, np.float32)))
        self.register_buffer("value", torch.from_numpy(np.asarray(value, np.float32)))


def scales_of_graph(path) -> KvScales:
    """The INT8 cache scales an exported GQA graph holds, layer by layer (its nodes are in layer order)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants.update((n.output[0], numpy_helper.to_array(n.attribute[0].t)) for n in graph.node
                     if n.op_type == "Constant" and n.attribute[0].name == "value")
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 13]
    if not nodes:
        raise ValueError(f"{path} has no GroupQueryAttention over an INT8 cache")
    key, value = ([constants[n.input[i]] for n in nodes] for i in (12, 13))  # inputs k_scale, v_scale
    return KvScales(np.stack(key), np.stack(value))


def _decode_gqa(model: Melle, x: torch.Tensor, past: tuple[torch.Tensor, ...], seqlens_k: torch.Tensor,
                total_length: torch.Tensor, scales: KvScales | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder over ``x [B, S, d]`` with every layer's attention fused; final hidden and presents."""
    presents: list[torch.Tensor] = []

    def attend(i, block):
        layer_scales = () if scales is None else (scales.key[i], scales.value[i])

        def run(h):
            query, key, value = block.attn.qkv(h).chunk(3, dim=-1)  # qkv's [3, H, D] layout: q, k, v blocks
            out, present_key, present_value = GroupQueryAttention.apply(
                query, key, value, past[2 * i], past[2 * i + 1], seqlens_k, total_length, model.cfg.n_head,
                *layer_scales)
            presents.extend((present_key, present_value))
            return block.attn.proj(out)
        return run

    for i, block in enumerate(model.blocks):
        x = block(x, attend(i, block))
    return model.ln_f(x), presents


class GqaPrefill(nn.Module):
    """text [B, Lx] + prompt groups [B, Gp, frame_dim] + cache buffers -> e of the last position, the cache."""

    def __init__(self, model: Melle, scales: KvScales | None = None):
        super().__init__()
        self.model, self.scales = model, scales

    def forward(self, text, prompt_frames, prompt_masks, *past):
        x = self.model.embed(text, prompt_frames, prompt_masks)
        seqlens_k = torch.ones_like(text[:, 0], dtype=torch.int32) * (x.shape[1] - 1)
        hidden, presents = _decode_gqa(self.model, x, past, seqlens_k, seqlens_k[0] + 1, self.scales)
        return (hidden[:, -1], *presents)


class GqaDecoderStep(nn.Module):
    """One frame group per row at that row's position ``seqlens_k`` -> e, the cache with its K/V written."""

    def __init__(self, model: Melle, scales: KvScales | None = None):
        super().__init__()
        self.model, self.scales = model, scales

    def forward(self, frames, prenet_masks, seqlens_k, total_length, *past):
        x = self.model.prenet(frames[:, None], prenet_masks[:, None]) + self.model.position(seqlens_k.long())[:, None]
        hidden, presents = _decode_gqa(self.model, x, past, seqlens_k, total_length, self.scales)
        return (hidden[:, 0], *presents)


def _cache(cfg, rng: np.random.Generator, batch: int, max_len: int, filled: int, dtype) -> list[np.ndarray]:
    """Example cache buffers: ``filled`` slots of random K/V, zeros after (as a decode leaves them)."""
    buffers = [np.zeros((batch, cfg.n_head, max_len, cfg.head_dim), dtype) for _ in range(2 * cfg.n_layer)]
    for buffer in buffers:
        values = rng.standard_normal((batch, cfg.n_head, filled, cfg.head_dim))
        buffer[:, :, :filled] = values if dtype == np.float32 else np.round(values * 40)
    return buffers


def gqa_model_graphs(model: Melle, scales: KvScales | None = None) -> tuple[GraphSpec, GraphSpec]:
    """The GroupQueryAttention prefill and decoder step, under the standard graphs' names; an INT8 cache
    with ``scales``."""
    cfg = model.cfg
    dtype = np.float32 if scales is None else np.int8
    cache_axes = {0: "batch", 2: "max_len"}
    caches = {n: cache_axes for n in past_names(cfg.n_layer) + present_names(cfg.n_layer)}
    prefill = GraphSpec(
        "prefill", GqaPrefill(model, scales), ["text", "prompt_frames", "prompt_masks"] + past_names(cfg.n_layer),
        ["e"] + present_names(cfg.n_layer),
        {"text": {0: "batch", 1: "text_len"}, "prompt_frames": {0: "batch", 1: "prompt_groups"},
         "prompt_masks": {0: "batch", 1: "prompt_groups"}, "e": {0: "batch"}, **caches},
        lambda rng: [rng.integers(2, cfg.n_text_vocab, (2, 9)).astype(np.int64),
                     rng.standard_normal((2, 3, cfg.frame_dim)).astype(np.float32), dropout_masks(rng, (2, 3), cfg),
                     *_cache(cfg, rng, 2, 20, 0, dtype)],
        custom_opsets={CONTRIB_DOMAIN: 1},
    )
    step = GraphSpec(
        "decoder_step", GqaDecoderStep(model, scales),
        ["frames", "prenet_masks", "seqlens_k", "total_length"] + past_names(cfg.n_layer),
        ["e"] + present_names(cfg.n_layer),
        {"frames": {0: "batch"}, "prenet_masks": {0: "batch"}, "seqlens_k": {0: "batch"}, "e": {0: "batch"}, **caches},
        # Rows at different positions (12 and 9): the graph must keep them apart.
        lambda rng: [rng.standard_normal((2, cfg.frame_dim)).astype(np.float32), dropout_masks(rng, (2,), cfg),
                     np.array([12, 9], np.int32), np.array(13, np.int32), *_cache(cfg, rng, 2, 20, 12, dtype)],
        custom_opsets={CONTRIB_DOMAIN: 1},
    )
    return prefill, step
