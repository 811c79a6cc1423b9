"""Text front end: normalisation and the tokenizers that turn text into token ids.

Three kinds share one interface (:class:`Tokenizer`): ``chars`` (lower-cased
graphemes), ``phonemes`` (espeak-ng IPA, one code point per symbol) and ``bpe``
(Hugging Face sub-word BPE). A tokenizer is fitted once on the training corpus with
:func:`build_tokenizer`; its :meth:`Tokenizer.spec` travels with the model and
:func:`tokenizer_from_spec` rebuilds it exactly. This module imports no torch (the
runtime uses it); phonemizer and tokenizers are imported only when a kind needs them.
"""

from __future__ import annotations

import datetime
import math
import re
import threading
import unicodedata
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

from num2words import num2words

PAD_ID = 0
EOS_ID = 1  # appended by the model, never by encode
N_SPECIAL = 2  # real symbols start at this id

ON_UNKNOWN = ("error", "drop")


class UnknownSymbolError(ValueError):
    """Text holds symbols the tokenizer's inventory does not contain."""

    def __init__(self, message: str, symbols: list[str]):
        super().__init__(message)
        self.symbols = symbols


class EmptyTextError(ValueError):
    """Text has nothing speakable (empty, whitespace, punctuation or only unknown symbols)."""


# ---------------------------------------------------------------------------
# Normalisation

_QUOTES = str.maketrans({
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u0060\u00b4", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2043", "-"),
})

# Expanded only with their period, so "dr" or "st" inside words are untouched.
# "St." is read as "saint" (the street reading needs context we do not have).
_ABBREVIATIONS = {
    "mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor", "st": "saint",
    "jr": "junior", "sr": "senior", "prof": "professor", "mt": "mount",
    "capt": "captain", "col": "colonel", "gen": "general", "lt": "lieutenant",
    "sgt": "sergeant", "gov": "governor", "rev": "reverend", "hon": "honorable",
    "ave": "avenue", "co": "company", "ltd": "limited", "inc": "incorporated",
    "dept": "department", "approx": "approximately", "vs": "versus", "etc": "et cetera",
}
_ABBREVIATION_RE = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.", re.IGNORECASE)
_LATIN_RE = re.compile(r"\b(e\.g|i\.e)\.", re.IGNORECASE)
_LATIN = {"e.g": "for example", "i.e": "that is"}
_NUMBER_ABBREV_RE = re.compile(r"\bno\.(?=\s*\d)", re.IGNORECASE)

_CURRENCIES = {  # symbol: singular, plural, hundredth singular, hundredth plural
    "$": ("dollar", "dollars", "cent", "cents"),
    "\u00a3": ("pound", "pounds", "penny", "pence"),
    "\u20ac": ("euro", "euros", "cent", "cents"),
}
_CURRENCY_RE = re.compile(
    r"([$\u00a3\u20ac])(\d+)(?:\.(\d+))?(\s+(?:thousand|million|billion|trillion)\b)?",
    re.IGNORECASE,
)
# E-mail addresses and URLs are read symbol by symbol ("jane dot doe at example dot org").
_EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A URL has a scheme or "www.", or its host ends in a common top-level domain (none
# of them a common English word, so "ended.It" is no URL).
_URL_TLDS = "com|org|net|edu|gov|mil|int|io|ai|co|uk|de|fr|eu|ca|au|jp|info|biz|dev"
_URL_RE = re.compile(
    r"\b(?:(?:https?|ftp)://|www\.)\S+"
    rf"|\b[\w-]+(?:\.[\w-]+)*\.(?:{_URL_TLDS})\b(?:/\S*)?",
    re.IGNORECASE,
)
_URL_PREFIX_RE = re.compile(r"^(?:(?:https?|ftp)://)?(?:www\.)?", re.IGNORECASE)
_URL_TRAILING = ".,;:!?'\")]"  # sentence punctuation after a URL, not part of it
_URL_SYMBOLS = {
    ".": "dot", "/": "slash", "@": "at", "-": "dash", "_": "underscore", ":": "colon",
    "?": "question mark", "=": "equals", "&": "and", "#": "hash", "~": "tilde",
    "+": "plus", "%": "percent",
}
_URL_SYMBOL_RE = re.compile("[" + re.escape("".join(_URL_SYMBOLS)) + "]")

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
# US order only: "03/12/2024" is March twelfth. A two-digit year is said as written.
_US_DATE_RE = re.compile(r"(?<![\w/])(?P<month>\d{1,2})/(?P<day>\d{1,2})/(?P<year>\d{4}|\d{2})"
                         r"(?![\w/])")
_ISO_DATE_RE = re.compile(r"(?<![\w-])(?P<year>\d{4})([-/])(?P<month>\d{1,2})\2(?P<day>\d{1,2})"
                          r"(?![\w-])")
# "10:30", "3pm", "10:30 a.m."; the lookahead keeps plain numbers out.
_TIME_RE = re.compile(
    r"(?<![\w:.])(?P<hour>\d{1,2})(?=:\d\d|\s*[ap]\.?m\b)"
    r"(?::(?P<minute>\d\d)(?![\d:]))?"
    r"(?:\s*(?P<meridiem>[ap])\.?m\b(?P<period>\.?))?",
    re.IGNORECASE,
)
# espeak reads "a m" with the article "a" (schwa); "eh m" gets the letter names.
_MERIDIEM_WORDS = {"a": "eh m", "p": "p m"}
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_MINUS_RE = re.compile(r"(?<![\w.-])-(?=\d)")
_NUMBER_RE = re.compile(r"(\d+)(st|nd|rd|th)\b|\d+\.\d+|\d+", re.IGNORECASE)
_MAX_CARDINAL_DIGITS = 15  # longer digit runs (ids, phone numbers) are read digit by digit
_WHITESPACE_RE = re.compile(r"\s+")


def _expand(match: re.Match[str], words: str) -> str:
    """``words`` for an abbreviation match, capitalised like it; a final period stays
    because it also ends the sentence."""
    if match.group(0)[0].isupper():
        words = words.capitalize()
    return words + "." if not match.string[match.end():].strip() else words


def _currency(match: re.Match[str]) -> str:
    one, many, cent, cents = _CURRENCIES[match.group(1)]
    whole, fraction, scale = match.group(2), match.group(3), match.group(4)
    if scale:  # "$2.5 million" -> "2.5 million dollars"
        amount = whole + ("." + fraction if fraction else "")
        return f"{amount}{scale} {many}"
    words = f"{whole} {one if whole == '1' else many}"
    if fraction is None:
        return words
    if len(fraction) != 2:
        return f"{whole}.{fraction} {many}"
    return words + f" and {int(fraction)} {cent if fraction == '01' else cents}"


def _spell_symbols(text: str) -> str:
    """``text`` with the symbols of an address said as words."""
    return _WHITESPACE_RE.sub(" ", _URL_SYMBOL_RE.sub(lambda m: f" {_URL_SYMBOLS[m.group(0)]} ",
                                                      text)).strip()


def _url(match: re.Match[str]) -> str:
    url = match.group(0)
    core = url.rstrip(_URL_TRAILING)
    # Listeners need neither the scheme, "www." nor a final slash.
    address = _URL_PREFIX_RE.sub("", core).rstrip("/")
    return _spell_symbols(address) + url[len(core):]


def _two_digit_words(digits: str) -> str:
    """"05" -> "oh five", "24" -> "twenty-four" (minutes, short years)."""
    if digits[0] == "0":
        return f"oh {num2words(int(digits[1]))}"
    return num2words(int(digits))


def _date(match: re.Match[str]) -> str:
    """"December third, twenty twenty-four"; an impossible date is left to the number rules."""
    year, month, day = match["year"], int(match["month"]), int(match["day"])
    try:  # a two-digit year is checked as 20yy: only February 29 depends on it
        datetime.date(int(year) + (2000 if len(year) == 2 else 0), month, day)
    except ValueError:
        return match.group(0)
    if len(year) == 2:
        year_words = _two_digit_words(year)
    else:  # num2words writes 1905 as "nineteen oh-five"; espeak pauses at the hyphen
        year_words = num2words(int(year), to="year").replace("oh-", "oh ")
    return f"{_MONTHS[month - 1]} {num2words(day, to='ordinal')}, {year_words}"


def _time(match: re.Match[str]) -> str:
    """"ten thirty", "nine oh five", "seven o'clock", "three p m"; anything that is no
    clock time is left to the number rules."""
    hour, minute, meridiem = int(match["hour"]), match["minute"], match["meridiem"]
    valid_hour = 1 <= hour <= 12 if meridiem else hour <= 23
    if not (minute or meridiem) or not valid_hour or (minute and int(minute) > 59):
        return match.group(0)
    words = num2words(hour)
    if minute and minute != "00":
        words += " " + _two_digit_words(minute)
    elif not meridiem:  # 24-hour full hours are "nineteen hundred"
        words += " o'clock" if 1 <= hour <= 12 else " hundred"
    if meridiem:
        words += " " + _MERIDIEM_WORDS[meridiem.lower()]
        # The period of "p.m." also ends a sentence when one ends or a new one starts.
        rest = match.string[match.end():]
        if match["period"] and (not rest.strip() or re.match(r"\s+[A-Z]", rest)):
            words += "."
    return words


def _number_words(match: re.Match[str]) -> str:
    token = match.group(0)
    if match.group(1):
        words = num2words(int(match.group(1)), to="ordinal")
    elif "." in token:
        whole, fraction = token.split(".")
        words = f"{num2words(int(whole))} point " + " ".join(num2words(int(d)) for d in fraction)
    elif len(token) > _MAX_CARDINAL_DIGITS or (len(token) > 1 and token[0] == "0"):
        words = " ".join(num2words(int(d)) for d in token)
    else:
        words = num2words(int(token))
    # num2words writes "one thousand, two hundred": that comma is not a pause.
    words = words.replace(",", "")
    # "mp3" -> "mp three", "10am" -> "ten am": keep number words apart from letters.
    text, start, end = match.string, match.start(), match.end()
    if start > 0 and text[start - 1].isalnum():
        words = " " + words
    if end < len(text) and text[end].isalnum():
        words += " "
    return words


def normalize_text(text: str) -> str:
    """Text as it should be spoken (US English): NFKC, ASCII quotes and dashes;
    e-mail addresses and URLs read symbol by symbol without scheme or "www."
    ("jane dot doe at example dot org", "example dot com slash path"); abbreviations,
    ``&``, ``%``; dates in US month/day/year or ISO year-month-day order ("12/03/2024",
    "2024-12-03" -> "December third, twenty twenty-four"; "12/3/24" -> "December third,
    twenty-four"); clock times ("9:05" -> "nine oh five", "7:00" -> "seven o'clock",
    "3pm" -> "three p m", "10:30 a.m." -> "ten thirty eh m"); currency ($ £ €) and
    numbers (cardinals, decimals, ordinals; years outside dates as cardinals) spelled
    out, whitespace collapsed. Impossible dates and times are read as plain numbers.
    Case and the punctuation ``, . ! ? ; : ' - "`` are kept."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    # Addresses first: their dots, digits and "co." must not meet the rules below.
    text = _EMAIL_RE.sub(lambda m: _spell_symbols(m.group(0)), text)
    text = _URL_RE.sub(_url, text)
    text = _LATIN_RE.sub(lambda m: _expand(m, _LATIN[m.group(1).lower()]), text)
    text = _NUMBER_ABBREV_RE.sub(lambda m: _expand(m, "number"), text)
    text = _ABBREVIATION_RE.sub(lambda m: _expand(m, _ABBREVIATIONS[m.group(1).lower()]), text)
    text = text.replace("&", " and ").replace("%", " percent")
    text = _THOUSANDS_RE.sub("", text)
    # Before the number rule, which would read "12/03" as "twelve/zero three".
    text = _US_DATE_RE.sub(_date, text)
    text = _ISO_DATE_RE.sub(_date, text)
    text = _TIME_RE.sub(_time, text)
    text = _CURRENCY_RE.sub(_currency, text)
    text = _MINUS_RE.sub("minus ", text)
    text = _NUMBER_RE.sub(_number_words, text)
    return _WHITESPACE_RE.sub(" ", text).strip()


# ---------------------------------------------------------------------------
# Checks on what users pass

# English read speech runs at about 2-4 words/s; the bounds are generous so that only
# a transcript that cannot be what the recording says is flagged.
_MIN_WORDS_PER_SECOND = 1.0
_MAX_WORDS_PER_SECOND = 6.0
_PROMPT_SILENCE_S = 1.0  # leading and trailing silence a prompt may hold
_WORD_RE = re.compile(r"\w+(?:'\w+)*")


def describe_symbols(symbols: Iterable[str]) -> str:
    """Symbols for a message, each with its code points: ``'r' (U+0072), '中' (U+4E2D)``."""
    return ", ".join(f"{s!r} ({' '.join(f'U+{ord(c):04X}' for c in s)})" for s in symbols)


def _is_silent(char: str) -> bool:
    """Invisible format characters (zero-width joiner, direction marks, variation
    selectors of emoji): nothing is said for them."""
    return (unicodedata.category(char) == "Cf"
            or unicodedata.name(char, "").startswith("VARIATION SELECTOR"))


def _is_speakable_folded(char: str) -> bool:
    """Whether ``char``, already NFKC-normalised and folded, is in the speakable set."""
    if char.isascii():
        return char.isprintable() or char.isspace()
    if unicodedata.category(char).startswith("L"):
        return unicodedata.name(char, "").startswith("LATIN ")
    return (char.isspace() or unicodedata.category(char) == "Nd" or char in _CURRENCIES
            or "\u0300" <= char <= "\u036f")  # combining accents of Latin letters


def _is_unspeakable(char: str) -> bool:
    folded = unicodedata.normalize("NFKC", char).translate(_QUOTES)
    return not _is_silent(char) and not all(_is_speakable_folded(c) for c in folded)


def unspeakable_characters(text: str) -> list[str]:
    """The distinct characters of ``text``, in order of first appearance, that an English
    voice cannot speak sensibly (espeak says "Chinese letter" for 中 and an emoji's name).

    A character is speakable when its NFKC form, with curly quotes and dashes folded to
    ASCII as :func:`normalize_text` does, consists only of printable ASCII or whitespace,
    Latin letters (é, ü, ß), combining accents (U+0300-U+036F), decimal digits, and the
    currency signs £ €. So curly quotes, dashes, "…", full-width letters, "²" and "™"
    are speakable; letters of other scripts (CJK, Cyrillic, Arabic, Greek, ...), emoji
    and other symbols (categories So, Sk, Sm, e.g. "°", "•"), other punctuation ("¿"),
    control, private-use and unassigned characters are not. Invisible format characters
    (zero-width joiner, variation selectors) are never reported.
    """
    return [c for c in dict.fromkeys(text) if _is_unspeakable(c)]


def prompt_transcript_mismatch(transcript: str, prompt_seconds: float) -> str | None:
    """A one-sentence warning when ``transcript`` cannot be what a prompt recording of
    ``prompt_seconds`` says, None when it is plausible. The model speaks aloud the part
    of a prompt transcript its audio lacks, so a mismatch must be caught.

    Words are counted in the normalised transcript (so "$5" is two words). Flagged:
    more than 6 words per second of audio, or fewer than 1 word per second of audio
    beyond 1 s of allowed silence (and an empty transcript). Raises ValueError unless
    ``prompt_seconds`` is positive and finite.
    """
    if not 0 < prompt_seconds < math.inf:
        raise ValueError(f"prompt_seconds must be positive and finite, got {prompt_seconds}")
    words = len(_WORD_RE.findall(normalize_text(transcript)))
    if words > _MAX_WORDS_PER_SECOND * prompt_seconds:
        advice = "pass the transcript of exactly what the prompt wav says, and nothing more"
    elif words == 0 or words < _MIN_WORDS_PER_SECOND * (prompt_seconds - _PROMPT_SILENCE_S):
        advice = ("pass the transcript of everything the prompt wav says, or trim the wav "
                  "to the words transcribed")
    else:
        return None
    return (f"the prompt is {prompt_seconds:.1f} s long but its transcript has {words} "
            f"word{'' if words == 1 else 's'} ({words / prompt_seconds:.1f} words/s; read "
            f"speech is about 2-4 words/s); {advice}")


# ---------------------------------------------------------------------------
# Interface


class Tokenizer(ABC):
    """Text -> token ids in ``[N_SPECIAL, vocab_size)``; ids 0 and 1 are PAD and EOS."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Embedding rows the model needs, PAD and EOS included."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable dict from which :func:`tokenizer_from_spec` rebuilds it exactly."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: dict[str, Any]) -> Tokenizer:
        """The tokenizer described by ``spec`` (as written by :meth:`spec`)."""

    @classmethod
    @abstractmethod
    def fit(cls, texts: Iterable[str], **options: Any) -> Tokenizer:
        """A tokenizer whose inventory or model is learned from the corpus ``texts``."""

    @abstractmethod
    def symbols_of(self, text: str) -> list[str]:
        """The symbol sequence of normalised ``text``, known to the inventory or not."""

    @abstractmethod
    def _id_of(self, symbol: str) -> int | None:
        """The id of ``symbol``, None when it is not in the inventory."""

    def encode(self, text: str, on_unknown: str = "error") -> list[int]:
        """Token ids of ``text`` (normalised first), without EOS.

        ``on_unknown="error"`` raises :class:`UnknownSymbolError` for symbols outside the
        inventory; ``"drop"`` leaves them out with a warning. Raises
        :class:`EmptyTextError` when nothing speakable remains.
        """
        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown must be one of {ON_UNKNOWN}, got {on_unknown!r}")
        if not text or not text.strip():
            raise EmptyTextError(f"text is empty or whitespace only ({text!r}); "
                                 f"pass words to speak")
        symbols = self.symbols_of(text)
        ids = [self._id_of(s) for s in symbols]
        unknown = sorted({s for s, i in zip(symbols, ids) if i is None})
        if unknown and on_unknown == "error":
            raise UnknownSymbolError(
                f"the {self.kind} tokenizer does not know {describe_symbols(unknown)} in "
                f"{text!r} (they were not in its training corpus); pass on_unknown='drop' to "
                f"leave them out, or rewrite the text",
                unknown,
            )
        if unknown:
            warnings.warn(f"{self.kind} tokenizer dropped unknown symbols "
                          f"{describe_symbols(unknown)} from {text!r}", stacklevel=2)
        kept = [s for s, i in zip(symbols, ids) if i is not None]
        # Punctuation, spaces and word markers alone give the model nothing to say.
        if not any(c.isalnum() for s in kept for c in s):
            dropped = " after dropping unknown symbols" if unknown else ""
            raise EmptyTextError(f"nothing speakable is left of {text!r}{dropped}; "
                                 f"pass words to speak")
        return [i for i in ids if i is not None]

    def encode_batch(self, texts: Iterable[str], on_unknown: str = "error") -> list[list[int]]:
        """:meth:`encode` of each text."""
        return [self.encode(t, on_unknown) for t in texts]


# ---------------------------------------------------------------------------
# Symbol-inventory kinds: chars and phonemes


class _InventoryTokenizer(Tokenizer):
    """A fixed list of symbols; symbol k has id ``N_SPECIAL + k``."""

    def __init__(self, symbols: Iterable[str]):
        self.symbols = list(symbols)
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"{self.kind} inventory has duplicate symbols")
        self._ids = {s: N_SPECIAL + k for k, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + len(self.symbols)

    def _id_of(self, symbol: str) -> int | None:
        return self._ids.get(symbol)

    @staticmethod
    def _inventory(kind: str, symbol_lists: Iterable[list[str]]) -> list[str]:
        seen = sorted({s for symbols in symbol_lists for s in symbols})
        if not seen:
            raise ValueError(f"the corpus gave the {kind} tokenizer no symbols; "
                             f"pass non-empty texts")
        return seen


class CharTokenizer(_InventoryTokenizer):
    """Lower-cased normalised graphemes; the inventory is every character of the corpus."""

    kind = "chars"

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "symbols": list(self.symbols)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CharTokenizer:
        return cls(spec["symbols"])

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharTokenizer:
        tok = cls([])
        return cls(cls._inventory(cls.kind, (tok.symbols_of(t) for t in texts)))

    def symbols_of(self, text: str) -> list[str]:
        return list(normalize_text(text).lower())


# espeak-ng keeps global state and its backend takes ~0.4 s to start: one per language
# per process, used under a lock.
_espeak_backends: dict[str, Any] = {}
_espeak_lock = threading.Lock()


def _phonemize(text: str, language: str) -> str:
    import espeakng_loader
    from phonemizer.backend import EspeakBackend
    from phonemizer.backend.espeak.wrapper import EspeakWrapper
    from phonemizer.punctuation import Punctuation
    from phonemizer.separator import Separator

    with _espeak_lock:
        backend = _espeak_backends.get(language)
        if backend is None:
            # The library and its data ship in the espeakng-loader wheel: no system espeak.
            EspeakWrapper.set_library(espeakng_loader.get_library_path())
            EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
            backend = EspeakBackend(
                language,
                # espeak silently drops '-'; a dash is a prosody cue, so keep it as a mark.
                punctuation_marks=Punctuation.default_marks() + "-",
                preserve_punctuation=True,
                with_stress=True,
                language_switch="remove-flags",
            )
            _espeak_backends[language] = backend
        # One text per call: phonemizer joins a list by lines and misaligns
        # punctuation-only entries, and batching saves nothing (~0.2 ms a sentence).
        (phones,) = backend.phonemize([text], separator=Separator(phone="", word=" ", syllable=""),
                                      strip=True, njobs=1)
    return _WHITESPACE_RE.sub(" ", phones).strip()


class PhonemeTokenizer(_InventoryTokenizer):
    """espeak-ng IPA with stress marks and punctuation; one code point per symbol,
    a space between words."""

    kind = "phonemes"

    def __init__(self, symbols: Iterable[str], language: str = "en-us"):
        super().__init__(symbols)
        self.language = language

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "language": self.language, "symbols": list(self.symbols)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PhonemeTokenizer:
        return cls(spec["symbols"], language=spec["language"])

    @classmethod
    def fit(cls, texts: Iterable[str], language: str = "en-us") -> PhonemeTokenizer:
        tok = cls([], language)
        return cls(cls._inventory(cls.kind, (tok.symbols_of(t) for t in texts)), language)

    def symbols_of(self, text: str) -> list[str]:
        normalized = normalize_text(text)
        return list(_phonemize(normalized, self.language)) if normalized else []


# ---------------------------------------------------------------------------
# Sub-word kind

_BPE_PAD, _BPE_EOS, _BPE_UNK = "<pad>", "<eos>", "<unk>"
_BPE_FIRST_ID = N_SPECIAL + 1  # after <unk>: specials typed in the text are unknown symbols
# Prosodic punctuation becomes its own token; apostrophes and hyphens stay inside words.
_BPE_ISOLATED = r'[,.!?;:"]'


class BpeTokenizer(Tokenizer):
    """Hugging Face BPE over lower-cased normalised text (the paper's sub-word option).

    Words carry a leading ``▁`` (word boundary) and prosodic punctuation is its own
    token. The BPE alphabet is the corpus characters; any other character becomes
    an unknown symbol (error or drop, as for the other kinds), never a byte fallback,
    so the model only sees tokens it was trained on. PAD, EOS and ``<unk>`` are the
    BPE model's ids 0, 1, 2, so ids need no offset; 2 is never emitted.
    """

    kind = "bpe"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer as HfTokenizer

        self.tokenizer_json = tokenizer_json
        self._hf = HfTokenizer.from_str(tokenizer_json)
        specials = [self._hf.token_to_id(t) for t in (_BPE_PAD, _BPE_EOS, _BPE_UNK)]
        if specials != [PAD_ID, EOS_ID, N_SPECIAL]:
            raise ValueError(f"bpe tokenizer must map {_BPE_PAD}, {_BPE_EOS}, {_BPE_UNK} to ids "
                             f"{PAD_ID}, {EOS_ID}, {N_SPECIAL}, got {specials}; build it with "
                             f"build_tokenizer('bpe', ...)")

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer_json": self.tokenizer_json}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BpeTokenizer:
        return cls(spec["tokenizer_json"])

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int = 512) -> BpeTokenizer:
        """A BPE of at most ``vocab_size`` tokens (fewer when the corpus runs out of merges)."""
        from tokenizers import Regex, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HfTokenizer

        corpus = sorted(normalize_text(t).lower() for t in texts)
        corpus = [t for t in corpus if t]
        if not corpus:
            raise ValueError("the corpus gave the bpe tokenizer no text; pass non-empty texts")
        hf = HfTokenizer(models.BPE(unk_token=_BPE_UNK))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(),
            pre_tokenizers.Split(Regex(_BPE_ISOLATED), behavior="isolated"),
        ])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      special_tokens=[_BPE_PAD, _BPE_EOS, _BPE_UNK])
        hf.train_from_iterator(corpus, trainer=trainer)
        return cls(hf.to_str())

    def symbols_of(self, text: str) -> list[str]:
        normalized = normalize_text(text).lower()
        enc = self._hf.encode(normalized, add_special_tokens=False)
        # An <unk> token stands for the characters it replaced: report those.
        return [normalized[a:b] if tok == _BPE_UNK else tok
                for tok, (a, b) in zip(enc.tokens, enc.offsets)]

    def _id_of(self, symbol: str) -> int | None:
        i = self._hf.token_to_id(symbol)
        return None if i is None or i < _BPE_FIRST_ID else i


# ---------------------------------------------------------------------------
# Construction

_KINDS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (CharTokenizer, PhonemeTokenizer, BpeTokenizer)
}


def _tokenizer_class(kind: Any, where: str) -> type[Tokenizer]:
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r} {where}; known kinds are "
                         f"{sorted(_KINDS)} (a newer melle-rt may know more)")
    return _KINDS[kind]


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """The tokenizer described by ``spec`` (from :meth:`Tokenizer.spec`, e.g. in a config)."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a tokenizer spec must be a dict with a 'kind' key, got {spec!r}")
    return _tokenizer_class(spec["kind"], "in spec").from_spec(spec)


def build_tokenizer(kind: str, texts: Iterable[str], **options: Any) -> Tokenizer:
    """A ``kind`` tokenizer fitted on the corpus ``texts``; the result does not depend on
    corpus order. Options: phonemes ``language="en-us"``; bpe ``vocab_size=512``."""
    return _tokenizer_class(kind, "requested").fit(texts, **options)
