"""Audio chunks -> the bytes of a response format, as they come: what a speech server streams.

OpenAI's ``response_format`` values: ``wav`` (16-bit PCM in a RIFF header whose sizes say
"unknown", as a stream has no length up front), ``pcm`` (raw 16-bit little-endian mono at
24 kHz, resampled with soxr), and ``flac``, ``mp3``, ``opus`` (in Ogg, at 48 kHz) and ``aac``
(ADTS) encoded by FFmpeg through PyAV.
"""

from __future__ import annotations

import struct
from typing import Protocol

import av
import numpy as np
import soxr

PCM_RATE = 24_000  # OpenAI's raw pcm rate
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}
# response_format -> (container, codec, sample rate or None for the input's)
FFMPEG_FORMATS = {"flac": ("flac", "flac", None), "mp3": ("mp3", "libmp3lame", None),
                  "opus": ("ogg", "libopus", 48_000), "aac": ("adts", "aac", None)}
OGG_PAGE_MICROSECONDS = "20000"  # Ogg pages of 20 ms: the muxer's default second would hold chunks back


class ChunkEncoder(Protocol):
    def encode(self, wav: np.ndarray) -> bytes:
        """Bytes that are ready once this float32 chunk in [-1, 1] is added."""

    def finish(self) -> bytes:
        """The rest: flushed encoder state and trailers."""


def to_int16(wav: np.ndarray) -> bytes:
    return (np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class WavEncoder:
    """16-bit PCM WAV whose RIFF and data sizes are 0xFFFFFFFF: "read until the end"."""

    def __init__(self, sample_rate: int):
        self.header = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt "
                       + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
                       + b"data" + struct.pack("<I", 0xFFFFFFFF))

    def encode(self, wav: np.ndarray) -> bytes:
        header, self.header = self.header, b""
        return header + to_int16(wav)

    def finish(self) -> bytes:
        return self.header  # the header alone when no chunk ever came


class PcmEncoder:
    """Raw 16-bit little-endian mono at 24 kHz, resampled chunk by chunk without seams."""

    def __init__(self, sample_rate: int):
        self.resampler = soxr.ResampleStream(sample_rate, PCM_RATE, 1, dtype="float32")

    def encode(self, wav: np.ndarray) -> bytes:
        return to_int16(self.resampler.resample_chunk(wav.astype(np.float32)))

    def finish(self) -> bytes:
        return to_int16(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))


class _Collected:
    """A write-only file for PyAV: what the muxer wrote since the last ``take``."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


class FfmpegEncoder:
    """flac / mp3 / opus / aac through PyAV, muxed into a non-seekable stream as packets come."""

    def __init__(self, response_format: str, sample_rate: int):
        container, codec, rate = FFMPEG_FORMATS[response_format]
        self.sample_rate, self.out = sample_rate, _Collected()
        options = {"page_duration": OGG_PAGE_MICROSECONDS} if container == "ogg" else {}
        self.container = av.open(self.out, mode="w", format=container, options=options)
        self.stream = self.container.add_stream(codec, rate=rate or sample_rate)
        self.stream.layout = "mono"
        self.resampler = av.AudioResampler(format=self.stream.codec_context.format, layout="mono",
                                           rate=rate or sample_rate)

    def _mux(self, frame) -> None:
        for resampled in self.resampler.resample(frame):
            for packet in self.stream.encode(resampled):
                self.container.mux(packet)

    def encode(self, wav: np.ndarray) -> bytes:
        frame = av.AudioFrame.from_ndarray(np.clip(wav, -1.0, 1.0).astype(np.float32)[None], format="flt",
                                           layout="mono")
        frame.sample_rate = self.sample_rate
        self._mux(frame)
        return self.out.take()

    def finish(self) -> bytes:
        self._mux(None)
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        return self.out.take()


def chunk_encoder(response_format: str, sample_rate: int) -> ChunkEncoder:
    """The encoder of ``response_format`` (a key of CONTENT_TYPES) for audio at ``sample_rate``."""
    if response_format == "wav":
        return WavEncoder(sample_rate)
    if response_format == "pcm":
        return PcmEncoder(sample_rate)
    if response_format in FFMPEG_FORMATS:
        return FfmpegEncoder(response_format, sample_rate)
    raise ValueError(f"unknown response_format {response_format!r}; choose one of {sorted(CONTENT_TYPES)}")
