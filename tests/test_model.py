"""The reference model: cached decoding equals the full forward, noise is the only randomness."""

import numpy as np
import pytest
import torch

from melle.core.config import preset_config
from melle.core.decoding import DecodeOptions
from melle.generate import TorchBackend, generate, teacher_forced
from melle.model import KVCache, Melle, count_parameters
from melle.core.noise import N_PRENET_DROPOUTS, Noise


def tiny_model(r: int, seed: int = 0) -> Melle:
    torch.manual_seed(seed)
    return Melle(preset_config("tiny", r=r, n_text_vocab=40)).eval()


def teacher_forced_inputs(model: Melle, batch: int, n_text: int, n_groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    text = torch.randint(2, cfg.n_text_vocab, (batch, n_text), generator=g)
    frames = torch.randn(batch, n_groups, cfg.frame_dim, generator=g)
    masks = (torch.rand(batch, n_groups, N_PRENET_DROPOUTS, cfg.prenet_dim, generator=g) > 0.5).float() * 2
    eps = torch.randn(batch, n_groups, cfg.frame_dim, generator=g)
    return text, frames, masks, eps


def test_presets_sizes():
    assert count_parameters(Melle(preset_config("tiny", n_text_vocab=40))) < 1_000_000
    assert 5e6 <= count_parameters(Melle(preset_config("small", n_text_vocab=60))) <= 20e6


@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_prompt", [0, 5])
@torch.inference_mode()
def test_cached_steps_match_full_forward(r, batch, n_prompt):
    model = tiny_model(r)
    n_text, n_groups = 7, 12
    text, frames, masks, eps = teacher_forced_inputs(model, batch, n_text, n_groups)
    lens = torch.full((batch,), n_text)
    full = model(text, lens, frames, torch.full((batch,), n_groups), prenet_masks=masks[:, : n_groups - 1], eps=eps)

    # Prefill text + the first n_prompt groups, then one step per remaining group.
    cache = KVCache(model.cfg, batch, 64)
    x = model.embed(text, frames[:, :n_prompt], masks[:, :n_prompt])
    e = model.decode_cached(x, cache, 0)[:, -1]
    mus, stops = [], []
    for g in range(n_prompt, n_groups):
        mu, _, _, stop = model.latent(e, eps[:, g])
        mus.append(mu)
        stops.append(stop)
        if g + 1 < n_groups:
            pos = torch.tensor([n_text + g])
            e = model.decode_cached(model.embed_step(frames[:, g], masks[:, g], pos), cache, n_text + g)[:, 0]
    torch.testing.assert_close(torch.stack(mus, 1), full.mu[:, n_prompt:], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(stops, 1), full.stop_logits[:, n_prompt:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("whole_buffer", [False, True])
@torch.inference_mode()
def test_read_only_past_step_matches_cached_step(whole_buffer):
    """The export step (cache read-only, new K/V returned) equals the in-place cached step."""
    model = tiny_model(r=2)
    text, frames, masks, _ = teacher_forced_inputs(model, 2, 6, 4)
    cache = KVCache(model.cfg, 2, 32)
    model.decode_cached(model.embed(text, frames[:, :2], masks[:, :2]), cache, 0)
    position = 8  # 6 text + 2 prompt groups
    past_len = cache.max_len if whole_buffer else position
    if whole_buffer:  # garbage beyond the position must be masked, not read
        for k in cache.k:
            k[position:] = 1e3
    x = model.embed_step(frames[:, 2], masks[:, 2], torch.tensor([position]))
    e_past, new_k, _, _ = model.decode_past(x, [k[:past_len] for k in cache.k], [v[:past_len] for v in cache.v],
                                         torch.tensor(position))
    for k in cache.k:
        k[position:] = 0
    e_cached = model.decode_cached(x, cache, position)
    torch.testing.assert_close(e_past, e_cached, atol=1e-5, rtol=0)
    torch.testing.assert_close(new_k[0][0], cache.k[0][position], atol=1e-6, rtol=0)


def test_same_seed_same_generation_and_noise_replay():
    model = tiny_model(r=2)
    options = DecodeOptions(max_steps=15, stop_enabled=False, candidates=2)
    prompt = np.random.default_rng(0).standard_normal((9, model.cfg.n_mels)).astype(np.float32)
    a = generate(model, [3, 4, 5], prompt, options, seed=7)
    b = generate(model, [3, 4, 5], prompt, options, seed=7)
    c = generate(model, [3, 4, 5], prompt, options, seed=8)
    replay = generate(model, [3, 4, 5], prompt, options, noise=a.noise)
    np.testing.assert_array_equal(a.mels[0], b.mels[0])
    np.testing.assert_array_equal(a.mels[1], replay.mels[1])
    assert a.mels[0].shape == (15 * 2, model.cfg.n_mels)
    assert np.abs(a.mels[0] - c.mels[0]).max() > 1e-2
    assert np.abs(a.mels[0] - a.mels[1]).max() > 1e-2, "candidates must get different noise"


@pytest.mark.parametrize("r", [1, 4])
def test_teacher_forced_on_its_own_output_reproduces_free_running(r):
    # Free-running with eps = 0, then fed its own coarse frames with the same masks: the two
    # passes see identical inputs, so any gap is a bug in how teacher_forced builds them.
    model = tiny_model(r=r)
    options = DecodeOptions(max_steps=12, stop_enabled=False)
    sampled = generate(model, [3, 4, 5, 6], options=options, seed=3)
    noise = Noise(sampled.noise.prompt_masks, sampled.noise.step_masks,
                  [np.zeros_like(e) for e in sampled.noise.step_eps])
    free = generate(model, [3, 4, 5, 6], options=options, noise=noise)
    masks = np.stack(noise.step_masks[:-1], axis=1)[0]
    forced = teacher_forced(model, [3, 4, 5, 6], free.coarse[0], masks)
    np.testing.assert_allclose(forced, free.mel, atol=1e-5)
    with pytest.raises(ValueError, match="need 11 pre-net masks, got 12"):
        teacher_forced(model, [3, 4, 5, 6], free.coarse[0], np.stack(noise.step_masks, axis=1)[0])


def test_stop_head_ends_generation():
    model = tiny_model(r=1)
    with torch.no_grad():  # the stop head always fires: decoding must end exactly at min_steps
        model.latent.stop.weight.zero_()
        model.latent.stop.bias.fill_(30.0)
    result = generate(model, [3, 4], options=DecodeOptions(max_steps=50, min_steps=4), seed=0)
    assert result.n_groups == [4] and result.stopped == [True]
    assert result.mel.shape == (4, model.cfg.n_mels)


def test_backend_reuses_its_cache_between_calls():
    backend = TorchBackend(tiny_model(r=1))
    backend.start(2, 40)
    first = backend.cache
    backend.start(2, 30)
    assert backend.cache is first
    backend.start(3, 30)
    assert backend.cache is not first


def test_non_finite_output_is_an_error_not_silent_audio():
    model = tiny_model(r=1)
    with torch.no_grad():
        model.latent.to_stats.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf at step 0"):
        generate(model, [3, 4], options=DecodeOptions(max_steps=5), seed=0)
