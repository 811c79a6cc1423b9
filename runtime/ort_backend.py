"""ONNX Runtime backend: the ``DecoderBackend`` of ``melle.core.decoding`` over the exported graphs.

The KV cache is one preallocated host array per layer, ``[max_len, B, H, D]``
(time-major, so the filled prefix ``cache[:pos]`` is a contiguous view handed to ORT
without a copy). Each step returns only the new K/V slice, written in place at its
position. ``kv_mode="full"`` hands the whole buffer instead (the fixed-shape mode that
TensorRT and CUDA graphs need); the step graph masks the unwritten tail either way.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from melle.core.alignment import ALIGN_ATTENTION, ALIGN_BIAS
from melle.core.kv_names import is_past, present_of
from melle.core.manifest import EngineError, EngineManifest, step_graph_name

KV_MODES = ("prefix", "full")


def available_providers(device: str) -> list[str]:
    """ORT providers for ``cpu`` or ``cuda``; a clear error when CUDA is not available."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EngineError("backend ort-cuda needs onnxruntime-gpu and an NVIDIA GPU; this onnxruntime offers "
                          f"{ort.get_available_providers()} (pip install 'melle-rt[gpu]'; if onnxruntime is installed "
                          "too, pip uninstall onnxruntime and reinstall onnxruntime-gpu: they share a module; "
                          "or use ort-cpu)")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def make_session(path, providers: list[str], threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The decode loop alternates between sessions; threads left spinning by one steal the
    # cores from the next (paper step inside the loop on 2 cores: 40 ms spinning, 25 ms not).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


class OrtBackend:
    """Drives prefill / decoder_step / latent_head / postnet (and vocoder) sessions with a preallocated cache."""

    def __init__(self, manifest: EngineManifest, device: str = "cpu", weights: str = "fp32", kv_mode: str = "prefix",
                 threads: int | None = None):
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        self.providers, self.threads = available_providers(device), threads
        self.manifest = manifest
        self.cfg = manifest.config
        self.capacity = manifest.max_len
        self.kv_mode = kv_mode
        self.sessions = {name: make_session(manifest.graph_path(graph), self.providers, threads)
                         for name, graph in [("prefill", "prefill"), ("step", step_graph_name(weights)),
                                             ("latent", "latent_head"), ("postnet", "postnet")]}
        self.vocoder: ort.InferenceSession | None = None  # made on first use: not every caller vocodes
        # The cache follows the step graph's own signature; outputs are asked for by name, in its order.
        self.past_names = [i.name for i in self.sessions["step"].get_inputs() if is_past(i.name)]
        self.outputs = ["e", *map(present_of, self.past_names)]  # of the prefill and the step
        # A step graph of a model with guided heads takes their bias and returns their attention.
        self.aligned = any(i.name == ALIGN_BIAS for i in self.sessions["step"].get_inputs())
        self.cache: list[np.ndarray] = []  # one buffer per name in past_names

    def check_capacity(self, max_len: int) -> None:
        if max_len > self.capacity:
            raise EngineError(f"this utterance needs {max_len} positions; the engine was exported for "
                              f"{self.capacity} (--max-len): shorten the text or re-export")

    def start(self, batch: int, max_len: int) -> None:
        self.check_capacity(max_len)
        length = self.capacity if self.kv_mode == "full" else max_len
        if not self.cache or self.cache[0].shape[1] != batch or self.cache[0].shape[0] < length:
            shape = (length, batch, self.cfg.n_head, self.cfg.head_dim)
            self.cache = [np.zeros(shape, np.float32) for _ in self.past_names]

    def prefill(self, text, prompt_frames, prompt_masks):
        e, *present = self.sessions["prefill"].run(
            self.outputs, {"text": text, "prompt_frames": prompt_frames, "prompt_masks": prompt_masks})
        for buffer, new in zip(self.cache, present):
            buffer[: new.shape[0]] = new
        return e

    def step_feed(self, frames, masks, position, text_bias=None) -> dict[str, np.ndarray]:
        """The step graph's inputs at ``position``: the cache as views, not copies; the guided
        heads' bias (if the graph takes one) is ``text_bias`` over the text and 0 elsewhere."""
        visible = self.cache[0].shape[0] if self.kv_mode == "full" else position
        feed = {"frames": frames, "prenet_masks": masks, "position": np.array([position], np.int64)}
        feed.update((name, buffer[:visible]) for name, buffer in zip(self.past_names, self.cache))
        if self.aligned:
            feed[ALIGN_BIAS] = np.zeros((frames.shape[0], visible), np.float32)
            if text_bias is not None:
                feed[ALIGN_BIAS][:, : text_bias.shape[1]] = text_bias
        return feed

    def step(self, frames, masks, position):
        return self._step(frames, masks, position)[0]

    def step_aligned(self, frames, masks, position, text_bias):
        e, align = self._step(frames, masks, position, text_bias)
        return e, align[:, : text_bias.shape[1]]

    def _step(self, frames, masks, position, text_bias=None):
        """Run the step and write its K/V at ``position``; returns e and the guided heads' attention
        (None for a graph without them)."""
        names = self.outputs + [ALIGN_ATTENTION] * self.aligned
        e, *present = self.sessions["step"].run(names, self.step_feed(frames, masks, position, text_bias))
        align = present.pop() if self.aligned else None
        for buffer, new in zip(self.cache, present):
            buffer[position] = new[0]
        return e, align

    def latent(self, e, eps):
        mu, logvar, y, stop = self.sessions["latent"].run(None, {"e": e, "eps": eps})
        return mu, logvar, y, stop

    def postnet(self, coarse):
        return self.sessions["postnet"].run(None, {"coarse": coarse})[0]

    def vocode(self, mel):
        if self.vocoder is None:
            self.vocoder = make_session(self.manifest.graph_path("vocoder"), self.providers, self.threads)
        return self.vocoder.run(None, {"mel": mel})[0]

    def close(self) -> None:
        """Release the sessions and the cache (ORT frees them with the last reference)."""
        self.sessions, self.vocoder, self.cache = {}, None, []
