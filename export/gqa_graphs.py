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


class GroupQueryAttention(torch.autograd.Function):
    """ORT's GroupQueryAttention with as many K/V heads as query heads, no rotary, causal.

    ``forward`` is the op's math (for tracing and the parity check): query/key/value ``[B, S, H*D]``,
    past ``[B, H, M, D]``, ``seqlens_k [B]`` (int32) the slot of each row's last new token,
    ``total_length`` (int32 scalar) the longest row's length. The S new K/V go to slots
    ``seqlens_k - S + 1 .. seqlens_k``; present is past up to there, zeros after, as ORT returns
    it when the buffers are not shared (shared, the slots after are left as they were).
    """

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads: int):
        batch, new, hidden = query.shape
        head_dim, max_len = hidden // num_heads, past_key.shape[2]

        def heads(t):
            return t.view(batch, new, num_heads, head_dim).transpose(1, 2)  # [B, H, S, D]

        last = seqlens_k.long()[:, None]  # [B, 1]
        new_slots = last - new + 1 + torch.arange(new, device=query.device)[None, :]  # [B, S]
        slots = torch.arange(max_len, device=query.device)[None, :]  # [1, M]
        is_new = slots[:, None, :] == new_slots[:, :, None]  # [B, S, M]
        filled = (slots <= last)[:, None, :, None]  # [B, 1, M, 1]

        def present(past, fresh):  # fresh [B, H, S, D] scattered to its slots, the rest of the past kept
            placed = torch.einsum("bsm,bhsd->bhmd", is_new.to(fresh.dtype), fresh)
            return torch.where(is_new.any(1)[:, None, :, None], placed, past) * filled

        present_key, present_value = present(past_key, heads(key)), present(past_value, heads(value))
        scores = torch.matmul(heads(query), present_key.transpose(-1, -2)) / math.sqrt(head_dim)  # [B, H, S, M]
        visible = slots[:, None, :] <= new_slots[:, :, None]  # [B, S, M]
        probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        out = torch.matmul(probs, present_value).transpose(1, 2).reshape(batch, new, hidden)
        return out, present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads: int):
        return g.op(f"{CONTRIB_DOMAIN}::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k,
                    total_length, num_heads_i=num_heads, kv_num_heads_i=num_heads, outputs=3)


def _decode_gqa(model: Melle, x: torch.Tensor, past: tuple[torch.Tensor, ...], seqlens_k: torch.Tensor,
                total_length: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder over ``x [B, S, d]`` with every layer's attention fused; final hidden and presents."""
    presents: list[torch.Tensor] = []

    def attend(i, block):
        def run(h):
            query, key, value = block.attn.qkv(h).chunk(3, dim=-1)  # qkv's [3, H, D] layout: q, k, v blocks
            out, present_key, present_value = GroupQueryAttention.apply(
                query, key, value, past[2 * i], past[2 * i + 1], seqlens_k, total_length, model.cfg.n_head)
            presents.extend((present_key, present_value))
            return block.attn.proj(out)
        return run

    for i, block in enumerate(model.blocks):
        x = block(x, attend(i, block))
    return model.ln_f(x), presents


class GqaPrefill(nn.Module):
    """text [B, Lx] + prompt groups [B, Gp, frame_dim] + cache buffers -> e of the last position, the cache."""

    def __init__(self, model: Melle):
        super().__init__()
        self.model = model

    def forward(self, text, prompt_frames, prompt_masks, *past):
        x = self.model.embed(text, prompt_frames, prompt_masks)
        seqlens_k = torch.ones_like(text[:, 0], dtype=torch.int32) * (x.shape[1] - 1)
        hidden, presents = _decode_gqa(self.model, x, past, seqlens_k, seqlens_k[0] + 1)
        return (hidden[:, -1], *presents)


class GqaDecoderStep(nn.Module):
    """One frame group per row at that row's position ``seqlens_k`` -> e, the cache with its K/V written."""

    def __init__(self, model: Melle):
        super().__init__()
        self.model = model

    def forward(self, frames, prenet_masks, seqlens_k, total_length, *past):
        x = self.model.prenet(frames[:, None], prenet_masks[:, None]) + self.model.position(seqlens_k.long())[:, None]
        hidden, presents = _decode_gqa(self.model, x, past, seqlens_k, total_length)
        return (hidden[:, 0], *presents)


def _cache(cfg, rng: np.random.Generator, batch: int, max_len: int, filled: int) -> list[np.ndarray]:
    """Example cache buffers: ``filled`` slots of random K/V, zeros after (as a decode leaves them)."""
    buffers = [np.zeros((batch, cfg.n_head, max_len, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)]
    for buffer in buffers:
        buffer[:, :, :filled] = rng.standard_normal((batch, cfg.n_head, filled, cfg.head_dim))
    return buffers


def gqa_model_graphs(model: Melle) -> tuple[GraphSpec, GraphSpec]:
    """The GroupQueryAttention prefill and decoder step, under the standard graphs' names."""
    cfg = model.cfg
    cache_axes = {0: "batch", 2: "max_len"}
    caches = {n: cache_axes for n in past_names(cfg.n_layer) + present_names(cfg.n_layer)}
    prefill = GraphSpec(
        "prefill", GqaPrefill(model), ["text", "prompt_frames", "prompt_masks"] + past_names(cfg.n_layer),
        ["e"] + present_names(cfg.n_layer),
        {"text": {0: "batch", 1: "text_len"}, "prompt_frames": {0: "batch", 1: "prompt_groups"},
         "prompt_masks": {0: "batch", 1: "prompt_groups"}, "e": {0: "batch"}, **caches},
        lambda rng: [rng.integers(2, cfg.n_text_vocab, (2, 9)).astype(np.int64),
                     rng.standard_normal((2, 3, cfg.frame_dim)).astype(np.float32), dropout_masks(rng, (2, 3), cfg),
                     *_cache(cfg, rng, 2, 20, 0)],
        custom_opsets={CONTRIB_DOMAIN: 1},
    )
    step = GraphSpec(
        "decoder_step", GqaDecoderStep(model),
        ["frames", "prenet_masks", "seqlens_k", "total_length"] + past_names(cfg.n_layer),
        ["e"] + present_names(cfg.n_layer),
        {"frames": {0: "batch"}, "prenet_masks": {0: "batch"}, "seqlens_k": {0: "batch"}, "e": {0: "batch"}, **caches},
        # Rows at different positions (12 and 9): the graph must keep them apart.
        lambda rng: [rng.standard_normal((2, cfg.frame_dim)).astype(np.float32), dropout_masks(rng, (2,), cfg),
                     np.array([12, 9], np.int32), np.array(13, np.int32), *_cache(cfg, rng, 2, 20, 12)],
        custom_opsets={CONTRIB_DOMAIN: 1},
    )
    return prefill, step
