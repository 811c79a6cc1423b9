"""Long text -> pieces the engine can speak one at a time, with the pause each one ends on.

A piece is a sentence when it fits the engine's capacity; a sentence that does not fit is
split at clause punctuation, a clause that does not fit at word boundaries, packing as many
clauses (or words) into each piece as fit. Run after text normalisation, so "Dr." and "3.5"
are words already and never end a sentence; a sentence may end inside closing quotes
('"Stop!" he said.'), but not at initials ("U.S.") or abbreviated months ("Jan."). Paragraphs
(text between blank lines) are normalised and cut one by one, with a longer pause between them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

from melle.core.text import EmptyTextError

_CLOSING = "\"')]\u201d\u2019"
SENTENCE_END = re.compile(rf"[.!?;][{re.escape(_CLOSING)}]*\s+")
# A full stop after these is part of the word, not the end of a sentence.
NO_SENTENCE_END = re.compile(r"(?:^|\s)(?:[A-Za-z]\.)+$|\b(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec|vs)\.$",
                             re.IGNORECASE)
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
CLAUSE_END = re.compile(r"(?<=[,:;\u2013\u2014])\s+")
# Seconds of silence after a piece, by the punctuation it ends on; a piece cut inside a
# clause gets a breath only.
PAUSE_AFTER = {".": 0.35, "!": 0.35, "?": 0.35, ";": 0.25, ":": 0.25, ",": 0.15, "\u2013": 0.15, "\u2014": 0.15}
PAUSE_INSIDE_CLAUSE = 0.05
PAUSE_AFTER_PARAGRAPH = 0.7
_SPEAKABLE = re.compile(r"\w")


@dataclass(frozen=True)
class Piece:
    text: str
    pause_after: float  # seconds of silence that follow it (0 after the last piece)


def pause_after(text: str) -> float:
    """The pause a piece's final punctuation asks for."""
    end = text.rstrip().rstrip(_CLOSING)[-1:]
    return PAUSE_AFTER.get(end, PAUSE_INSIDE_CLAUSE)


def _packed(parts: list[str], fits: Callable[[str], bool]) -> Iterator[str]:
    """Consecutive ``parts`` joined by spaces into as few pieces as ``fits`` allows."""
    current = ""
    for part in parts:
        joined = f"{current} {part}" if current else part
        if current and not fits(joined):
            yield current
            current = part
        else:
            current = joined
    if current:
        yield current


def _fitted(sentence: str, fits: Callable[[str], bool]) -> Iterator[str]:
    if fits(sentence):
        yield sentence
        return
    for clause in _packed(CLAUSE_END.split(sentence), fits):
        if fits(clause):
            yield clause
            continue
        for piece in _packed(clause.split(), fits):
            if not fits(piece):
                raise EmptyTextError(f"the word {piece[:40]!r} alone is longer than this engine can speak; "
                                     "break it up or export the engine with a larger --max-len")
            yield piece


def sentences(text: str) -> list[str]:
    """``text`` (normalised) cut after . ! ? ; and any closing quotes, except after initials and
    abbreviated months, and between a quotation and its lower-case attribution ('"Stop!" he said.')."""
    found, start = [], 0
    for end in SENTENCE_END.finditer(text):
        if text[end.start()] == "." and NO_SENTENCE_END.search(text[start:end.start() + 1]):
            continue
        if end.group().rstrip()[-1] in _CLOSING and text[end.end():end.end() + 1].islower():
            continue
        found.append(text[start:end.end()].strip())
        start = end.end()
    return [s for s in [*found, text[start:].strip()] if s]


def split_pieces(text: str, fits: Callable[[str], bool]) -> list[Piece]:
    """Pieces of ``text`` (already normalised) for which ``fits(piece)`` holds, in order.

    Pieces with nothing speakable (only punctuation) are dropped; the last piece has no pause.
    """
    pieces = [Piece(p, pause_after(p))
              for sentence in sentences(text.strip())
              for p in _fitted(sentence, fits) if _SPEAKABLE.search(p)]
    if pieces:
        pieces[-1] = Piece(pieces[-1].text, 0.0)
    return pieces


def split_text(text: str, normalize: Callable[[str], str], fits: Callable[[str], bool]) -> list[Piece]:
    """Raw ``text`` -> pieces: paragraph by paragraph, each normalised and split by ``split_pieces``."""
    pieces: list[Piece] = []
    for paragraph in PARAGRAPH_BREAK.split(text):
        cut = split_pieces(normalize(paragraph), fits)
        if pieces and cut:
            pieces[-1] = Piece(pieces[-1].text, PAUSE_AFTER_PARAGRAPH)
        pieces += cut
    return pieces
