"""The quality benchmark's pure parts: WER normalisation and arithmetic, aggregation, the markdown table."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from melle_bench import quality
from melle_bench import quality_metrics as qm


def row(wer, sim=0.9, seconds=1.0, audio_seconds=2.0, **extra):
    return qm.Row(text="t", hypothesis="h", wer=wer, sim=sim, seconds=seconds, audio_seconds=audio_seconds,
                  extra=extra or None)


# -- normalisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("spoken, heard", [
    ("He was forty years old.", "He was 40 years old."),
    ("Twenty-one guns", "21 guns"),
    ("the twenty-first of May", "the 21st of May"),
    ("It's DONE!", "it's done"),
    ("Hello, world... (again)", "hello world again"),
    ("\u2018Quoted\u2019 words", "quoted words"),
    ("Mr. Smith", "mister smith"),
])
def test_normalisation_makes_equal_readings_equal(spoken, heard):
    assert qm.normalize_for_wer(spoken) == qm.normalize_for_wer(heard)
    assert qm.utterance_wer(spoken, heard) == 0.0


def test_normalisation_keeps_in_word_apostrophes_and_drops_quote_marks():
    assert qm.normalize_for_wer("'Don't,' she said; it's the dogs' bowl.") == "don't she said it's the dogs bowl"
    assert qm.normalize_for_wer("dont") != qm.normalize_for_wer("don't")


def test_normalisation_collapses_space_and_case():
    assert qm.normalize_for_wer("  The   CAT\tsat \n") == "the cat sat"


# -- per-utterance WER ------------------------------------------------------------------------


def test_substitution_deletion_insertion_counted_by_hand():
    ref = "the cat sat on the mat"  # 6 words
    sub = qm.word_errors(ref, "the dog sat on the mat")
    assert (sub.substitutions, sub.deletions, sub.insertions, sub.reference_words) == (1, 0, 0, 6)
    assert sub.wer == pytest.approx(1 / 6)
    dele = qm.word_errors(ref, "the cat sat on mat")
    assert (dele.substitutions, dele.deletions, dele.insertions) == (0, 1, 0)
    ins = qm.word_errors(ref, "the cat sat on the red mat")
    assert (ins.substitutions, ins.deletions, ins.insertions) == (0, 0, 1)
    mixed = qm.word_errors(ref, "a cat sat the mat today")  # the->a, -on, +today
    assert mixed.wer == pytest.approx(3 / 6)


def test_empty_hypothesis_is_one_and_insertions_can_exceed_it():
    assert qm.utterance_wer("two words", "") == 1.0
    assert qm.utterance_wer("two words", "  ,.  ") == 1.0
    assert qm.utterance_wer("hi", "hi there you all") == pytest.approx(3.0)


def test_empty_reference_is_an_error():
    with pytest.raises(ValueError, match="no words"):
        qm.utterance_wer("?!", "hello")


def test_wer_is_averaged_per_utterance_not_pooled():
    # One error in a 1-word sentence (100%), none in a 9-word one: per-utterance mean 50%, pooled 10%.
    rows = [row(qm.utterance_wer("yes", "no")), row(qm.utterance_wer("one two three four five six seven eight nine",
                                                                      "one two three four five six seven eight nine"))]
    assert qm.summarize(rows)["wer"] == pytest.approx(0.5)


# -- aggregation ------------------------------------------------------------------------------


def test_summary_means_and_pooled_rtf():
    s = qm.summarize([row(0.0, sim=0.8, seconds=1.0, audio_seconds=2.0),
                      row(0.5, sim=0.6, seconds=3.0, audio_seconds=2.0)])
    assert s["n"] == 2 and s["wer"] == pytest.approx(0.25) and s["sim"] == pytest.approx(0.7)
    assert s["rtf"] == pytest.approx(4.0 / 4.0) and s["audio_seconds"] == 4.0
    assert [r["wer"] for r in s["rows"]] == [0.0, 0.5]
    assert set(s["rows"][0]) >= {"text", "hypothesis", "wer", "sim", "seconds"}


def test_recordings_have_no_rtf_and_empty_systems_have_no_means():
    assert qm.summarize([row(0.0, seconds=None)])["rtf"] is None
    empty = qm.summarize([])
    assert empty["wer"] is None and empty["sim"] is None and empty["rtf"] is None


def test_report_structure_orders_systems_and_is_json():
    systems = {"ground_truth_vocoded": [row(0.1, seconds=0.2)], "ground_truth": [row(0.0, seconds=None)],
               "runtime": [row(0.3)], "teacher_forced": [row(0.1)], "reference": [row(0.2)]}
    prompted = {"flite-slt": qm.summarize_prompted({"audio": "p.wav", "text": "p"},
                                                   [row(0.0, sim=0.7, sim_reference_voice=0.4)])}
    report = qm.build_report(systems, prompted, {"seed": 0})
    assert list(report) == ["systems", "prompted", "config"]
    assert list(report["systems"]) == ["runtime", "reference", "teacher_forced", "ground_truth",
                                       "ground_truth_vocoded"]
    assert report["systems"]["runtime"]["wer"] == pytest.approx(0.3)
    assert report["prompted"]["flite-slt"]["sim_speaker"] == pytest.approx(0.7)
    assert report["prompted"]["flite-slt"]["sim_reference_voice"] == pytest.approx(0.4)
    assert json.loads(json.dumps(report)) == report


def test_wer_by_length_buckets_the_normalised_word_count():
    def said(text, wer):
        return qm.Row(text=text, hypothesis="", wer=wer, sim=0.9, seconds=1.0, audio_seconds=1.0)

    rows = [said("Hi.", 0.0),
            said("one two three four five six seven 8", 0.5),  # "8" -> "eight": 8 words
            said("one two three four five six seven eight 9", 0.25),  # 9 words
            said(" ".join(["word"] * 15), 1.0),
            said(" ".join(["word"] * 16), 0.75)]
    by_length = qm.wer_by_length(rows)
    assert list(by_length) == ["1-8", "9-15", "16+"]
    assert by_length["1-8"] == {"n": 2, "wer": pytest.approx(0.25)}
    assert by_length["9-15"] == {"n": 2, "wer": pytest.approx(0.625)}
    assert by_length["16+"] == {"n": 1, "wer": pytest.approx(0.75)}
    assert qm.summarize(rows)["wer_by_length"] == by_length
    assert qm.wer_by_length(rows[:1])["16+"] == {"n": 0, "wer": None}


def test_cosine_and_mean_embedding():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    assert qm.cosine(a, a * 3) == pytest.approx(1.0) and qm.cosine(a, b) == pytest.approx(0.0)
    mean = qm.mean_embedding([a, b / 2])
    assert np.linalg.norm(mean) == pytest.approx(1.0) and qm.cosine(mean, a) == pytest.approx(2 ** -0.5)


# -- markdown ---------------------------------------------------------------------------------


def test_markdown_table_renders_percentages_and_missing_values():
    systems = {"runtime": [row(0.25, sim=0.81234, seconds=1.0, audio_seconds=4.0)],
               "ground_truth": [row(0.0, sim=0.9, seconds=None)]}
    prompted = {"espeak-ng": qm.summarize_prompted({}, [row(1 / 3, sim=0.5, sim_reference_voice=0.6)])}
    md = qm.render_markdown(qm.build_report(systems, prompted, {"notes": ["a note"]}))
    lines = md.splitlines()
    assert "| runtime | 1 | 25.0 | 0.812 | 0.250 | 4.0 |" in lines
    assert "| ground_truth | 1 | 0.0 | 0.900 | - | 2.0 |" in lines
    assert "| espeak-ng | 1 | 33.3 | 0.500 | 0.600 |" in lines
    assert "- a note" in lines
    assert "| runtime | 25.0 (1) | - (0) | - (0) |" in lines
    header = lines.index("| system | n | WER % | SIM | RTF | audio s |")
    assert lines[header + 1].count("|") == lines[header].count("|")


def test_markdown_without_prompted_runs_has_no_speaker_table():
    md = qm.render_markdown(qm.build_report({"runtime": [row(0.0)]}, {}, {}))
    assert "Prompted" not in md


def test_cli_help_needs_no_whisper_or_speaker_encoder():
    probe = ("import sys, runpy; sys.argv = ['quality.py', '--help']\n"
             "try:\n    runpy.run_path('benchmarks/quality.py', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in ('faster_whisper', 'resemblyzer', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--ground-truth" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_cli_refuses_fewer_than_one_candidate(capsys):
    assert quality.parse_args(["--engine", "e", "--sentences", "s", "--candidates", "3"]).candidates == 3
    with pytest.raises(SystemExit):
        quality.parse_args(["--engine", "e", "--sentences", "s", "--candidates", "0"])
    assert "--candidates must be at least 1, got 0" in capsys.readouterr().err
