"""MELLE: a decoder-only Transformer LM over [text tokens + EOS] ++ [mel frame groups].

Paper section 3. One step consumes a group of r mel frames (``frame_dim = r * n_mels``)
through the dropout pre-net and predicts the next group through the latent sampling
module (mu, logvar -> z = mu + sigma * eps -> y' = z + MLP(z)) plus a stop logit.
The post-net refines the whole y' sequence once, after the AR loop.

The hidden state at the last text position (EOS) predicts frame group 0; the one at
text length + g predicts group g + 1. Positions are absolute indices into the
concatenated sequence, computed by one function for training, prefill and step.

Randomness is an input: pre-net dropout masks ``[B, T, 2, prenet_dim]`` and latent
noise ``eps [B, T, frame_dim]`` may be given; when they are not, they are drawn here.

KV cache layout is time-major ``[max_len, B, n_head, head_dim]`` per layer, so the
filled prefix ``cache[:pos]`` is a contiguous view (see DESIGN.md "Contracts").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from melle.core.config import MelleConfig
from melle.core.noise import N_PRENET_DROPOUTS


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """The Transformer sine/cosine position table, ``[max_len, dim]``."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class PositionEmbedding(nn.Module):
    """Absolute positions as a table lookup; the same call serves train, prefill and step."""

    def __init__(self, cfg: MelleConfig):
        super().__init__()
        if cfg.positions == "learned":
            self.table = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)
        else:
            self.register_buffer("table", sinusoid_table(cfg.max_len, cfg.d_model), persistent=False)
        # Learned scale, as in VALL-E: lets the model weigh position against content.
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.table[positions]


class PreNet(nn.Module):
    """Mel frame group -> d_model through two dropout layers that stay on at inference."""

    def __init__(self, cfg: MelleConfig):
        super().__init__()
        self.p = cfg.prenet_dropout
        self.fc1 = nn.Linear(cfg.frame_dim, cfg.prenet_dim)
        self.fc2 = nn.Linear(cfg.prenet_dim, cfg.prenet_dim)
        self.proj = nn.Linear(cfg.prenet_dim, cfg.d_model)

    def sample_masks(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Inverted-dropout masks ``[*shape, 2, prenet_dim]`` with values 0 or 1/(1-p)."""
        keep = torch.rand(*shape, N_PRENET_DROPOUTS, self.fc1.out_features, device=device) >= self.p
        return keep.float() / (1.0 - self.p)

    def forward(self, frames: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        # frames: [B, T, frame_dim]; masks: [B, T, 2, prenet_dim]
        if masks is None:
            masks = self.sample_masks(frames.shape[:-1], frames.device)
        h = F.relu(self.fc1(frames)) * masks[..., 0, :]
        h = F.relu(self.fc2(h)) * masks[..., 1, :]
        return self.proj(h)


class Attention(nn.Module):
    """Causal multi-head self-attention with three ways to see the past.

    ``forward`` without a cache (training, prefill export), with a preallocated cache
    written in place (reference generation), or with a read-only past and a position
    (the exported decode step, which must not copy the cache).
    """

    def __init__(self, cfg: MelleConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim)  # [B, T, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, D]
        return q, k, v

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        b, h, t, d = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, h * d))  # [B, T, d_model]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full causal attention over ``x [B, T, d]``; returns output and this input's K, V."""
        q, k, v = self.split_heads(x)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.merge_heads(y), k, v

    def forward_cached(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                       start: int) -> torch.Tensor:
        """Write this input's K/V into the cache at ``start`` and attend to ``[0, start + T)``."""
        q, k, v = self.split_heads(x)
        t = x.shape[1]
        cache_k[start:start + t] = k.permute(2, 0, 1, 3)  # [T, B, H, D]
        cache_v[start:start + t] = v.permute(2, 0, 1, 3)
        keys = cache_k[:start + t].permute(1, 2, 0, 3)  # [B, H, S, D]
        values = cache_v[:start + t].permute(1, 2, 0, 3)
        slots = torch.arange(start + t, device=x.device)
        visible = slots[None, :] <= (start + torch.arange(t, device=x.device))[:, None]  # [T, S]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        return self.merge_heads(y)

    def forward_past(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, position: torch.Tensor,
                     guided: list[int] = (), align_bias: torch.Tensor | None = None):
        """One step ``x [B, 1, d]`` against a read-only past ``[P, B, H, D]``.

        Slots at or beyond ``position`` are masked, so the past may be the filled prefix
        (P = position) or the whole preallocated buffer. The new K/V are attended
        separately and returned ``[1, B, H, D]`` for the caller to write at ``position``:
        no concatenation, so the cache is never copied inside the step.

        ``guided`` heads get ``align_bias [B, P]`` added to their scores over the past, and
        their attention over the past comes back ``[B, len(guided), P]`` (None without heads).
        """
        q, k, v = self.split_heads(x)  # [B, H, 1, D]
        scale = 1.0 / math.sqrt(self.head_dim)
        scores_past = torch.matmul(q, past_k.permute(1, 2, 3, 0)) * scale  # [B, H, 1, P]
        slots = torch.arange(past_k.shape[0], device=x.device)
        scores_past = scores_past.masked_fill(slots >= position, float("-inf"))
        if guided and align_bias is not None:
            bias = align_bias[:, None, :]  # [B, 1, P]
            scores_past = torch.stack([s + bias if h in guided else s for h, s in enumerate(scores_past.unbind(1))], 1)
        scores_new = (q * k).sum(-1, keepdim=True) * scale  # [B, H, 1, 1]
        probs = torch.softmax(torch.cat([scores_past, scores_new], dim=-1), dim=-1)
        y = torch.matmul(probs[..., :-1], past_v.permute(1, 2, 0, 3)) + probs[..., -1:] * v
        attention = probs[:, list(guided), 0, :-1] if guided else None
        return self.merge_heads(y), k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3), attention

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Causal attention weights ``[B, H, T, T]`` (for the guided-attention loss)."""
        q, k, _ = self.split_heads(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


class Block(nn.Module):
    """Pre-LN Transformer block; ``attend`` maps the normed input to attention output."""

    def __init__(self, cfg: MelleConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ffn), nn.GELU(), nn.Linear(cfg.d_ffn, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        x = x + self.drop(attend(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class LatentHead(nn.Module):
    """e_t -> (mu, logvar); z = mu + exp(0.5 logvar) * eps; y' = z + MLP3(z); stop logit."""

    def __init__(self, cfg: MelleConfig):
        super().__init__()
        self.to_stats = nn.Linear(cfg.d_model, 2 * cfg.frame_dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.frame_dim, cfg.latent_mlp_dim), nn.ReLU(),
            nn.Linear(cfg.latent_mlp_dim, cfg.latent_mlp_dim), nn.ReLU(),
            nn.Linear(cfg.latent_mlp_dim, cfg.frame_dim),
        )
        self.stop = nn.Linear(cfg.d_model, 1)

    def forward(self, e: torch.Tensor, eps: torch.Tensor | None = None):
        """``e [..., d]`` -> mu, logvar, y' (each ``[..., frame_dim]``) and stop logit ``[...]``."""
        mu, logvar = self.to_stats(e).chunk(2, dim=-1)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        return mu, logvar, z + self.mlp(z), self.stop(e).squeeze(-1)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over channels of a ``[B, C, T]`` tensor: per frame, blind to padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class PostNet(nn.Module):
    """Convolution blocks over the y' sequence producing a residual: y'' = y' + PostNet(y')."""

    def __init__(self, cfg: MelleConfig):
        super().__init__()
        dims = [cfg.n_mels] + [cfg.postnet_channels] * (cfg.postnet_layers - 1) + [cfg.n_mels]
        pad = cfg.postnet_kernel // 2
        self.convs = nn.ModuleList(nn.Conv1d(a, b, cfg.postnet_kernel, padding=pad) for a, b in zip(dims, dims[1:]))
        self.norms = nn.ModuleList(ChannelNorm(b) for b in dims[1:-1])
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # mel: [B, frames, n_mels] -> [B, frames, n_mels]
        h = mel.transpose(1, 2)  # [B, n_mels, frames]
        for conv, norm in zip(self.convs, self.norms):
            h = self.drop(torch.tanh(norm(conv(h))))
        return mel + self.convs[-1](h).transpose(1, 2)


@dataclass
class MelleOutput:
    """Teacher-forced outputs per frame group (``G`` groups, ``r`` frames each)."""

    mu: torch.Tensor  # [B, G, frame_dim]
    logvar: torch.Tensor  # [B, G, frame_dim]
    y_coarse: torch.Tensor  # y' [B, G * r, n_mels]
    y_refined: torch.Tensor  # y'' [B, G * r, n_mels]
    stop_logits: torch.Tensor  # [B, G]
    attention: list[torch.Tensor]  # requested layers' probs [B, H, L, L]


class Melle(nn.Module):
    def __init__(self, cfg: MelleConfig):
        super().__init__()
        self.cfg = cfg
        self.text_embedding = nn.Embedding(cfg.n_text_vocab, cfg.d_model)
        self.position = PositionEmbedding(cfg)
        self.prenet = PreNet(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.latent = LatentHead(cfg)
        self.postnet = PostNet(cfg)

    # -- pieces shared by training, reference generation and the export wrappers --

    def embed(self, text: torch.Tensor, frames: torch.Tensor, frame_masks: torch.Tensor | None,
              start: int = 0) -> torch.Tensor:
        """Embeddings with positions of ``text [B, Lx]`` followed by ``frames [B, G, frame_dim]``."""
        x = torch.cat([self.text_embedding(text), self.prenet(frames, frame_masks)], dim=1)
        return x + self.position(torch.arange(start, start + x.shape[1], device=x.device))

    def embed_step(self, frames: torch.Tensor, masks: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One frame group ``[B, frame_dim]`` at ``position`` (a 1-element tensor) -> ``[B, 1, d]``."""
        return self.prenet(frames[:, None], masks[:, None]) + self.position(position)

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Causal decoder over ``x [B, L, d]``; returns final hidden and each layer's K/V ``[L, B, H, D]``."""
        kv = []

        def attend(block):
            def run(h):
                y, k, v = block.attn(h)
                kv.append((k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)))
                return y
            return run

        for block in self.blocks:
            x = block(x, attend(block))
        return self.ln_f(x), kv

    def decode_cached(self, x: torch.Tensor, cache: "KVCache", start: int) -> torch.Tensor:
        """Decoder over ``x [B, T, d]`` at ``start``, reading and writing the cache in place."""
        for i, block in enumerate(self.blocks):
            x = block(x, lambda h, i=i, blk=block: blk.attn.forward_cached(h, cache.k[i], cache.v[i], start))
        return self.ln_f(x)

    def decode_past(self, x: torch.Tensor, past_k: list[torch.Tensor], past_v: list[torch.Tensor],
                    position: torch.Tensor, align_bias: torch.Tensor | None = None):
        """One step against read-only per-layer past K/V; returns hidden, the new K/V slices and,
        when the config names guided heads, their mean attention over the past ``[B, P]`` (else None).

        ``align_bias [B, P]`` is added to the guided heads' scores (alignment-guided decoding).
        """
        new_k, new_v, attention = [], [], []

        def attend(i, block):
            def run(h):
                y, k, v, probs = block.attn.forward_past(h, past_k[i], past_v[i], position,
                                                         self.cfg.guided_heads_of(i), align_bias)
                new_k.append(k)
                new_v.append(v)
                if probs is not None:
                    attention.append(probs)
                return y
            return run

        for i, block in enumerate(self.blocks):
            x = block(x, attend(i, block))
        align = torch.cat(attention, dim=1).mean(1) if attention else None
        return self.ln_f(x), new_k, new_v, align

    def refine(self, y_coarse: torch.Tensor) -> torch.Tensor:
        """Post-net over ``y' [B, frames, n_mels]`` -> y''."""
        return self.postnet(y_coarse)

    # -- training --

    def forward(self, text: torch.Tensor, text_lens: torch.Tensor, frames: torch.Tensor,
                n_groups: torch.Tensor, prenet_masks: torch.Tensor | None = None,
                eps: torch.Tensor | None = None, attention_layers: tuple[int, ...] = ()) -> MelleOutput:
        """Teacher-forced pass.

        text: [B, Lx] token ids incl. EOS, right-padded; text_lens: [B].
        frames: [B, G, frame_dim] target frame groups, right-padded; n_groups: [B].
        Each sample's sequence is its own text followed by its groups 0..G_i-2, so the
        decoder sees no padding inside a sequence; padding sits only at the end.
        """
        b, lx = text.shape
        g = frames.shape[1]
        length = int((text_lens + n_groups - 1).max())
        slot = torch.arange(length, device=text.device)[None, :]  # [1, L]
        is_text = slot < text_lens[:, None]  # [B, L]
        text_idx = slot.clamp(max=lx - 1).expand(b, -1)
        frame_idx = (slot - text_lens[:, None]).clamp(0, max(g - 2, 0))
        text_emb = self.text_embedding(text)
        frame_emb = self.prenet(frames[:, :-1] if g > 1 else frames[:, :0], prenet_masks)
        d = text_emb.shape[-1]
        picked_text = text_emb.gather(1, text_idx[..., None].expand(-1, -1, d))
        if frame_emb.shape[1] == 0:  # single-group utterances: nothing to teacher-force
            frame_emb = torch.zeros_like(text_emb[:, :1])
        picked_frames = frame_emb.gather(1, frame_idx[..., None].expand(-1, -1, d))
        x = torch.where(is_text[..., None], picked_text, picked_frames) + self.position(slot[0])

        attention = []
        for i, block in enumerate(self.blocks):
            if i in attention_layers:
                attention.append(block.attn.attention_probs(block.ln1(x)))
            x = block(x, lambda h, blk=block: blk.attn(h)[0])
        hidden = self.ln_f(x)

        # Group j is predicted at sequence index text_len - 1 + j.
        out_idx = (text_lens[:, None] - 1 + torch.arange(g, device=text.device)[None, :]).clamp(max=length - 1)
        e = hidden.gather(1, out_idx[..., None].expand(-1, -1, d))  # [B, G, d]
        # Under mixed-precision training the heads still run in FP32: their outputs are the
        # mel values the losses compare at full precision (bf16 keeps ~2-3 digits).
        with torch.autocast(e.device.type, enabled=False):
            mu, logvar, y_groups, stop_logits = self.latent(e.float(), eps)
            y_coarse = y_groups.reshape(b, g * self.cfg.r, self.cfg.n_mels)  # groups -> frames
            y_refined = self.refine(y_coarse)
        return MelleOutput(mu, logvar, y_coarse, y_refined, stop_logits, attention)


class KVCache:
    """Per-layer K and V buffers ``[max_len, B, H, D]``, allocated once per utterance batch."""

    def __init__(self, cfg: MelleConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (max_len, batch, cfg.n_head, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
