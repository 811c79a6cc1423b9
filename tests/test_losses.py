"""Each loss term against a value computed by hand; gradients reach every parameter."""

import math

import numpy as np
import pytest
import torch

from melle.core.config import preset_config
from melle.losses import (LossConfig, alignment_score, head_alignment, flux_loss, guided_attention_loss, kl_loss, melle_loss,
                          regression_loss, stop_loss)
from melle.model import Melle


def test_regression_loss_by_hand():
    y = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])  # second frame is padding
    coarse = torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])
    refined = torch.tensor([[[1.0, 4.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    # y': L1 0.5 + L2 0.5; y'': L1 1.0 + L2 2.0
    assert regression_loss(y, coarse, refined, mask).item() == pytest.approx(4.0)


def test_kl_loss_by_hand():
    mu, logvar, y = torch.zeros(1, 1, 2), torch.tensor([[[0.0, math.log(4.0)]]]), torch.tensor([[[1.0, 0.0]]])
    # element 0: 0.5 * (1 + 1 - 1 - 0) = 0.5; element 1: 0.5 * (4 + 0 - 1 - ln 4)
    expected = (0.5 + 0.5 * (3 - math.log(4.0))) / 2
    assert kl_loss(mu, logvar, y, torch.tensor([[True]])).item() == pytest.approx(expected)


def test_flux_loss_both_forms_by_hand():
    mu = torch.tensor([[[0.0], [3.0], [5.0]]])
    y = torch.tensor([[[1.0], [1.0], [1.0]]])
    mask = torch.tensor([[True, True, False]])  # only mu_1 vs y_0 counts
    assert flux_loss(mu, y, mask, "paper").item() == pytest.approx(-2.0)
    assert flux_loss(mu, y, mask, "bounded").item() == pytest.approx(math.exp(-2.0))


def test_stop_loss_by_hand():
    logits = torch.zeros(1, 3)
    n_groups = torch.tensor([2])  # group 1 is the positive, group 2 padding
    expected = (math.log(2) + 100 * math.log(2)) / 2
    assert stop_loss(logits, n_groups, 100.0).item() == pytest.approx(expected)


def test_guided_attention_and_alignment_score_by_hand():
    text_lens, n_groups = torch.tensor([2]), torch.tensor([2])
    diagonal = torch.zeros(1, 1, 3, 3)
    diagonal[0, 0, 1, 0] = diagonal[0, 0, 2, 1] = 1.0
    anti = torch.zeros(1, 1, 3, 3)
    anti[0, 0, 1, 1] = anti[0, 0, 2, 0] = 1.0
    w = 1 - math.exp(-0.25 / (2 * 0.2 ** 2))  # offset 0.5 at sigma 0.2
    assert guided_attention_loss([diagonal], (0,), text_lens, n_groups, 0.2).item() == pytest.approx(0.0)
    assert guided_attention_loss([anti], (0,), text_lens, n_groups, 0.2).item() == pytest.approx(w)
    on_frames = torch.zeros(1, 1, 3, 3)
    on_frames[0, 0, 1, 0] = on_frames[0, 0, 2, 2] = 1.0  # row 2 attends to a frame key: fully penalised
    assert guided_attention_loss([on_frames], (0,), text_lens, n_groups, 0.2).item() == pytest.approx(0.5)
    assert alignment_score([diagonal], text_lens, n_groups) == pytest.approx(1.0)
    assert alignment_score([anti], text_lens, n_groups) == pytest.approx(0.0)
    # Per head: layers given x heads; a head with no text attention at all scores 0, not NaN.
    layer = torch.cat([diagonal, anti, torch.zeros(1, 1, 3, 3)], dim=1)  # [1, 3 heads, 3, 3]
    per_head = head_alignment([layer, layer.flip(1)], text_lens, n_groups)
    assert per_head.shape == (2, 3)
    np.testing.assert_allclose(per_head.numpy(), [[1, 0, 0], [0, 0, 1]], atol=1e-6)


def test_kl_weight_schedule():
    cfg = LossConfig(kl_start_step=10)
    torch.manual_seed(0)
    model = Melle(preset_config("tiny", r=2, n_text_vocab=20))
    text, lens = torch.randint(2, 20, (2, 5)), torch.tensor([5, 3])
    frames = torch.randn(2, 4, model.cfg.frame_dim)
    mel = frames.reshape(2, 8, -1)
    out = model(text, lens, frames, torch.tensor([4, 3]))
    before = melle_loss(out, mel, torch.tensor([8, 5]), torch.tensor([4, 3]), lens, 9, cfg)
    after = melle_loss(out, mel, torch.tensor([8, 5]), torch.tensor([4, 3]), lens, 10, cfg)
    # Compared as sums, not as a difference of float32 totals (cancellation leaves ~1e-6 of noise).
    assert after.total.item() == pytest.approx(before.total.item() + 0.1 * before.kl.item(), rel=1e-6)
    assert before.total.item() != pytest.approx(after.total.item(), rel=1e-4), "the KL term must switch on"


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_gradients_reach_every_parameter(bf16):
    torch.manual_seed(0)
    model = Melle(preset_config("tiny", r=2, n_text_vocab=20, positions="learned"))
    text = torch.arange(2, 20).reshape(2, 9)  # every token id is used
    lens = torch.tensor([9, 6])
    frames = torch.randn(2, 6, model.cfg.frame_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(text, lens, frames, torch.tensor([6, 4]), attention_layers=(0,))
    terms = melle_loss(out, frames.reshape(2, 12, -1), torch.tensor([12, 7]), torch.tensor([6, 4]), lens,
                       step=20_000, cfg=LossConfig(guided_weight=1.0, guided_layers=(0,)))
    terms.total.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_bf16_autocast_keeps_heads_fp32_and_close_to_fp32():
    torch.manual_seed(0)
    model = Melle(preset_config("tiny", r=2, n_text_vocab=20)).eval()
    text, lens, groups = torch.randint(2, 20, (2, 7)), torch.tensor([7, 5]), torch.tensor([6, 4])
    frames = torch.randn(2, 6, model.cfg.frame_dim)
    masks = model.prenet.sample_masks((2, 5), torch.device("cpu"))
    eps = torch.randn(2, 6, model.cfg.frame_dim)
    with torch.no_grad():
        full = model(text, lens, frames, groups, masks, eps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(text, lens, frames, groups, masks, eps)
    for name in ("mu", "logvar", "y_coarse", "y_refined", "stop_logits"):
        a, b = getattr(full, name), getattr(mixed, name)
        assert b.dtype == torch.float32, f"{name} must stay FP32 under autocast"
        assert (a - b).abs().max() < 0.05 * a.abs().max(), name
