"""Where streamed audio goes as it is made: a WAV file that is valid after every chunk, or raw PCM.

    python runtime/synth.py --engine engines/demo --stream --text "..." --out - | aplay -f FLOAT_LE -r 22050 -c 1
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

RAW_PCM = "-"  # --out - : float32 little-endian mono samples on stdout


class WavStream:
    """16-bit PCM WAV written chunk by chunk; the header is rewritten at each flush, so a reader (or
    an interrupted run) always finds a complete file holding every chunk written so far."""

    def __init__(self, path: str | Path, sample_rate: int):
        self.path = Path(path)
        self.file = sf.SoundFile(self.path, "w", samplerate=sample_rate, channels=1, subtype="PCM_16", format="WAV")

    def write(self, wav: np.ndarray) -> None:
        self.file.write(np.clip(wav, -1.0, 1.0))  # clip so PCM never wraps
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def describe(self) -> str:
        return str(self.path)


class RawPcmStream:
    """float32 little-endian mono samples on a binary stream (stdout), flushed at every chunk."""

    def __init__(self, out: BinaryIO | None = None):
        self.out = out or sys.stdout.buffer

    def write(self, wav: np.ndarray) -> None:
        self.out.write(np.asarray(wav, dtype="<f4").tobytes())
        self.out.flush()

    def close(self) -> None:
        try:
            self.out.flush()
        except BrokenPipeError:
            pass

    def describe(self) -> str:
        return "stdout (float32 little-endian PCM)"


def silence_closed_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null so the interpreter's final
    flush does not raise again (the Python docs' recipe for BrokenPipeError)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
