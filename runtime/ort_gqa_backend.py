"""ONNX Runtime CPU backend for engines exported with ``--attention gqa``.

The cache is one numpy buffer per layer and K/V, ``[B, n_head, max_len, head_dim]`` (FP32, or INT8
for engines exported with ``--kv-cache int8``), wrapped once
as an ``OrtValue`` over the same memory and bound as both the graph's ``past_*`` input and its
``present_*`` output: GroupQueryAttention then writes each step's K/V into it in place, and
nothing copies the cache, neither the runtime nor ORT. Latent head, post-net and vocoder are
``OrtBackend``'s.

Rows of the buffer need not be in step: ``prefill_row`` fills one row (a view of the same memory)
while the others keep theirs, and ``step_rows`` advances each row at its own position. That is
what continuous batching across requests (``melle_runtime.batching``) is built on.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from melle.core.kv_names import present_of
from melle.core.manifest import EngineError, EngineManifest
from melle_runtime.ort_backend import OrtBackend


class OrtGqaBackend(OrtBackend):
    """``DecoderBackend`` over GroupQueryAttention prefill/step graphs with a cache shared in place."""

    def __init__(self, manifest: EngineManifest, weights: str = "fp32", threads: int | None = None):
        if manifest.attention != "gqa":
            raise EngineError(f"{manifest.directory} holds {manifest.attention} attention graphs, not gqa ones; "
                              "use OrtBackend (--backend ort-cpu picks it)")
        super().__init__(manifest, device="cpu", weights=weights, threads=threads)
        # FP32, or INT8 for an engine exported with --kv-cache int8 (its scales are in the graphs).
        past_type = next(i.type for i in self.sessions["step"].get_inputs() if i.name == self.past_names[0])
        self.cache_dtype = np.int8 if past_type == "tensor(int8)" else np.float32
        self.buffers: list[np.ndarray] = []  # one per name in past_names
        self.bound: list[ort.OrtValue] = []  # the same memory, as ORT sees it

    def start(self, batch: int, max_len: int) -> None:
        self.check_capacity(max_len)
        if not self.buffers or self.buffers[0].shape[0] != batch or self.buffers[0].shape[2] < max_len:
            # No zeroing between utterances: the prefill writes slots [0, L) and a row reads no slot beyond its own.
            shape = (batch, self.cfg.n_head, max_len, self.cfg.head_dim)
            self.buffers = [np.zeros(shape, self.cache_dtype) for _ in self.past_names]
            self.bound = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.buffers]

    def _run(self, session: ort.InferenceSession, feed: dict[str, np.ndarray],
             cache: list[ort.OrtValue] | None = None) -> np.ndarray:
        """Run with the cache (default: every row) bound as past and present; returns e (only e is copied out)."""
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("e")  # first: outputs come back in the order they were bound
        for name, value in zip(self.past_names, self.bound if cache is None else cache):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present_of(name), value)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def prefill(self, text, prompt_frames, prompt_masks):
        return self._run(self.sessions["prefill"],
                         {"text": text, "prompt_frames": prompt_frames, "prompt_masks": prompt_masks})

    def step(self, frames, masks, position):
        return self.step_rows(frames, masks, np.full(frames.shape[0], position, np.int32))

    def rows(self, low: int, high: int) -> list[ort.OrtValue]:
        """Rows ``[low, high)`` of every cache buffer, bound over the same memory (a view, not a copy)."""
        return [ort.OrtValue.ortvalue_from_numpy(buffer[low:high]) for buffer in self.buffers]

    def prefill_row(self, row: int, text, prompt_frames, prompt_masks):
        """Prefill one sequence (batch 1) into row ``row`` of the buffers; the other rows are untouched."""
        return self._run(self.sessions["prefill"],
                         {"text": text, "prompt_frames": prompt_frames, "prompt_masks": prompt_masks},
                         self.rows(row, row + 1))

    def step_rows(self, frames, masks, positions: np.ndarray):
        """Rows ``[0, B)`` each at its own position ``positions[b]`` (the slot its K/V goes to) -> e [B, d]."""
        rows = frames.shape[0]
        cache = None if rows == self.buffers[0].shape[0] else self.rows(0, rows)
        return self._run(self.sessions["step"], {"frames": frames, "prenet_masks": masks,
                                                 "seqlens_k": positions.astype(np.int32),
                                                 "total_length": np.array(positions.max() + 1, np.int32)}, cache)

    def close(self) -> None:
        super().close()
        self.buffers, self.bound = [], []
