"""Pure pieces of the quality benchmark: WER normalisation, per-utterance WER, aggregation, the report.

No model is loaded here (Whisper and the speaker encoder live in ``quality.py``), so all of it is
unit-tested without them. WER follows Seed-TTS-eval: the error rate of each utterance, averaged
over utterances (not the errors pooled over all words).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import jiwer
import numpy as np

from melle.core.text import normalize_text

# Anything that is not a letter, a digit or an apostrophe separates words ("twenty-one" -> two words).
_SEPARATOR_RE = re.compile(r"[^\w']+|_")
# Apostrophes at word edges are quote marks, not part of the word ("'hello'" -> "hello").
_EDGE_APOSTROPHE_RE = re.compile(r"(?<!\w)'+|'+(?!\w)")

SYSTEM_ORDER = ("runtime", "reference", "teacher_forced", "ground_truth", "ground_truth_vocoded")
# Sentence lengths in words (after normalisation), (first, last); None = no upper bound.
LENGTH_BUCKETS = ((1, 8), (9, 15), (16, None))


def normalize_for_wer(text: str) -> str:
    """Text as compared for WER: numbers spelled out, lower case, punctuation dropped but
    in-word apostrophes kept, single spaces."""
    text = normalize_text(text).lower()
    text = _SEPARATOR_RE.sub(" ", text)
    text = _EDGE_APOSTROPHE_RE.sub(" ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class WordErrors:
    """Edit operations turning the reference words into the hypothesis words."""

    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @property
    def wer(self) -> float:
        return (self.substitutions + self.deletions + self.insertions) / self.reference_words


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    """Word edit counts between a reference text and a transcript, both normalised first."""
    ref, hyp = normalize_for_wer(reference), normalize_for_wer(hypothesis)
    if not ref:
        raise ValueError(f"reference {reference!r} has no words to score against")
    out = jiwer.process_words(ref, hyp)
    return WordErrors(out.substitutions, out.deletions, out.insertions, len(ref.split()))


def utterance_wer(reference: str, hypothesis: str) -> float:
    """WER of one utterance as a fraction (an empty transcript is 1.0; insertions can push it above)."""
    return word_errors(reference, hypothesis).wer


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embedding vectors."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def mean_embedding(embeddings: list[np.ndarray]) -> np.ndarray:
    """Unit-length mean of several speaker embeddings (a voice from a few recordings)."""
    mean = np.mean(np.stack(embeddings), axis=0)
    return mean / np.linalg.norm(mean)


@dataclass
class Row:
    """One utterance of one system."""

    text: str  # what should be said
    hypothesis: str  # what Whisper heard
    wer: float  # per-utterance WER, fraction
    sim: float  # cosine to the reference voice
    seconds: float | None  # synthesis wall time (None for recorded audio)
    audio_seconds: float  # length of the audio scored
    extra: dict[str, Any] | None = None  # system-specific facts (stopped, seed, similarity to joe ...)


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def rtf(rows: list[Row]) -> float | None:
    """Total synthesis time over total audio length; None when nothing was synthesised."""
    if not rows or any(r.seconds is None for r in rows):
        return None
    return sum(r.seconds for r in rows) / sum(r.audio_seconds for r in rows)


def bucket_label(first: int, last: int | None) -> str:
    return f"{first}+" if last is None else f"{first}-{last}"


def wer_by_length(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Mean WER per sentence-length bucket (words of the normalised text).

    Free-running decoding that drifts on its own output gets worse with length while
    teacher-forced and recorded speech do not: this split tells the two failure modes apart.
    """
    words = [len(normalize_for_wer(r.text).split()) for r in rows]
    out = {}
    for first, last in LENGTH_BUCKETS:
        inside = [r.wer for r, n in zip(rows, words) if n >= first and (last is None or n <= last)]
        out[bucket_label(first, last)] = {"n": len(inside), "wer": mean_or_none(inside)}
    return out


def summarize(rows: list[Row]) -> dict[str, Any]:
    """A system's entry: mean per-utterance WER, mean similarity, RTF, WER by length, and the rows themselves."""
    return {"n": len(rows), "wer": mean_or_none([r.wer for r in rows]), "sim": mean_or_none([r.sim for r in rows]),
            "rtf": rtf(rows), "audio_seconds": sum(r.audio_seconds for r in rows),
            "wer_by_length": wer_by_length(rows), "rows": [asdict(r) for r in rows]}


def summarize_prompted(prompt: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """One extra speaker's entry: the prompt used, WER, similarity to that speaker and to the reference voice."""
    return {"prompt": prompt, **summarize(rows),
            "sim_speaker": mean_or_none([r.sim for r in rows]),
            "sim_reference_voice": mean_or_none([r.extra["sim_reference_voice"] for r in rows])}


def build_report(systems: dict[str, list[Row]], prompted: dict[str, dict[str, Any]],
                 config: dict[str, Any]) -> dict[str, Any]:
    """The quality.json structure: systems in a fixed order, prompted speakers, run config."""
    ordered = [name for name in SYSTEM_ORDER if name in systems] + sorted(set(systems) - set(SYSTEM_ORDER))
    return {"systems": {name: summarize(systems[name]) for name in ordered}, "prompted": prompted, "config": config}


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """quality.md: a table of the systems, one of their WER by sentence length and, when prompted
    runs exist, one of the speakers."""
    lines = ["# Quality", "", "| system | n | WER % | SIM | RTF | audio s |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["systems"].items():
        lines.append(f"| {name} | {s['n']} | {_fmt(s['wer'], 100, 1)} | {_fmt(s['sim'])} | {_fmt(s['rtf'])} "
                     f"| {s['audio_seconds']:.1f} |")
    labels = [bucket_label(*bucket) for bucket in LENGTH_BUCKETS]
    lines += ["", "## WER % by sentence length (words; utterances in brackets)", "",
              "| system | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, s in report["systems"].items():
        buckets = [s["wer_by_length"][label] for label in labels]
        lines.append(f"| {name} | " + " | ".join(f"{_fmt(b['wer'], 100, 1)} ({b['n']})" for b in buckets) + " |")
    if report["prompted"]:
        lines += ["", "## Prompted (cross-sentence prompt of another speaker)", "",
                  "| speaker | n | WER % | SIM to speaker | SIM to reference voice |", "|---|---:|---:|---:|---:|"]
        for speaker, p in report["prompted"].items():
            lines.append(f"| {speaker} | {p['n']} | {_fmt(p['wer'], 100, 1)} | {_fmt(p['sim_speaker'])} "
                         f"| {_fmt(p['sim_reference_voice'])} |")
    notes = report["config"].get("notes", [])
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"
