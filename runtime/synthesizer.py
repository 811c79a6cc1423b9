"""The Python API: ``Synthesizer(engine_dir).synthesize(text) -> (waveform, sample_rate)``.

Text -> tokens (melle.core.text), optional prompt wav -> mel (melle.core.audio, numpy), the shared
decode loop (melle.core.decoding) over a runtime backend, then the backend's vocoder.
Imports no torch.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from melle.core.alignment import AlignOptions
from melle.core.audio import load_wav, mel_spectrogram
from melle.core.decoding import Decoded, DecodeOptions, DecoderBackend, Decoding, decode
from melle.core.text import (EmptyTextError, UnknownSymbolError, describe_symbols, normalize_text,
                        prompt_transcript_mismatch, tokenizer_from_spec, unspeakable_characters)
from melle.core.manifest import EngineError, read_manifest, step_graph_name
from melle_runtime.ort_backend import OrtBackend
from melle_runtime.ort_gqa_backend import OrtGqaBackend
from melle_runtime.streaming import ChunkPlan, MelStream
from melle_runtime.text_pieces import Piece, split_text

# ONNX Runtime CPU backends and the decoder step each runs: FP32 or quantized weights (export --int8 / --nbits).
CPU_STEP_WEIGHTS = {"ort-cpu": "fp32", "ort-cpu-int8": "int8", "ort-cpu-nbits8": "nbits8", "ort-cpu-nbits4": "nbits4"}
BACKENDS = (*CPU_STEP_WEIGHTS, "ort-cuda", "trt")
MIN_PROMPT_SECONDS = 0.5
# Room left for speech when long text is cut into pieces: each text token may take this much
# audio (read speech runs ~0.07 s per phoneme symbol; twice that leaves slack for slow speech).
MAX_SECONDS_PER_TOKEN = 0.15
MIN_PIECE_TOKENS = 8  # a prompt that leaves less than this for text is too long
ALIGN_GUIDE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class SynthesisOptions:
    candidates: int = 1  # sample N per sentence, keep the best
    max_seconds: float = 30.0  # cap per piece; reaching it without a stop is reported
    stop_threshold: float = 0.5
    strict: bool = False  # characters the voice cannot speak are an error, not a warning
    # Prompt each piece after the first with the previous piece's own frames and text (a rolling
    # cross-sentence prompt) instead of the user's prompt, which then prompts the first piece only.
    # The frames are y', what the decoder fed itself: the same bits whole or streamed.
    rolling_prompt: bool = False
    # Alignment-guided decoding (melle.core.alignment): keeps the decode moving through the text in
    # order. It needs an engine of a model with guided heads exported with standard attention:
    # "auto" guides where the engine can, "on" requires it, "off" never guides.
    align_guide: str = "auto"

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.align_guide not in ALIGN_GUIDE_MODES:
            raise ValueError(f"align_guide must be one of {ALIGN_GUIDE_MODES}, got {self.align_guide!r}")

    def decode_options(self, cfg, preset, aligned: bool) -> DecodeOptions:
        """The decode loop's options for a model ``cfg`` whose frames follow mel ``preset``, on a
        backend that can (``aligned``) or cannot guide by alignment."""
        frames_per_second = preset.sample_rate / preset.hop_length
        max_steps = max(1, math.ceil(self.max_seconds * frames_per_second / cfg.r))
        guide = self.align_guide == "on" or (self.align_guide == "auto" and aligned)
        return DecodeOptions(stop_threshold=self.stop_threshold, max_steps=max_steps, candidates=self.candidates,
                             align=AlignOptions() if guide else None)


@dataclass
class Speech:
    wav: np.ndarray  # float32 [samples]
    sample_rate: int
    mels: list[np.ndarray]  # refined log-mel [frames, n_mels] per piece
    pieces: list[Piece]  # the text as it was cut to fit the engine


@dataclass
class AudioChunk:
    wav: np.ndarray  # float32 [samples]
    sample_rate: int
    piece: int  # index of the text piece it belongs to (a pause belongs to the piece it follows)


# Called after each piece: (pieces done, pieces in all, seconds of audio made so far).
Progress = Callable[[int, int, float], None]


def make_backend(manifest, backend: str, threads: int | None = None):
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if manifest.attention == "gqa" and backend not in CPU_STEP_WEIGHTS:
        raise EngineError(f"{manifest.directory} was exported with --attention gqa, whose graphs run on ONNX Runtime "
                          f"CPU only; use --backend ort-cpu, or export without --attention gqa for {backend}")
    if backend == "trt":
        from melle_runtime.trt_backend import TrtBackend

        return TrtBackend(manifest)
    weights = CPU_STEP_WEIGHTS.get(backend, "fp32")
    if step_graph_name(weights) not in manifest.graphs:
        option = "--int8" if weights == "int8" else f"--nbits {weights.removeprefix('nbits')}"
        raise EngineError(f"{manifest.directory} has no {weights} decoder step for {backend}; re-export with {option}")
    if manifest.attention == "gqa":
        return OrtGqaBackend(manifest, weights=weights, threads=threads)
    device = "cuda" if backend == "ort-cuda" else "cpu"
    return OrtBackend(manifest, device=device, weights=weights, threads=threads)


class Synthesizer:
    """Speech from an engine directory on ONNX Runtime (CPU/CUDA) or TensorRT.

    ``close()`` (or a ``with`` block) releases the backend: sessions, or TensorRT's device memory.
    """

    def __init__(self, engine_dir, backend: str = "ort-cpu", threads: int | None = None):
        self.manifest = read_manifest(engine_dir)
        self.cfg = self.manifest.config
        self.preset = self.manifest.mel_preset
        self.tokenizer = tokenizer_from_spec(self.manifest.tokenizer)
        self.backend = make_backend(self.manifest, backend, threads)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sample_rate(self) -> int:
        return self.preset.sample_rate

    def prompt_mel(self, prompt_wav, prompt_text: str | None) -> np.ndarray:
        """Log-mel ``[frames, n_mels]`` of a prompt recording, checked for use as a prompt."""
        if not prompt_text or not prompt_text.strip():
            raise EmptyTextError("a prompt wav needs its transcript: pass --prompt-text / prompt_text")
        wav = load_wav(prompt_wav, self.preset.sample_rate, min_seconds=MIN_PROMPT_SECONDS)
        mismatch = prompt_transcript_mismatch(prompt_text, len(wav) / self.preset.sample_rate)
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
        return mel_spectrogram(wav, self.preset)

    def mel(self, text: str, prompt_mel: np.ndarray | None = None, prompt_text: str | None = None,
            seed: int | None = None, options: SynthesisOptions = SynthesisOptions()) -> Decoded:
        """Decode one piece to mel frames (prompt transcript prepended when prompting)."""
        ids, start = self.token_ids(text, prompt_mel, prompt_text)
        return decode(self.backend, self.cfg, ids, prompt_mel, self.decode_options(options, self.backend),
                      seed=seed, text_start=start)

    def token_ids(self, text: str, prompt_mel: np.ndarray | None, prompt_text: str | None) -> tuple[list[int], int]:
        """The piece's tokens, after the prompt's transcript when there is a prompt, and where the piece's begin."""
        ids = self.tokenizer.encode(text, on_unknown="drop")
        prompt_ids = [] if prompt_mel is None else self.tokenizer.encode(prompt_text, on_unknown="drop")
        return prompt_ids + ids, len(prompt_ids)

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """Waveform ``[samples]`` float32 from a log-mel ``[frames, n_mels]``."""
        if not self.manifest.has_vocoder:
            raise EngineError(f"{self.manifest.directory} was exported without a vocoder (--vocoder none)")
        return self.backend.vocode(mel[None].astype(np.float32))[0]

    def piece_budget(self, prompt_positions: int = 0, rolling: bool = False) -> int:
        """Most text tokens one piece may hold so that it and its speech fit the engine's capacity
        (``rolling``: twice, once as the next piece's prompt and once as itself)."""
        free = self.backend.capacity - prompt_positions - 1  # 1: the EOS token
        budget = int(free // self.positions_per_token)
        if rolling:
            budget = min(budget, int((self.backend.capacity - 1) // (2 * self.positions_per_token)))
        if budget < MIN_PIECE_TOKENS:
            raise EngineError(f"the prompt takes {prompt_positions} of the engine's {self.backend.capacity} "
                              "positions, leaving no room for text: use a shorter prompt")
        return budget

    @property
    def positions_per_token(self) -> float:
        """Positions a text token may take with its speech (the token and its share of frame groups)."""
        frames_per_second = self.preset.sample_rate / self.preset.hop_length
        return 1 + MAX_SECONDS_PER_TOKEN * frames_per_second / self.cfg.r

    def pieces(self, text: str, prompt_positions: int = 0, rolling: bool = False) -> list[Piece]:
        """``text`` normalised and cut into pieces that fit the engine (see melle_runtime.text_pieces)."""
        budget = self.piece_budget(prompt_positions, rolling)

        def fits(piece: str) -> bool:
            try:
                return len(self.tokenizer.encode(piece, on_unknown="drop")) <= budget
            except EmptyTextError:
                return True  # nothing to speak takes no room
        return split_text(text, normalize_text, fits)

    def check_speakable(self, text: str, strict: bool) -> None:
        """Warn (``strict``: raise) when ``text`` has characters the voice cannot say."""
        chars = unspeakable_characters(text)
        if not chars:
            return
        message = (f"this voice cannot speak {describe_symbols(chars)}: they are left out or read as names; "
                   "write them out in words")
        if strict:
            raise UnknownSymbolError(message, chars)
        warnings.warn(message, stacklevel=3)

    def plan(self, text: str, prompt_wav, prompt_text: str | None, options: SynthesisOptions) -> tuple[
            np.ndarray | None, list[Piece]]:
        """The prompt's mel (or None) and ``text`` cut into pieces that fit the engine beside it."""
        self.check_options(options)
        self.check_speakable(text, options.strict)
        prompt = self.prompt_mel(prompt_wav, prompt_text) if prompt_wav is not None else None
        prompt_positions = 0 if prompt is None else self.prompt_positions(prompt, prompt_text)
        return prompt, self.speakable(self.pieces(text, prompt_positions, options.rolling_prompt), text)

    def check_options(self, options: SynthesisOptions) -> None:
        """Raise if this engine cannot decode with ``options``."""
        if options.align_guide == "on" and not getattr(self.backend, "aligned", False):
            raise EngineError(f"{self.manifest.directory} cannot guide decoding by alignment: it needs a model "
                              "trained with guided heads (config guided_heads) exported with --attention standard "
                              "by this melle-rt; re-export it, or use --align-guide auto / off")

    def speakable(self, pieces: list[Piece], text: str) -> list[Piece]:
        """``pieces`` without those of only unspeakable characters (already warned about), which
        would fail mid-stream; none left is an error naming what was dropped."""
        kept, why = [], None
        for piece in pieces:
            try:
                if self.tokenizer.encode(piece.text, on_unknown="drop"):
                    kept.append(piece)
            except EmptyTextError as err:
                why = err
        if not kept:
            raise why or EmptyTextError(f"nothing to say: the text is empty or has no words ({text[:40]!r})")
        return kept

    def prompt_positions(self, prompt_mel: np.ndarray, prompt_text: str) -> int:
        return len(self.tokenizer.encode(prompt_text, on_unknown="drop")) + len(prompt_mel) // self.cfg.r

    def piece_prompt(self, piece: Piece, user_prompt: tuple[np.ndarray | None, str | None],
                     previous: tuple[np.ndarray, str] | None, options: SynthesisOptions) -> tuple[
            np.ndarray | None, str | None]:
        """(mel, transcript) prompting ``piece``: with ``rolling_prompt`` the previous piece's speech and
        text when there is one and it leaves the piece room, else the user's prompt (or none)."""
        if not options.rolling_prompt or previous is None:
            return user_prompt
        needed = self.prompt_positions(*previous) + 1 + math.ceil(
            len(self.tokenizer.encode(piece.text, on_unknown="drop")) * self.positions_per_token)
        return previous if needed <= self.backend.capacity else user_prompt

    def speak(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
              options: SynthesisOptions = SynthesisOptions(), progress: Progress | None = None) -> Speech:
        """Speak ``text`` piece by piece (seed + i for piece i), joined by pauses from its punctuation.

        Long text is cut into sentences, then clauses, then words, so every piece fits the engine.
        """
        prompt, pieces = self.plan(text, prompt_wav, prompt_text, options)
        audio, mels, seconds, previous = [], [], 0.0, None
        for i, piece in enumerate(pieces):
            piece_prompt, piece_prompt_text = self.piece_prompt(piece, (prompt, prompt_text), previous, options)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                decoded = self.mel(piece.text, piece_prompt, piece_prompt_text, None if seed is None else seed + i,
                                   options)
            for w in caught:
                warnings.warn(f"piece {i + 1} ({piece.text[:40]!r}): {w.message}", stacklevel=2)
            mels.append(decoded.mel)
            previous = (decoded.coarse[decoded.best], piece.text)
            audio += [self.vocode(decoded.mel), self.pause(piece)]
            seconds += sum(len(a) for a in audio[-2:]) / self.sample_rate
            if progress:
                progress(i + 1, len(pieces), seconds)
        return Speech(np.concatenate(audio), self.sample_rate, mels, pieces)

    def stream(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
               options: SynthesisOptions = SynthesisOptions(), chunks: ChunkPlan = ChunkPlan()) -> Iterator[AudioChunk]:
        """Speak ``text`` as audio chunks while it is decoded; together they are ``speak``'s audio.

        Each piece is decoded frame group by frame group; once a chunk's frames and their look-ahead
        exist, the post-net refines them and the vocoder renders the chunk on a second thread while
        decoding goes on. Chunks follow ``chunks`` (small first, then larger). One candidate per piece:
        picking the best of several needs them all finished. Stopping the iteration (``close()``,
        ``break``) stops the decoding; at most the vocoder job in flight completes.

        Bad input and unusable engines raise here, before the first chunk is asked for.
        """
        self.check_streamable(options)
        prompt, pieces = self.plan(text, prompt_wav, prompt_text, options)
        return self._stream(pieces, (prompt, prompt_text), seed, options, chunks)

    def check_streamable(self, options: SynthesisOptions) -> None:
        """Raise unless this engine can stream with ``options`` (one candidate, a vocoder, receptive fields)."""
        if options.candidates != 1:
            raise ValueError(f"streaming decodes one candidate per piece, got candidates={options.candidates}")
        if not self.manifest.has_vocoder:
            raise EngineError(f"{self.manifest.directory} was exported without a vocoder (--vocoder none)")
        unknown = [name for name in ("postnet", "vocoder") if self.manifest.graphs[name].context_frames is None]
        if unknown:
            raise EngineError(f"{self.manifest.directory} does not record the receptive field of its {unknown} "
                              "graphs, which streaming needs: re-export it with this version of export/to_onnx.py")

    def _stream(self, pieces: list[Piece], user_prompt: tuple[np.ndarray | None, str | None], seed: int | None,
                options: SynthesisOptions, chunks: ChunkPlan) -> Iterator[AudioChunk]:
        pending: deque[tuple[int, Future]] = deque()  # (piece, audio) in playing order: vocoder jobs and pauses
        started = False
        stream: MelStream | None = None  # the previous piece's, then this piece's
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocoder") as vocoder:
            try:
                for i, piece in enumerate(pieces):
                    previous = (np.stack(stream.coarse), pieces[i - 1].text) if stream else None
                    prompt, prompt_text = self.piece_prompt(piece, user_prompt, previous, options)
                    stream = self.mel_stream(chunks, stream.chunks if stream else 0)

                    def submit(jobs, piece_index=i) -> None:
                        pending.extend((piece_index, vocoder.submit(job.run, self.vocode)) for job in jobs)

                    seed_i = None if seed is None else seed + i
                    for groups in self.decoding(piece.text, prompt, prompt_text, seed_i, options):
                        submit(stream.push(groups.reshape(-1, self.cfg.n_mels)))
                        # The vocoder is the slower stage: decoding never runs more than a chunk ahead
                        # of it, and not at all before the first chunk (that would only delay it).
                        while pending and (pending[0][1].done() or not started or len(pending) > 2):
                            started = True
                            yield self._chunk(*pending.popleft())
                    submit(stream.finish())
                    if piece.pause_after:
                        pause: Future = Future()
                        pause.set_result(self.pause(piece))
                        pending.append((i, pause))
                while pending:
                    yield self._chunk(*pending.popleft())
            finally:
                for _, job in pending:
                    job.cancel()

    def pause(self, piece: Piece) -> np.ndarray:
        """The silence that follows ``piece`` (from its punctuation; empty for none)."""
        return np.zeros(int(piece.pause_after * self.sample_rate), np.float32)

    def _chunk(self, piece: int, audio: Future) -> AudioChunk:
        return AudioChunk(audio.result(), self.sample_rate, piece)

    def decoding(self, text: str, prompt_mel: np.ndarray | None, prompt_text: str | None, seed: int | None,
                 options: SynthesisOptions, backend: DecoderBackend | None = None) -> Decoding:
        """A decode of one piece in progress, step by step (``mel`` runs one to the end), on this
        synthesizer's backend or on ``backend`` (one row of a batch: ``melle_runtime.batching``)."""
        ids, start = self.token_ids(text, prompt_mel, prompt_text)
        backend = backend or self.backend
        return Decoding(backend, self.cfg, ids, prompt_mel, self.decode_options(options, backend), seed,
                        text_start=start)

    def decode_options(self, options: SynthesisOptions, backend: DecoderBackend) -> DecodeOptions:
        """``options`` for the decode loop of this engine's model on ``backend``."""
        return options.decode_options(self.cfg, self.preset, aligned=getattr(backend, "aligned", False))

    def mel_stream(self, chunks: ChunkPlan, first_chunk: int) -> MelStream:
        """Chunked post-net and vocoder windows for one piece, with the engine's receptive fields."""
        graphs = self.manifest.graphs
        return MelStream(lambda coarse: self.backend.postnet(coarse[None])[0], graphs["postnet"].context_frames,
                         graphs["vocoder"].context_frames, self.preset.hop_length, chunks, first_chunk)

    def synthesize(self, text: str, prompt_wav=None, prompt_text: str | None = None, seed: int | None = None,
                   options: SynthesisOptions = SynthesisOptions()) -> tuple[np.ndarray, int]:
        """Speak ``text``; returns (float32 waveform, sample rate)."""
        speech = self.speak(text, prompt_wav, prompt_text, seed, options)
        return speech.wav, speech.sample_rate
