"""Reference generation: the shared decode loop driven by the PyTorch model.

The KV cache is preallocated once per call and written in place at an explicit
position (``Melle.decode_cached``); nothing grows by concatenation.
"""

from __future__ import annotations

import numpy as np
import torch

from melle.data import collate
from melle.core.decoding import Decoded, DecodeOptions, decode
from melle.model import KVCache, Melle
from melle.core.noise import Noise


class TorchBackend:
    """``DecoderBackend`` over a ``Melle`` module (eval mode, no grad)."""

    def __init__(self, model: Melle, vocoder: torch.nn.Module | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.capacity = model.cfg.max_len  # the position table
        self.vocoder = vocoder  # a HiFi-GAN generator of the model's mel preset, if vocode() is needed
        self.cache: KVCache | None = None
        self.aligned = bool(model.cfg.guided_heads)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array)).to(self.device)

    def start(self, batch: int, max_len: int) -> None:
        if self.cache is None or self.cache.k[0].shape[1] != batch or self.cache.max_len < max_len:
            self.cache = KVCache(self.cfg, batch, max_len, device=self.device)

    @torch.inference_mode()
    def prefill(self, text, prompt_frames, prompt_masks):
        x = self.model.embed(self._tensor(text), self._tensor(prompt_frames), self._tensor(prompt_masks))
        return self.model.decode_cached(x, self.cache, 0)[:, -1].cpu().numpy()

    @torch.inference_mode()
    def step(self, frames, masks, position):
        x = self.model.embed_step(self._tensor(frames), self._tensor(masks),
                                  torch.tensor([position], device=self.device))
        return self.model.decode_cached(x, self.cache, position)[:, 0].cpu().numpy()

    @torch.inference_mode()
    def step_aligned(self, frames, masks, position, text_bias):
        """``step`` through the exported step's math (``decode_past``): the guided heads' scores get
        ``text_bias`` and their attention over the text comes back."""
        position_t = torch.tensor([position], device=self.device)
        x = self.model.embed_step(self._tensor(frames), self._tensor(masks), position_t)
        bias = torch.zeros(frames.shape[0], position, device=self.device)
        bias[:, : text_bias.shape[1]] = self._tensor(text_bias)
        hidden, new_k, new_v, align = self.model.decode_past(
            x, [k[:position] for k in self.cache.k], [v[:position] for v in self.cache.v], position_t, bias)
        for layer, (k, v) in enumerate(zip(new_k, new_v)):
            self.cache.k[layer][position], self.cache.v[layer][position] = k[0], v[0]
        return hidden[:, 0].cpu().numpy(), align[:, : text_bias.shape[1]].cpu().numpy()

    @torch.inference_mode()
    def latent(self, e, eps):
        return tuple(t.cpu().numpy() for t in self.model.latent(self._tensor(e), self._tensor(eps)))

    @torch.inference_mode()
    def postnet(self, coarse):
        return self.model.refine(self._tensor(coarse)).cpu().numpy()

    @torch.inference_mode()
    def vocode(self, mel):
        """Log-mel ``[1, frames, n_mels]`` -> waveform ``[1, samples]``."""
        if self.vocoder is None:
            raise ValueError("this TorchBackend was made without a vocoder; pass vocoder=load_hifigan(...)[0]")
        return self.vocoder(self._tensor(mel).transpose(1, 2))[:, 0].cpu().numpy()

    def close(self) -> None:
        self.cache = None


class NoCacheTorchBackend(TorchBackend):
    """``DecoderBackend`` that reruns the decoder over the whole prefix every step (no KV cache).

    This is how common open-source VALL-E / MELLE code decodes: the latency benchmark's baseline.
    The latent head and post-net are ``TorchBackend``'s (caching does not touch them).
    """

    def __init__(self, model: Melle):
        super().__init__(model)
        self.model.requires_grad_(False)  # no autograd graph, as under inference_mode
        self.aligned = False  # step_aligned reads the KV cache, which this baseline does not keep
        self.sequence: torch.Tensor | None = None  # embedded inputs so far [B, max_len, d_model]

    def start(self, batch: int, max_len: int) -> None:
        self.sequence = next(self.model.parameters()).new_zeros(batch, max_len, self.cfg.d_model)

    def prefill(self, text, prompt_frames, prompt_masks):
        x = self.model.embed(self._tensor(text), self._tensor(prompt_frames), self._tensor(prompt_masks))
        self.sequence[:, : x.shape[1]] = x
        return self._recompute(x.shape[1])

    def step(self, frames, masks, position):
        self.sequence[:, position] = self.model.embed_step(self._tensor(frames), self._tensor(masks),
                                                           torch.tensor([position], device=self.device))[:, 0]
        return self._recompute(position + 1)

    def _recompute(self, length: int) -> np.ndarray:
        """Final hidden state of the last input, the decoder run over the first ``length`` inputs."""
        return self.model.decode(self.sequence[:, :length])[0][:, -1].cpu().numpy()


def generate(model: Melle, text_ids: list[int], prompt_mel: np.ndarray | None = None,
             options: DecodeOptions = DecodeOptions(), seed: int | None = None,
             noise: Noise | None = None) -> Decoded:
    """Reference TTS: mel for ``text_ids`` (prompt transcript first when prompting).

    Plain TTS: no prompt. Continuation: prompt transcript + target text, and the first
    seconds of the prompt's mel. Cross-sentence: a reference utterance and its
    transcript as the prompt. ``seed`` draws the noise (same seed, same noise as the
    runtime); ``noise`` replays a recorded one. The result carries the noise it used.
    """
    return decode(TorchBackend(model), model.cfg, text_ids, prompt_mel, options, seed=seed, noise=noise)


@torch.inference_mode()
def teacher_forced(model: Melle, text_ids: list[int], mel: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Refined mel ``[frames, n_mels]`` predicted from the true previous frames of ``mel``.

    Each group of r frames comes from the text and the recording's groups before it, with the
    latent mean (eps = 0) and pre-net ``masks [G - 1, 2, prenet_dim]``. A training diagnostic:
    set beside free-running decoding of the same text, it tells what the model has learned
    apart from how far its own outputs make it drift.
    """
    batch = collate([(list(text_ids), mel)], model.cfg)
    groups = batch.frames.shape[1]
    if masks.shape[0] != groups - 1:
        raise ValueError(f"{len(mel)} frames make {groups} groups: need {groups - 1} pre-net masks, got {masks.shape[0]}")
    out = model.eval()(batch.text, batch.text_lens, batch.frames, batch.n_groups,
                       prenet_masks=torch.from_numpy(masks[None]), eps=torch.zeros(1, groups, model.cfg.frame_dim))
    return out.y_refined[0, : len(mel)].numpy()
