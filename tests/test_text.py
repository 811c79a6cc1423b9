"""Text front end: normalisation, the three tokenizer kinds, specs and errors."""

import json
import subprocess
import sys
import warnings

import pytest

from melle.core.text import (
    EOS_ID,
    N_SPECIAL,
    PAD_ID,
    EmptyTextError,
    Tokenizer,
    UnknownSymbolError,
    build_tokenizer,
    describe_symbols,
    normalize_text,
    prompt_transcript_mismatch,
    tokenizer_from_spec,
    unspeakable_characters,
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
    ("mp3 at 10am", "mp three at ten eh m"),
    ("1st, 2nd, 23rd and 101st", "first, second, twenty-third and one hundred and first"),
])
def test_normalize_numbers(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("12/03/2024", "December third, twenty twenty-four"),
    ("2024-12-03", "December third, twenty twenty-four"),
    ("2024/1/5", "January fifth, twenty twenty-four"),
    ("on 12/3/24.", "on December third, twenty-four."),  # two-digit year said as written
    ("1/1/1905 or 3/01/05", "January first, nineteen oh five or March first, oh five"),
    ("2/29/24", "February twenty-ninth, twenty-four"),
    # Impossible dates are plain numbers, and never an error.
    ("13/45/2024", "thirteen/forty-five/two thousand and twenty-four"),
    ("2/29/2023", "two/twenty-nine/two thousand and twenty-three"),
])
def test_normalize_dates(text, expected):
    assert normalize_text(text) == expected


def test_date_is_not_read_as_numbers():
    spoken = normalize_text("Due 12/03/2024.")
    assert "/" not in spoken and "zero three" not in spoken
    assert spoken == "Due December third, twenty twenty-four."


@pytest.mark.parametrize("text, expected", [
    ("10:30", "ten thirty"),
    ("at 9:05", "at nine oh five"),
    ("7:00 sharp", "seven o'clock sharp"),
    ("19:00", "nineteen hundred"),
    ("3pm", "three p m"),
    ("at 3 p.m. on Monday", "at three p m on Monday"),
    ("at 3 p.m.", "at three p m."),  # that period also ends the sentence
    ("at 3 p.m. Then", "at three p m. Then"),
    ("10:30 AM, or 7:00 pm", "ten thirty eh m, or seven p m"),
    # Not clock times: left to the number rules.
    ("13pm", "thirteen pm"),
    ("25:00", "twenty-five:zero zero"),
])
def test_normalize_times(text, expected):
    assert normalize_text(text) == expected


def test_meridiem_is_phonemized_as_letter_names():
    tok = build_tokenizer("phonemes", CORPUS)
    assert "".join(tok.symbols_of("at 3 a.m.")) == "æt θɹˈiː ˈeɪ ˈɛm."
    assert "".join(tok.symbols_of("at 3pm")) == "æt θɹˈiː pˈiː ˈɛm"


@pytest.mark.parametrize("text, expected", [
    ("https://www.example.com/path", "example dot com slash path"),
    ("See http://example.org/a_b?q=1.", "See example dot org slash a underscore b "
                                        "question mark q equals one."),
    ("(www.melle-rt.dev/)", "(melle dash rt dot dev)"),
    ("Visit example.co.uk today", "Visit example dot co dot uk today"),
    ("jane.doe@example.org", "jane dot doe at example dot org"),
    ("Mail jane.doe@example.org.", "Mail jane dot doe at example dot org."),
    ("I ended.It was", "I ended.It was"),  # no top-level domain: no URL
])
def test_normalize_urls_and_emails(text, expected):
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


@pytest.mark.parametrize("text, expected", [
    ("Chinese \u4e2d\u6587 and \U0001f642", ["\u4e2d", "\u6587", "\U0001f642"]),
    ("\U0001f642a\u4e2d\U0001f642", ["\U0001f642", "\u4e2d"]),  # distinct, first-seen order
    ("Caf\u00e9 \u00fcber \u201cquoted\u201d \u2018it\u2019s\u2019 \u2014 na\u00efve\u2026", []),
    ("e\u0301 \uff26ull \u2122 x\u00b2 \u00a35 \u00df", []),  # accent, full-width, NFKC
    ("10 $ % & @ # + = ~ <>\t\n", []),
    ("\u041f\u0440\u0438", ["\u041f", "\u0440", "\u0438"]),  # Cyrillic
    ("\u0645\u0631\u062d\u0628\u0627", ["\u0645", "\u0631", "\u062d", "\u0628", "\u0627"]),
    ("\u03c0 \u00b0 \u2022 \u00bf \x00 \ue000", ["\u03c0", "\u00b0", "\u2022", "\u00bf",
                                                 "\x00", "\ue000"]),
    ("\u2764\ufe0f \U0001f468\u200d\U0001f467", ["\u2764", "\U0001f468", "\U0001f467"]),
])
def test_unspeakable_characters(text, expected):
    assert unspeakable_characters(text) == expected


def test_describe_symbols():
    assert describe_symbols(["\u4e2d", "\U0001f642", "ab"]) == \
        "'\u4e2d' (U+4E2D), '\U0001f642' (U+1F642), 'ab' (U+0061 U+0062)"


@pytest.mark.parametrize("transcript, seconds", [
    ("Hello there, how are you today?", 2.5),
    ("Hi.", 1.5),  # short prompts may be mostly silence
    ("one two three " * 6, 3.0),  # 6 words/s: the upper bound
    ("It cost $5.", 4.0),  # "It cost five dollars": 4 words
])
def test_prompt_transcript_plausible(transcript, seconds):
    assert prompt_transcript_mismatch(transcript, seconds) is None


@pytest.mark.parametrize("transcript, seconds, expected", [
    ("one two three four five six seven eight nine ten " * 4, 3.0,
     "the prompt is 3.0 s long but its transcript has 40 words (13.3 words/s; read speech "
     "is about 2-4 words/s); pass the transcript of exactly what the prompt wav says, and "
     "nothing more"),
    ("one two three " * 6 + "four", 3.0,
     "the prompt is 3.0 s long but its transcript has 19 words (6.3 words/s; read speech "
     "is about 2-4 words/s); pass the transcript of exactly what the prompt wav says, and "
     "nothing more"),
    ("Hello.", 12.0,
     "the prompt is 12.0 s long but its transcript has 1 word (0.1 words/s; read speech "
     "is about 2-4 words/s); pass the transcript of everything the prompt wav says, or "
     "trim the wav to the words transcribed"),
    (" ... ", 0.5,
     "the prompt is 0.5 s long but its transcript has 0 words (0.0 words/s; read speech "
     "is about 2-4 words/s); pass the transcript of everything the prompt wav says, or "
     "trim the wav to the words transcribed"),
])
def test_prompt_transcript_mismatch(transcript, seconds, expected):
    assert prompt_transcript_mismatch(transcript, seconds) == expected


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_prompt_transcript_bad_duration(seconds):
    with pytest.raises(ValueError, match="prompt_seconds"):
        prompt_transcript_mismatch("hello", seconds)


def test_specials_match_config():
    from melle.core.config import N_SPECIAL_TOKENS

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
        "import sys, melle.core.text as t\n"
        "for kind in ('chars', 'phonemes', 'bpe'):\n"
        "    t.build_tokenizer(kind, ['hello world']).encode('hello')\n"
        "assert 'torch' not in sys.modules, 'melle.core.text imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
