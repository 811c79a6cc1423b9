"""Synthesise speech from an engine directory.

    python runtime/synth.py --engine ENGINE_DIR --text "Hello there." --out out.wav
    python runtime/synth.py --engine ENGINE_DIR --text-file lines.txt --out-dir wavs/   (one wav per line)
    echo "Hello." | python runtime/synth.py --engine ENGINE_DIR --out-dir wavs/

Runs on ONNX Runtime (CPU or CUDA) or TensorRT; never imports torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from melle.audio import AudioError, save_wav
from melle.text import EmptyTextError, UnknownSymbolError
from melle_runtime.manifest import EngineError
from melle_runtime.synthesizer import BACKENDS, SynthesisOptions, Synthesizer


def save_mel_png(mel, path: Path, title: str) -> None:
    """A spectrogram picture of ``mel [frames, n_mels]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    image = ax.imshow(mel.T, origin="lower", aspect="auto", interpolation="none")
    ax.set(xlabel="frame", ylabel="mel bin", title=title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_lines(args) -> list[str]:
    if args.text is not None:
        return [args.text]
    source = open(args.text_file) if args.text_file else sys.stdin
    with source:
        return [line.strip() for line in source if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="engine directory written by export/to_onnx.py")
    p.add_argument("--text", help="text to speak (default: lines of --text-file or stdin)")
    p.add_argument("--text-file", help="one utterance per line")
    p.add_argument("--out", default="out.wav", help="wav path for --text (default: %(default)s)")
    p.add_argument("--out-dir", default="synth_out", help="directory for line-by-line input (default: %(default)s)")
    p.add_argument("--prompt-wav", help="voice prompt recording")
    p.add_argument("--prompt-text", help="transcript of --prompt-wav")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help="(default: %(default)s)")
    p.add_argument("--candidates", type=int, default=1, help="sample N, keep the best (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap per sentence (default: %(default)s)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--mel-png", help="also save a spectrogram picture of the (first) utterance")
    args = p.parse_args(argv)
    if args.prompt_wav and not args.prompt_text:
        p.error("--prompt-wav needs --prompt-text (the transcript of the prompt)")
    options = SynthesisOptions(candidates=args.candidates, max_seconds=args.max_seconds)
    try:
        synth = Synthesizer(args.engine, backend=args.backend, threads=args.threads)
        lines = read_lines(args)
        if not lines:
            raise EmptyTextError("no text given: pass --text, --text-file or lines on stdin")
        single = args.text is not None
        targets = [Path(args.out)] if single else [Path(args.out_dir) / f"{i:04d}.wav" for i in range(len(lines))]
        for i, (line, target) in enumerate(tqdm(list(zip(lines, targets)), disable=single, desc="synth")):
            start = time.perf_counter()
            speech = synth.speak(line, args.prompt_wav, args.prompt_text, seed=args.seed + i, options=options)
            elapsed = time.perf_counter() - start
            save_wav(target, speech.wav, speech.sample_rate)
            if args.mel_png and i == 0:
                save_mel_png(np.concatenate(speech.mels), Path(args.mel_png), line[:60])
            if single:
                seconds = len(speech.wav) / speech.sample_rate
                print(f"wrote {target}: {seconds:.2f} s of audio in {elapsed:.2f} s (RTF {elapsed / seconds:.3f})")
    except (EngineError, EmptyTextError, UnknownSymbolError, AudioError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
