"""Text front end: normalisation, the three tokenizer kinds, specs and errors."""

import json
import subprocess
import sys
import warnings

import pytest

from melle.text import (
    EOS_ID,
    N_SPECIAL,
    PAD_ID,
    EmptyTextError,
    Tokenizer,
    UnknownSymbolError,
    build_tokenizer,
    normalize_text,
    tokenizer_from_spec,
)

CORPUS = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog!",
    "How are you today? I'm fine; thanks: really - fine.",
]
KINDS = ["chars", "phonemes", "bpe"]


@pytest.fixture(scope="module", params=KINDS)
def tok(request) -> Tokenizer:
    return build_tokenizer(request.param, CORPUS)


def _unknown_text(tok: Tokenizer) -> tuple[str, list[str]]:
    """A text with symbols outside tok's inventory, and those symbols."""
    if tok.kind != "phonemes":
        return "hello, ждать", sorted(set("ждать"))
    # espeak reads any letter, so phoneme unknowns are IPA symbols the corpus lacks.
    text = "hello, noisy water"
    inventory = set(tok.spec()["symbols"])
    unknown = sorted({s for s in tok.symbols_of(text) if s not in inventory})
    assert unknown, "the test text must hold symbols the corpus lacks"
    return text, unknown


@pytest.mark.parametrize("text, expected", [
    ("I have 3 cats.", "I have three cats."),
    ("on the 21st and 2nd", "on the twenty-first and second"),
    ("pi is 3.14, not 0.05", "pi is three point one four, not zero point zero five"),
    ("1,000,000 people", "one million people"),
    ("in 1999", "in one thousand nine hundred and ninety-nine"),
    ("-5 degrees", "minus five degrees"),
    ("50% & more", "fifty percent and more"),
    ("$3.50 or $1 or $2.5 million", "three dollars and fifty cents or one dollar or "
                                    "two point five million dollars"),
    ("mp3 at 10am", "mp three at ten am"),
])
def test_normalize_numbers(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Dr. Smith met Mr. and Mrs. Jones.", "Doctor Smith met Mister and Missus Jones."),
    ("St. Paul, Prof. X vs. Gen. Y", "Saint Paul, Professor X versus General Y"),
    ("apples, pears, etc.", "apples, pears, et cetera."),
    ("fruit, e.g. apples", "fruit, for example apples"),
    ("No. 7 is here", "Number seven is here"),
    ("dry street", "dry street"),  # "dr"/"st" inside words are not abbreviations
])
def test_normalize_abbreviations(text, expected):
    assert normalize_text(text) == expected


def test_normalize_quotes_dashes_whitespace():
    assert normalize_text("\u201cHi\u201d \u2014 \u2018there\u2019") == "\"Hi\" - 'there'"
    assert normalize_text("  wait,\n\twhat?!  yes; no: it's -  fine. ") == \
        "wait, what?! yes; no: it's - fine."
    assert normalize_text("\uff46\uff55\uff4c\uff4c \u2026") == "full ..."  # NFKC


def test_specials_match_config():
    from melle.config import N_SPECIAL_TOKENS

    assert (PAD_ID, EOS_ID, N_SPECIAL) == (0, 1, N_SPECIAL_TOKENS)


def test_spec_round_trip(tok):
    spec = json.loads(json.dumps(tok.spec()))
    again = tokenizer_from_spec(spec)
    assert again.kind == tok.kind and again.vocab_size == tok.vocab_size
    assert again.spec() == tok.spec()
    for text in CORPUS + ["Hello, fox!"]:
        assert again.encode(text) == tok.encode(text)


def test_ids_in_range(tok):
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids and all(N_SPECIAL <= i < tok.vocab_size for i in ids)
        assert EOS_ID not in ids  # the model appends EOS
    assert tok.encode_batch(CORPUS[:2]) == [tok.encode(t) for t in CORPUS[:2]]


def test_build_is_deterministic(tok):
    assert build_tokenizer(tok.kind, reversed(CORPUS)).spec() == tok.spec()


def test_phonemes_are_ipa():
    tok = build_tokenizer("phonemes", CORPUS)
    assert tok.spec()["language"] == "en-us"
    symbols = tok.symbols_of("Hello, world!")
    assert "h" in symbols and ("ə" in symbols or "l" in symbols)
    assert "ˈ" in symbols  # stress
    assert symbols[-1] == "!" and "," in symbols and " " in symbols
    assert all(len(s) == 1 for s in symbols)


def test_bpe_vocab_size_option():
    tok = build_tokenizer("bpe", CORPUS * 3, vocab_size=40)
    assert tok.vocab_size <= 40
    assert max(tok.encode(CORPUS[0])) < 40


def test_unknown_symbol_error_names_symbols(tok):
    text, unknown = _unknown_text(tok)
    with pytest.raises(UnknownSymbolError, match="on_unknown='drop'") as err:
        tok.encode(text)
    assert err.value.symbols == unknown
    for s in unknown:
        assert repr(s) in str(err.value)


def test_drop_warns_and_drops(tok):
    text, unknown = _unknown_text(tok)
    symbols = tok.symbols_of(text)
    with pytest.warns(UserWarning, match="dropped unknown symbols") as record:
        ids = tok.encode(text, on_unknown="drop")
    assert all(repr(s) in str(record[0].message) for s in unknown)
    assert len(ids) == len([s for s in symbols if s not in unknown])
    assert all(N_SPECIAL <= i < tok.vocab_size for i in ids)
    if tok.kind != "phonemes":
        with pytest.warns(UserWarning):
            assert tok.encode("helloж", on_unknown="drop") == tok.encode("hello")


@pytest.mark.parametrize("text", ["", "   \n\t", "...", " , ! "])
def test_empty_text(tok, text):
    with pytest.raises(EmptyTextError, match="speak"):
        tok.encode(text)


@pytest.mark.parametrize("kind", ["chars", "bpe"])  # espeak reads any letter as known IPA
def test_only_unknown_text(kind):
    tok = build_tokenizer(kind, CORPUS)
    with pytest.raises(UnknownSymbolError):
        tok.encode("ждать")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EmptyTextError, match="after dropping unknown symbols"):
            tok.encode("ждать!", on_unknown="drop")


def test_bad_on_unknown(tok):
    with pytest.raises(ValueError, match="on_unknown"):
        tok.encode("hello", on_unknown="ignore")


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'klingon'.*chars"):
        tokenizer_from_spec({"kind": "klingon", "symbols": []})
    with pytest.raises(ValueError, match="'kind'"):
        tokenizer_from_spec({"symbols": []})
    with pytest.raises(ValueError, match="unknown tokenizer kind 'words'"):
        build_tokenizer("words", CORPUS)


def test_empty_corpus():
    with pytest.raises(ValueError, match="corpus"):
        build_tokenizer("chars", ["", "  "])


def test_no_torch_import():
    code = (
        "import sys, melle.text as t\n"
        "for kind in ('chars', 'phonemes', 'bpe'):\n"
        "    t.build_tokenizer(kind, ['hello world']).encode('hello')\n"
        "assert 'torch' not in sys.modules, 'melle.text imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
