"""MELLE training objective (paper eq. 6-9) plus an optional guided-attention aid.

L = L_reg + lambda * L_KL + beta * L_flux + gamma * L_stop (+ w_ga * L_guided)

Every term is a mean over the valid (unpadded) elements rather than the paper's sums,
so weights do not depend on utterance length or batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from melle.model import MelleOutput


@dataclass
class LossConfig:
    kl_weight: float = 0.1  # lambda, after kl_start_step (paper: 0 for the first 10K steps)
    kl_start_step: int = 10_000
    flux_weight: float = 0.5  # beta
    # "paper": -|mu_t - y_{t-1}|_1 as written; unbounded below, so the model can win it by
    # drifting mu away from the data. "bounded": exp(-|mu_t - y_{t-1}|), in (0, 1], which
    # rewards variation the same way near zero and stops paying once frames differ.
    flux_form: str = "bounded"
    stop_weight: float = 1.0  # gamma
    stop_pos_weight: float = 100.0  # the single positive frame per utterance
    # Guided attention (Tachibana et al. 2017): a diagonal prior on text attention of a few
    # heads in the lower layers. Training aid only; changes no inference graph.
    guided_weight: float = 0.0
    guided_sigma: float = 0.2
    guided_layers: tuple[int, ...] = (0, 1)
    guided_heads: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.flux_form not in ("paper", "bounded"):
            raise ValueError(f"flux_form must be 'paper' or 'bounded', got {self.flux_form!r}")
        self.guided_layers = tuple(self.guided_layers)
        self.guided_heads = tuple(self.guided_heads)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (broadcast to it) is true."""
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def regression_loss(y: torch.Tensor, y_coarse: torch.Tensor, y_refined: torch.Tensor,
                    frame_mask: torch.Tensor) -> torch.Tensor:
    """L1 + L2 on y' and on y'' against the target y (all ``[B, frames, n_mels]``)."""
    m = frame_mask[..., None]
    return sum(masked_mean((y - pred).abs(), m) + masked_mean((y - pred) ** 2, m) for pred in (y_coarse, y_refined))


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(y, I)) per element (paper eq. 8); inputs ``[B, frames, n_mels]``."""
    kl = 0.5 * (logvar.exp() + (mu - y) ** 2 - 1.0 - logvar)
    return masked_mean(kl, frame_mask[..., None])


def flux_loss(mu: torch.Tensor, y: torch.Tensor, frame_mask: torch.Tensor, form: str) -> torch.Tensor:
    """Spectrogram flux (paper eq. 9): rewards mu_t that differs from the previous true frame."""
    diff = (mu[:, 1:] - y[:, :-1]).abs()
    m = frame_mask[:, 1:, None]
    return -masked_mean(diff, m) if form == "paper" else masked_mean(torch.exp(-diff), m)


def stop_loss(stop_logits: torch.Tensor, n_groups: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """BCE on the stop logit per group; the last group of each utterance is the positive."""
    g = torch.arange(stop_logits.shape[1], device=stop_logits.device)[None, :]
    target = (g == (n_groups[:, None] - 1)).float()
    bce = F.binary_cross_entropy_with_logits(stop_logits, target, reduction="none",
                                             pos_weight=torch.tensor(pos_weight, device=stop_logits.device))
    return masked_mean(bce, g < n_groups[:, None])


def _text_attention_grid(attn: torch.Tensor, text_lens: torch.Tensor, n_groups: torch.Tensor):
    """Rows that predict frame groups, columns that hold text: probs, mask, and normalised (n/N - t/T)."""
    length = attn.shape[-1]
    q = torch.arange(length, device=attn.device)[None, :, None]  # query index
    k = torch.arange(length, device=attn.device)[None, None, :]  # key index
    t = q - (text_lens[:, None, None] - 1)  # group predicted by this row
    valid = (t >= 0) & (t < n_groups[:, None, None]) & (k < text_lens[:, None, None])  # [B, L, L]
    offset = k / text_lens[:, None, None] - t / n_groups[:, None, None]
    return valid, offset


def guided_attention_loss(attention: list[torch.Tensor], heads: tuple[int, ...], text_lens: torch.Tensor,
                          n_groups: torch.Tensor, sigma: float) -> torch.Tensor:
    """Attention mass per frame row that sits off the text diagonal, averaged over rows
    (0 = all on the diagonal, at most 1).

    Text keys weigh 1 - exp(-offset^2 / 2 sigma^2); frame keys weigh 1, so a guided head
    cannot dodge the prior by attending to frames instead: it becomes an alignment head.
    """
    losses = []
    for attn in attention:  # [B, H, L, L]
        valid, offset = _text_attention_grid(attn, text_lens, n_groups)
        rows = valid.any(-1)  # [B, L] rows that predict a frame group
        key = torch.arange(attn.shape[-1], device=attn.device)[None, None, :]
        weight = torch.where(valid, 1.0 - torch.exp(-offset ** 2 / (2 * sigma ** 2)),
                             (rows[..., None] & (key >= text_lens[:, None, None])).float())
        for h in heads:
            losses.append(masked_mean((attn[:, h] * weight).sum(-1), rows))
    return torch.stack(losses).mean()


@torch.no_grad()
def head_alignment(attention: list[torch.Tensor], text_lens: torch.Tensor, n_groups: torch.Tensor,
                   band: float = 0.1) -> torch.Tensor:
    """Per layer given and head ``[layers, H]``: the share of each frame row's text attention within
    ``band`` of the diagonal, averaged over rows (1.0 = aligned)."""
    scores = []
    for attn in attention:
        valid, offset = _text_attention_grid(attn, text_lens, n_groups)
        near = valid & (offset.abs() < band)
        text_mass = (attn * valid[:, None]).sum(-1)  # [B, H, L] per row
        near_mass = (attn * near[:, None]).sum(-1)
        rows = (text_mass > 0).float()
        share = torch.where(text_mass > 0, near_mass / text_mass.clamp(min=1e-30), 0.0)
        scores.append((share * rows).sum((0, 2)) / rows.sum((0, 2)).clamp(min=1))
    return torch.stack(scores)


def alignment_score(attention: list[torch.Tensor], text_lens: torch.Tensor, n_groups: torch.Tensor,
                    band: float = 0.1) -> float:
    """Best head's share of text attention within ``band`` of the diagonal (1.0 = aligned)."""
    return float(head_alignment(attention, text_lens, n_groups, band).max()) if attention else 0.0


@dataclass
class LossTerms:
    total: torch.Tensor
    reg: torch.Tensor
    kl: torch.Tensor
    flux: torch.Tensor
    stop: torch.Tensor
    guided: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def melle_loss(out: MelleOutput, y: torch.Tensor, n_frames: torch.Tensor, n_groups: torch.Tensor,
               text_lens: torch.Tensor, step: int, cfg: LossConfig) -> LossTerms:
    """The full objective. ``y [B, G * r, n_mels]`` targets; ``n_frames`` true frame counts."""
    b, frames, n_mels = y.shape
    frame_mask = torch.arange(frames, device=y.device)[None, :] < n_frames[:, None]
    mu = out.mu.reshape(b, frames, n_mels)  # groups -> frames
    logvar = out.logvar.reshape(b, frames, n_mels)
    reg = regression_loss(y, out.y_coarse, out.y_refined, frame_mask)
    kl = kl_loss(mu, logvar, y, frame_mask)
    flux = flux_loss(mu, y, frame_mask, cfg.flux_form)
    stop = stop_loss(out.stop_logits, n_groups, cfg.stop_pos_weight)
    guided = (guided_attention_loss(out.attention, cfg.guided_heads, text_lens, n_groups, cfg.guided_sigma)
              if out.attention and cfg.guided_weight > 0 else torch.zeros((), device=y.device))
    kl_weight = cfg.kl_weight if step >= cfg.kl_start_step else 0.0
    total = reg + kl_weight * kl + cfg.flux_weight * flux + cfg.stop_weight * stop + cfg.guided_weight * guided
    return LossTerms(total, reg, kl, flux, stop, guided)
