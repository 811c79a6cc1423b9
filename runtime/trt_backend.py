"""TensorRT backend: the ``DecoderBackend`` of ``melle.core.decoding`` over engines built by export/to_trt.py.

NOT VALIDATED ON A GPU. Written against the TensorRT 10 Python API and cuda-python on a
machine without either; the CPU tests check imports, error messages and the manifest
checks, the ``gpu``-marked tests in tests/test_trt.py check the rest where a GPU exists.

How a decode runs on the device (one CUDA stream, one execution context per engine):

- Device memory is allocated once. The KV cache is one allocation holding each layer's
  ``[max_len, B, n_head, head_dim]`` tensor back to back (key_0, value_0, key_1, ...),
  zeroed once (the step masks unwritten slots, but 0 * NaN from stale garbage would not be
  masked). The prefill writes its K/V straight into the cache: time-major, so a prefix is
  the start of each layer. The cache never leaves the GPU.
- The decoder step sees the whole fixed-shape cache and a position in device memory, so
  its enqueue is captured once per batch size in a CUDA graph and replayed every step.
  Its new K/V slices land in a scratch block and one ``cudaMemcpy2DAsync`` (device to
  device) scatters all layers' slices into the cache at the position offset.
- Host data crosses in single copies through pinned staging blocks: the step's position,
  frames and pre-net masks (and, for a model with guided heads, their bias over the cache)
  in one upload and e in one readback (a guided decode reads back the heads' attention too); the latent head's e and
  noise eps in one upload, mu, logvar, y' and the stop logits in one readback. Further
  options: keep frames on the device and read stop logits back every K steps (chunked),
  or capture K steps with the stop check on the device (DESIGN.md "Lessons from peers").
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from melle.core.alignment import ALIGN_ATTENTION, ALIGN_BIAS
from melle.core.kv_names import is_past, present_of
from melle.core.manifest import EngineError, EngineManifest, TrtBuild, sha256_of

ALIGN = 256  # bytes; TensorRT I/O addresses must be aligned, 256 suits every tensor type
REBUILD = "rebuild them on this machine with `python export/to_trt.py {directory}`"
ENGINES = ("prefill", "decoder_step", "latent_head", "postnet")
INT64_TENSORS = ("text", "position")


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        from cuda import cudart
    return cudart


def require_gpu():
    """``(tensorrt, cudart, device)`` where device holds the GPU name and compute capability.

    Raises one ``EngineError`` saying what is missing: TensorRT, cuda-python or a CUDA device.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        raise EngineError("TensorRT is not installed (pip install tensorrt-cu12)") from None
    try:
        cudart = _import_cudart()
    except (ImportError, OSError):
        raise EngineError("cuda-python is not installed (pip install cuda-python)") from None
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess and count > 0:
        err, prop = cudart.cudaGetDeviceProperties(0)  # device 0: pick a GPU with CUDA_VISIBLE_DEVICES
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise EngineError("no CUDA device found (TensorRT needs an NVIDIA GPU and its driver)")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    device = {"gpu": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}
    return trt, cudart, device


def check_build(manifest: EngineManifest, tensorrt_version: str, device: dict) -> TrtBuild:
    """The manifest's ``trt`` entry, once it matches this GPU and TensorRT and its files are intact."""
    directory = manifest.directory
    rebuild = REBUILD.format(directory=directory)
    entry = manifest.trt
    if entry is None:
        raise EngineError(f"{directory} has no TensorRT engines: {rebuild}")
    built = (entry.gpu, entry.compute_capability, entry.tensorrt)
    here = (device["gpu"], device["compute_capability"], tensorrt_version)
    if built != here:
        raise EngineError(f"the TensorRT engines in {directory} were built for {built[0]} (compute capability "
                          f"{built[1]}) with TensorRT {built[2]}; this machine has {here[0]} (compute capability "
                          f"{here[1]}) with TensorRT {here[2]}: {rebuild}")
    missing = [name for name in ENGINES if name not in entry.engines]
    if missing:
        raise EngineError(f"{directory} has no TensorRT engine for {missing}: {rebuild}")
    for name, engine in entry.engines.items():
        plan = directory / engine.file
        if not plan.exists() or sha256_of(plan) != engine.sha256:
            raise EngineError(f"{plan} is missing or does not match its sha256: {rebuild}")
        if name not in manifest.graphs or manifest.graphs[name].sha256 != engine.onnx_sha256:
            raise EngineError(f"{plan} was built from another export of {name}.onnx: {rebuild}")
    return entry


def _align(nbytes: int) -> int:
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


class _Cuda:
    """The cuda-python runtime calls used here, with errors raised as ``EngineError``."""

    def __init__(self, cudart):
        self.rt = cudart
        self.stream = self(cudart.cudaStreamCreate())

    def __call__(self, result):
        err, *values = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA error {self.rt.cudaGetErrorName(err)[1].decode()}")
        return values[0] if values else None

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        kinds = {"h2d": self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                 "d2h": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost}
        self(self.rt.cudaMemcpyAsync(dst, src, nbytes, kinds[kind], self.stream))

    def sync(self) -> None:
        self(self.rt.cudaStreamSynchronize(self.stream))


class _Block:
    """Named regions of one device allocation and its pinned host twin.

    Regions are laid out in the order given, so moving a run of neighbours is one copy.
    """

    def __init__(self, cuda: _Cuda, sizes: dict[str, int]):
        self.cuda, self.sizes, self.offsets = cuda, dict(sizes), {}
        total = 0
        for name, nbytes in sizes.items():
            self.offsets[name] = total
            total += _align(nbytes)
        self.nbytes = total
        self.device = cuda(cuda.rt.cudaMalloc(total))
        self.host_ptr = cuda(cuda.rt.cudaMallocHost(total))
        self.host = np.ctypeslib.as_array(ctypes.cast(self.host_ptr, ctypes.POINTER(ctypes.c_uint8)), (total,))

    def fits(self, sizes: dict[str, int]) -> bool:
        return list(sizes) == list(self.sizes) and all(n <= self.sizes[k] for k, n in sizes.items())

    def ptr(self, name: str) -> int:
        return self.device + self.offsets[name]

    def _span(self, nbytes: dict[str, int]) -> tuple[int, int]:
        start = min(self.offsets[n] for n in nbytes)
        return start, max(self.offsets[n] + size for n, size in nbytes.items()) - start

    def upload(self, arrays: dict[str, np.ndarray]) -> None:
        """Stage ``arrays`` in their regions and enqueue one host-to-device copy covering them."""
        for name, array in arrays.items():
            raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
            if raw.size > self.sizes[name]:
                raise EngineError(f"{name} of shape {array.shape} exceeds its device buffer")
            self.host[self.offsets[name]:self.offsets[name] + raw.size] = raw
        start, nbytes = self._span({name: array.nbytes for name, array in arrays.items()})
        self.cuda.copy(self.device + start, self.host_ptr + start, nbytes, "h2d")

    def download(self, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
        """One device-to-host copy covering ``shapes`` (float32 regions), then the arrays."""
        start, nbytes = self._span({name: 4 * int(np.prod(shape)) for name, shape in shapes.items()})
        self.cuda.copy(self.host_ptr + start, self.device + start, nbytes, "d2h")
        self.cuda.sync()
        out = {}
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            raw = self.host[self.offsets[name]:self.offsets[name] + 4 * count]
            out[name] = raw.view(np.float32).reshape(shape).copy()
        return out

    def free(self) -> None:
        self.cuda(self.cuda.rt.cudaFree(self.device))
        self.cuda(self.cuda.rt.cudaFreeHost(self.host_ptr))


class _Engine:
    """One deserialised engine with its execution context."""

    def __init__(self, trt, runtime, path: Path):
        self.name = path.stem
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {path}; rebuild it with export/to_trt.py")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        for name in names:
            want = np.int64 if name in INT64_TENSORS else np.float32
            if trt.nptype(self.engine.get_tensor_dtype(name)) != want:
                raise EngineError(f"{path}: tensor {name} is {self.engine.get_tensor_dtype(name)}, expected "
                                  f"{np.dtype(want).name}; rebuild it with export/to_trt.py")

    def set_shapes(self, shapes: dict[str, tuple]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise EngineError(f"{self.name}: input {name} of shape {tuple(shape)} is outside the engine's "
                                  "optimisation profile (manifest.json, trt.engines.*.profile); rebuild with "
                                  "export/to_trt.py --batch-max / --max-len / --max-prompt-seconds to cover it")

    def bind(self, shapes: dict[str, tuple], addresses: dict[str, int]) -> None:
        """Set input shapes and every I/O address (all must be given)."""
        missing = set(self.inputs + self.outputs) - set(addresses)
        if missing:
            raise EngineError(f"{self.name}: no address for {sorted(missing)}")
        self.set_shapes(shapes)
        for name, ptr in addresses.items():
            if not self.context.set_tensor_address(name, ptr):
                raise EngineError(f"{self.name}: TensorRT refused the device address of {name} (not an I/O "
                                  "tensor of this engine, or misaligned); rebuild it with export/to_trt.py")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))

    def enqueue(self, stream) -> None:
        if not self.context.execute_async_v3(int(stream)):
            raise EngineError(f"TensorRT failed to run {self.name}")


class TrtBackend:
    """Drives the prefill / decoder_step / latent_head / postnet engines with a device-resident cache.

    ``cuda_graph=False`` enqueues the step engine directly every step (for comparison).
    """

    def __init__(self, manifest: EngineManifest, cuda_graph: bool = True):
        trt, cudart, device = require_gpu()
        entry = check_build(manifest, trt.__version__, device)
        self.cfg = manifest.config
        self.capacity, self.batch_max = entry.max_len, entry.batch_max
        self.use_graph = cuda_graph
        if (4 * self.cfg.d_model) % ALIGN:
            raise EngineError(f"d_model {self.cfg.d_model} is not a multiple of {ALIGN // 4}: the cache's "
                              "per-position slices would be misaligned for TensorRT")
        self.cuda = _Cuda(cudart)
        # The logger and runtime must outlive the engines deserialised from them.
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {name: _Engine(trt, self.runtime, manifest.directory / e.file)
                        for name, e in entry.engines.items()}
        cfg, b = self.cfg, self.batch_max
        # The cache holds one layer per cache input of the step engine, in its order.
        self.past_names = [name for name in self.engines["decoder_step"].inputs if is_past(name)]
        # A model with guided heads: the step takes their bias over the cache and returns their attention.
        self.aligned = ALIGN_BIAS in self.engines["decoder_step"].inputs
        guided = {ALIGN_BIAS: 4 * b * self.capacity, ALIGN_ATTENTION: 4 * b * self.capacity} if self.aligned else {}
        self.step_io = _Block(self.cuda, {"position": 8, "frames": 4 * b * cfg.frame_dim,
                                          "prenet_masks": 4 * b * 2 * cfg.prenet_dim, **guided})
        self.latent_io = _Block(self.cuda, {"e": 4 * b * cfg.d_model, "eps": 4 * b * cfg.frame_dim,
                                            "mu": 4 * b * cfg.frame_dim, "logvar": 4 * b * cfg.frame_dim,
                                            "y_coarse": 4 * b * cfg.frame_dim, "stop_logit": 4 * b})
        self.scratch = self.cuda(cudart.cudaMalloc(len(self.past_names) * self._slice_bytes(b)))
        self.kv: int | None = None  # the cache, allocated by start() for its batch size
        self.batch = 0
        self.graph = None  # (cudaGraph_t, cudaGraphExec_t) of the step at self.batch
        self.blocks: dict[str, _Block] = {}  # grow-only I/O of prefill, postnet and vocoder
        self.latent_batch = 0  # batch the latent head's shapes are set for

    # -- sizes and addresses --

    def _slice_bytes(self, batch: int) -> int:
        return 4 * batch * self.cfg.n_head * self.cfg.head_dim  # one position of one layer

    def _layer_bytes(self) -> int:
        return self.capacity * self._slice_bytes(self.batch)

    def _layer(self, i: int) -> int:
        return self.kv + i * self._layer_bytes()

    def _grow(self, name: str, sizes: dict[str, int]) -> _Block:
        block = self.blocks.get(name)
        if block is None or not block.fits(sizes):
            if block is not None:
                block.free()
            block = self.blocks[name] = _Block(self.cuda, {k: 2 * n for k, n in sizes.items()})
        return block

    # -- DecoderBackend --

    def start(self, batch: int, max_len: int) -> None:
        if max_len > self.capacity:
            raise EngineError(f"this utterance needs {max_len} positions; the engines were built for "
                              f"{self.capacity} (export/to_trt.py --max-len): shorten the text or rebuild")
        if batch > self.batch_max:
            raise EngineError(f"{batch} candidates exceed the engines' batch of {self.batch_max} "
                              "(export/to_trt.py --batch-max)")
        if batch == self.batch:
            return
        self._release_cache()
        self.batch = batch
        rt = self.cuda.rt
        nbytes = len(self.past_names) * self._layer_bytes()
        self.kv = self.cuda(rt.cudaMalloc(nbytes))
        self.cuda(rt.cudaMemsetAsync(self.kv, 0, nbytes, self.cuda.stream))
        cfg, kv_shape = self.cfg, (self.capacity, batch, self.cfg.n_head, self.cfg.head_dim)
        shapes = {"frames": (batch, cfg.frame_dim), "prenet_masks": (batch, 2, cfg.prenet_dim), "position": (1,),
                  **{name: kv_shape for name in self.past_names},
                  **({ALIGN_BIAS: (batch, self.capacity)} if self.aligned else {})}
        addresses = {name: self.step_io.ptr(name) for name in self.step_io.offsets}
        addresses["e"] = self.latent_io.ptr("e")
        for i, name in enumerate(self.past_names):
            addresses[name] = self._layer(i)
            addresses[present_of(name)] = self.scratch + i * self._slice_bytes(batch)
        self.engines["decoder_step"].bind(shapes, addresses)

    def prefill(self, text, prompt_frames, prompt_masks):
        batch, length = text.shape[0], text.shape[1] + prompt_frames.shape[1]
        if batch != self.batch or length > self.capacity:
            raise EngineError(f"prefill of {batch} x {length} positions does not fit the cache started "
                              f"for {self.batch} x {self.capacity}: call start() first")
        arrays = {"text": text.astype(np.int64), "prompt_frames": prompt_frames.astype(np.float32),
                  "prompt_masks": prompt_masks.astype(np.float32)}
        block = self._grow("prefill", {k: a.nbytes for k, a in arrays.items()})
        block.upload(arrays)
        addresses = {name: block.ptr(name) for name in arrays}
        addresses["e"] = self.latent_io.ptr("e")
        addresses.update((present_of(name), self._layer(i)) for i, name in enumerate(self.past_names))
        engine = self.engines["prefill"]
        engine.bind({k: a.shape for k, a in arrays.items()}, addresses)
        engine.enqueue(self.cuda.stream)
        return self.latent_io.download({"e": (batch, self.cfg.d_model)})["e"]

    def step(self, frames, masks, position):
        return self._step(frames, masks, position)

    def step_aligned(self, frames, masks, position, text_bias):
        e = self._step(frames, masks, position, text_bias)
        attention = self.step_io.download({ALIGN_ATTENTION: (self.batch, self.capacity)})[ALIGN_ATTENTION]
        return e, attention[:, : text_bias.shape[1]]

    def _step(self, frames, masks, position, text_bias=None):
        """One step with the guided heads' bias (when the engine takes one) ``text_bias`` over the
        text and 0 elsewhere; returns e, with the step's attention left on the device."""
        if frames.shape[0] != self.batch:
            raise EngineError(f"step of batch {frames.shape[0]} on a cache started for {self.batch}")
        arrays = {"position": np.array([position], np.int64), "frames": frames.astype(np.float32),
                  "prenet_masks": masks.astype(np.float32)}
        if self.aligned:
            arrays[ALIGN_BIAS] = np.zeros((self.batch, self.capacity), np.float32)
            if text_bias is not None:
                arrays[ALIGN_BIAS][:, : text_bias.shape[1]] = text_bias
        self.step_io.upload(arrays)
        if self.use_graph:
            if self.graph is None:
                self.graph = self._capture()
            self.cuda(self.cuda.rt.cudaGraphLaunch(self.graph[1], self.cuda.stream))
        else:
            self.engines["decoder_step"].enqueue(self.cuda.stream)
        self._scatter(position)
        return self.latent_io.download({"e": (self.batch, self.cfg.d_model)})["e"]

    def latent(self, e, eps):
        batch = e.shape[0]
        engine = self.engines["latent_head"]
        if batch != self.latent_batch:
            engine.bind({"e": e.shape, "eps": eps.shape}, {n: self.latent_io.ptr(n) for n in self.latent_io.offsets})
            self.latent_batch = batch
        self.latent_io.upload({"e": e.astype(np.float32), "eps": eps.astype(np.float32)})
        engine.enqueue(self.cuda.stream)
        fd = self.cfg.frame_dim
        out = self.latent_io.download({"mu": (batch, fd), "logvar": (batch, fd), "y_coarse": (batch, fd),
                                       "stop_logit": (batch,)})
        return out["mu"], out["logvar"], out["y_coarse"], out["stop_logit"]

    def postnet(self, coarse):
        return self._run("postnet", "coarse", coarse, "refined")

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """mel ``[B, frames, n_mels]`` -> waveform ``[B, samples]`` on the vocoder engine."""
        if "vocoder" not in self.engines:
            raise EngineError("no vocoder engine: export with a vocoder and rebuild with export/to_trt.py")
        return self._run("vocoder", "mel", mel, "wav")

    # -- internals --

    def _run(self, name: str, input_name: str, array: np.ndarray, output_name: str) -> np.ndarray:
        """One dynamic-shape engine call (post-net, vocoder): upload, run, read back."""
        engine = self.engines[name]
        array = array.astype(np.float32)
        engine.set_shapes({input_name: array.shape})
        out_shape = engine.shape(output_name)
        block = self._grow(name, {input_name: array.nbytes, output_name: 4 * int(np.prod(out_shape))})
        engine.bind({input_name: array.shape}, {input_name: block.ptr(input_name),
                                                output_name: block.ptr(output_name)})
        block.upload({input_name: array})
        engine.enqueue(self.cuda.stream)
        return block.download({output_name: out_shape})[output_name]

    def _capture(self):
        """CUDA graph of the step engine's enqueue at the bound shapes and addresses."""
        rt, stream, engine = self.cuda.rt, self.cuda.stream, self.engines["decoder_step"]
        engine.enqueue(stream)  # TensorRT finishes shape-dependent setup outside the capture
        self.cuda.sync()
        self.cuda(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        engine.enqueue(stream)
        graph = self.cuda(rt.cudaStreamEndCapture(stream))
        return graph, self.cuda(rt.cudaGraphInstantiate(graph, 0))

    def _scatter(self, position: int) -> None:
        """All layers' new K/V slices from the scratch block into the cache at ``position``: one copy."""
        width = self._slice_bytes(self.batch)
        self.cuda(self.cuda.rt.cudaMemcpy2DAsync(
            self.kv + position * width, self._layer_bytes(), self.scratch, width, width, len(self.past_names),
            self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.cuda.stream))

    def _release_cache(self) -> None:
        rt = self.cuda.rt
        if self.graph is not None:
            self.cuda(rt.cudaGraphExecDestroy(self.graph[1]))
            self.cuda(rt.cudaGraphDestroy(self.graph[0]))
            self.graph = None
        if self.kv is not None:
            self.cuda.sync()
            self.cuda(rt.cudaFree(self.kv))
            self.kv, self.batch = None, 0

    def close(self) -> None:
        """Free every device and pinned buffer and the stream; closing again does nothing."""
        if self.scratch is None:
            return
        self._release_cache()
        for block in [self.step_io, self.latent_io, *self.blocks.values()]:
            block.free()
        self.blocks = {}
        self.cuda(self.cuda.rt.cudaFree(self.scratch))
        self.scratch = None
        self.cuda(self.cuda.rt.cudaStreamDestroy(self.cuda.stream))

    def __enter__(self) -> "TrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
