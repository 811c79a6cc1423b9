"""Synthesise speech from an engine directory.

    python runtime/synth.py --engine ENGINE_DIR --text "Hello there." --out out.wav
    python runtime/synth.py --engine ENGINE_DIR --text-file lines.txt --out-dir wavs/   (one file per line)
    echo "Hello." | python runtime/synth.py --engine ENGINE_DIR --out-dir wavs/
    python runtime/synth.py --engine ENGINE_DIR --stream --text-file story.txt --out - | aplay -f FLOAT_LE -r 22050

The output format follows the extension (.wav, .flac, .ogg, .mp3). Existing files are never
replaced without --overwrite. --stream speaks the whole input as one text while it is decoded,
into a WAV file that is valid after every chunk or as raw float32 PCM on stdout (--out -).
Runs on ONNX Runtime (CPU or CUDA) or TensorRT; never imports torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from melle.core.audio import AUDIO_FORMATS, AudioError, audio_format, save_audio
from melle.core.cli import ExitCode, OutputError, UserError, run_cli
from melle.core.fileio import atomic_path, check_output_file
from melle.core.text import EmptyTextError, UnknownSymbolError
from melle.core.manifest import EngineError
from melle_runtime.stream_output import RAW_PCM, RawPcmStream, WavStream, silence_closed_stdout
from melle_runtime.synthesizer import ALIGN_GUIDE_MODES, BACKENDS, SynthesisOptions, Synthesizer

DEFAULT_OUT = "out.wav"
DEFAULT_OUT_DIR = "synth_out"


@dataclass(frozen=True)
class Job:
    text: str
    target: Path
    line: int | None  # 1-based line of --text-file / stdin; None for --text


def save_mel_png(mel, path: Path, title: str) -> None:
    """A spectrogram picture of ``mel [frames, n_mels]``, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    image = ax.imshow(mel.T, origin="lower", aspect="auto", interpolation="none")
    ax.set(xlabel="frame", ylabel="mel bin", title=title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


class PieceProgress:
    """A progress bar of pieces and audio seconds, shown only for text of several pieces."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __enter__(self) -> "PieceProgress":
        return self

    def __call__(self, done: int, total: int, seconds: float) -> None:
        if not self.enabled or total < 2:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc="speech", unit="piece", leave=False)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(f"{seconds:.1f} s of audio")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def read_input(args) -> str:
    """All of --text-file or stdin, as UTF-8 text."""
    try:
        if args.text_file:
            with open(args.text_file, encoding="utf-8") as f:
                return f.read()
        return sys.stdin.read()
    except FileNotFoundError:
        raise UserError(f"--text-file {args.text_file} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"--text-file {args.text_file} is a directory; give a text file") from None
    except UnicodeDecodeError as err:
        source = args.text_file or "stdin"
        raise UserError(f"{source} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        "save it as UTF-8") from None


def read_lines(args) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line of --text-file or stdin."""
    return [(n, line.strip()) for n, line in enumerate(read_input(args).splitlines(), 1) if line.strip()]


def stream_job(args) -> Job:
    """--stream: the whole input as one text, and where its audio goes."""
    if args.text is not None:
        text = args.text
    else:
        text = read_input(args)  # as written: blank lines between paragraphs give longer pauses
        if not text.strip():
            raise EmptyTextError(f"no text given: {args.text_file or 'stdin'} has no non-blank line; "
                                 "pass --text, --text-file or text on stdin")
    out = args.out or DEFAULT_OUT
    if out == RAW_PCM:
        return Job(text, Path(RAW_PCM), None)
    if Path(out).suffix.lower() != ".wav":
        raise UserError(f"--stream writes .wav files or raw PCM to stdout (--out -), not {out}", ExitCode.USAGE)
    return Job(text, check_output_file(out, args.overwrite), None)


def plan_jobs(args) -> list[Job]:
    """What to say and where each result goes, checked before any synthesis runs."""
    if args.text is not None:
        target = check_output_file(args.out or DEFAULT_OUT, args.overwrite)
        try:
            audio_format(target)
        except AudioError as err:
            raise UserError(f"--out: {err}", ExitCode.USAGE) from None
        return [Job(args.text, target, None)]
    lines = read_lines(args)
    if not lines:
        raise EmptyTextError(f"no text given: {args.text_file or 'stdin'} has no non-blank line; "
                             "pass --text, --text-file or lines on stdin")
    out_dir = Path(args.out_dir or DEFAULT_OUT_DIR)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out-dir {out_dir} is a file; give a directory")
    # Files are named by line number, so blank lines do not shift the names.
    width = max(4, len(str(lines[-1][0])))
    return [Job(text, check_output_file(out_dir / f"{n:0{width}d}{args.format}", args.overwrite, "--out-dir file"),
                n) for n, text in lines]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, help="engine directory written by export/to_onnx.py")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="text to speak (default: lines of --text-file or stdin)")
    source.add_argument("--text-file", help="one utterance per line (UTF-8)")
    p.add_argument("--out", help=f"audio file for --text (default: {DEFAULT_OUT}); .wav .flac .ogg or .mp3; "
                                 "with --stream a .wav or - (raw float32 PCM on stdout)")
    p.add_argument("--out-dir", help=f"directory for line-by-line input (default: {DEFAULT_OUT_DIR}); "
                                     "line N goes to NNNN.wav")
    p.add_argument("--format", default=".wav", choices=sorted(AUDIO_FORMATS),
                   help="file type of --out-dir files (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.add_argument("--prompt-wav", help="voice prompt recording")
    p.add_argument("--prompt-text", help="transcript of --prompt-wav")
    p.add_argument("--rolling-prompt", action="store_true",
                   help="prompt each sentence after the first with the previous sentence's own speech and text "
                        "(default: --prompt-wav prompts every sentence)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help="(default: %(default)s)")
    p.add_argument("--candidates", type=int, default=1, help="sample N, keep the best (default: %(default)s)")
    p.add_argument("--align-guide", choices=ALIGN_GUIDE_MODES, default="auto",
                   help="alignment-guided decoding, which keeps the model's attention moving through the text in "
                        "order: auto where the engine can (a model with guided heads, standard attention), on "
                        "(required), off (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap per sentence (default: %(default)s)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--strict", action="store_true", help="characters the voice cannot speak are an error")
    p.add_argument("--mel-png", help="also save a spectrogram picture of the (first) utterance")
    p.add_argument("--stream", action="store_true",
                   help="speak the whole input as one text, writing audio while it is decoded")
    args = p.parse_args(argv)
    if args.stream:
        for option, given in (("--out-dir", args.out_dir is not None), ("--mel-png", args.mel_png is not None),
                              (f"--candidates {args.candidates}", args.candidates != 1)):
            if given:
                p.error(f"--stream writes one audio stream and decodes one candidate: drop {option}")
    elif args.out == RAW_PCM:
        p.error("--out - (raw PCM on stdout) needs --stream")
    if args.text is not None and args.out_dir is not None:
        p.error("--out-dir is for --text-file or stdin input; with --text, name the file with --out")
    if args.text is None and args.out is not None and not args.stream:
        p.error("--out names the file for --text; for --text-file or stdin give --out-dir (one file per line)")
    if args.prompt_wav and not args.prompt_text:
        p.error("--prompt-wav needs --prompt-text (the transcript of the prompt)")
    if args.prompt_text and not args.prompt_wav:
        p.error("--prompt-text is the transcript of --prompt-wav: give the recording too")
    if args.candidates < 1:
        p.error(f"--candidates must be at least 1, got {args.candidates}")
    if not args.max_seconds > 0:
        p.error(f"--max-seconds must be positive, got {args.max_seconds}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mel_png:
        check_output_file(args.mel_png, args.overwrite, "--mel-png")
    jobs = [stream_job(args)] if args.stream else plan_jobs(args)
    options = SynthesisOptions(candidates=args.candidates, max_seconds=args.max_seconds, strict=args.strict,
                               rolling_prompt=args.rolling_prompt, align_guide=args.align_guide)
    with Synthesizer(args.engine, backend=args.backend, threads=args.threads) as synth:
        if args.stream:
            stream_speech(synth, jobs[0], args, options)
        else:
            speak_all(synth, jobs, args, options)
    return 0


def stream_speech(synth: Synthesizer, job: Job, args: argparse.Namespace, options: SynthesisOptions) -> None:
    """Write ``job``'s audio chunk by chunk as it is made, with the seconds made on stderr."""
    began = time.perf_counter()
    chunks = synth.stream(job.text, args.prompt_wav, args.prompt_text, seed=args.seed, options=options)
    sink = RawPcmStream() if job.target == Path(RAW_PCM) else None
    samples, first_audio = 0, None
    try:
        with tqdm(desc="streaming", unit="s", bar_format="{desc}: {n:.1f} s of audio [{elapsed}]",
                  file=sys.stderr) as bar:
            for chunk in chunks:
                if sink is None:  # opened with the first chunk: bad input leaves no empty file behind
                    sink = WavStream(job.target, chunk.sample_rate)
                sink.write(chunk.wav)
                first_audio = first_audio or time.perf_counter() - began
                samples += len(chunk.wav)
                bar.update(len(chunk.wav) / chunk.sample_rate)
    except BrokenPipeError:
        silence_closed_stdout()
        print(f"stdout was closed by its reader: stopped after {samples / synth.sample_rate:.2f} s of audio",
              file=sys.stderr)
        return
    except KeyboardInterrupt:
        kept = f"; {sink.describe()} holds the first {samples / synth.sample_rate:.2f} s" if sink else ""
        print(f"interrupted{kept}", file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it
    finally:
        chunks.close()
        if sink is not None:
            sink.close()
    elapsed, seconds = time.perf_counter() - began, samples / synth.sample_rate
    print(f"streamed {seconds:.2f} s of audio to {sink.describe()} in {elapsed:.2f} s (first audio after "
          f"{first_audio:.2f} s, RTF {elapsed / seconds:.3f})", file=sys.stderr)


def speak_all(synth: Synthesizer, jobs: list[Job], args: argparse.Namespace, options: SynthesisOptions) -> None:
    """Speak every job into its file, reporting each and (for several) a summary."""
    total_audio, start = 0.0, time.perf_counter()
    for i, job in enumerate(tqdm(jobs, disable=len(jobs) == 1, desc="lines", unit="line")):
        with PieceProgress(enabled=len(jobs) == 1) as progress:
            began = time.perf_counter()
            speech = synth.speak(job.text, args.prompt_wav, args.prompt_text, seed=args.seed + i, options=options,
                                 progress=progress)
        elapsed = time.perf_counter() - began
        save_audio(job.target, speech.wav, speech.sample_rate)
        if args.mel_png and i == 0:
            save_mel_png(np.concatenate(speech.mels), Path(args.mel_png), job.text[:60])
        seconds = len(speech.wav) / speech.sample_rate
        total_audio += seconds
        where = "" if job.line is None else f"line {job.line} -> "
        tqdm.write(f"{where}wrote {job.target}: {seconds:.2f} s of audio in {elapsed:.2f} s "
                   f"(RTF {elapsed / seconds:.3f}, {len(speech.pieces)} piece{'s' * (len(speech.pieces) > 1)})")
    if len(jobs) > 1:
        print(f"wrote {len(jobs)} files, {total_audio:.1f} s of audio in {time.perf_counter() - start:.1f} s")


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli)."""
    sys.exit(run_cli(main, {EngineError: ExitCode.MODEL, EmptyTextError: ExitCode.INPUT,
                            UnknownSymbolError: ExitCode.INPUT, AudioError: ExitCode.INPUT,
                            FloatingPointError: ExitCode.NUMERIC}))


if __name__ == "__main__":
    cli()
