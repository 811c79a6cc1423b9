"""Nothing a user owns is destroyed, and every ordinary mistake gets one line and an exit code.

Each test runs a CLI as a user does (a subprocess from the repository root) and checks the
exit code, the one-line message, and that nothing outside the output changed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from melle.core.cli import ExitCode
from melle.core.manifest import EngineError
from melle_runtime.synthesizer import Synthesizer

ROOT = Path(__file__).resolve().parents[1]


def run(*args, stdin: str | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    """``python ARGS...`` from the repository root, as a user runs the tools."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes (plus every directory, as 'dir')."""
    tree = {}
    for path in sorted(root.rglob("*")):
        tree[str(path.relative_to(root))] = ("dir" if path.is_dir()
                                             else hashlib.sha256(path.read_bytes()).hexdigest())
    return tree


def assert_refused(done: subprocess.CompletedProcess, code: ExitCode, *words: str) -> None:
    """Exit ``code``, no traceback, and a last stderr line 'error: ...' containing ``words``."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    assert "error: " in last, last  # "error: ..." or argparse's "synth.py: error: ..."
    for word in words:
        assert word in last, (word, last)


# -- 1. data loss -------------------------------------------------------------------------------


def test_init_never_replaces_a_file_or_a_trained_checkpoint(tmp_path, tiny_checkpoint):
    notes = tmp_path / "README.md"
    notes.write_text("my notes\n")
    checkpoint = tmp_path / "trained"
    run("-m", "melle.init", "--preset", "tiny", "--out", checkpoint).check_returncode()
    (checkpoint / "TRAINING.txt").write_text("three days of training\n")
    before = snapshot(tmp_path)
    for out in (notes, checkpoint):
        done = run("-m", "melle.init", "--preset", "tiny", "--seed", "1", "--out", out)
        assert_refused(done, ExitCode.OUTPUT, str(out))
    assert snapshot(tmp_path) == before
    done = run("-m", "melle.init", "--preset", "tiny", "--seed", "1", "--out", checkpoint, "--force")
    assert done.returncode == 0, done.stderr  # the user said so
    assert not (checkpoint / "TRAINING.txt").exists()


def test_export_keeps_unrelated_files_and_never_replaces_its_input(tmp_path, tiny_checkpoint):
    folder = tmp_path / "some" / "dir"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me\n")
    checkpoint = tmp_path / "ckpt"
    run("-m", "melle.init", "--preset", "tiny", "--out", checkpoint).check_returncode()
    (checkpoint / "TRAINING.txt").write_text("how it was trained\n")
    before = snapshot(tmp_path)
    assert_refused(run("export/to_onnx.py", checkpoint, "--out", folder, "--vocoder", "none"),
                   ExitCode.OUTPUT, "not an engine directory", "--force")
    for force in ([], ["--force"]):  # not even --force lets an export erase its own checkpoint
        assert_refused(run("export/to_onnx.py", checkpoint, "--out", checkpoint, "--vocoder", "none", *force),
                       ExitCode.OUTPUT, "would replace the input")
        assert_refused(run("export/to_onnx.py", checkpoint, "--out", tmp_path, "--vocoder", "none", *force),
                       ExitCode.OUTPUT, "would replace the input")
    assert snapshot(tmp_path) == before


def test_export_may_replace_its_own_engine_but_not_files_added_to_it(tmp_path, tiny_checkpoint):
    from melle.core.cli import OutputError
    from melle_export.to_onnx import export

    engine = export(tiny_checkpoint(1), tmp_path / "engine", vocoder="none")
    export(tiny_checkpoint(2), engine, vocoder="none")  # a re-export replaces what an export wrote
    (engine / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
        export(tiny_checkpoint(1), engine, vocoder="none")
    assert (engine / "notes.txt").read_text() == "mine\n"


def test_synth_never_overwrites_without_being_told(voiced_engine, tmp_path):
    out = tmp_path / "speech.wav"
    out.write_bytes(b"a recording I made")
    before = snapshot(tmp_path)
    assert_refused(run("runtime/synth.py", "--engine", voiced_engine, "--text", "hi.", "--out", out),
                   ExitCode.OUTPUT, "exists", "--overwrite")
    assert snapshot(tmp_path) == before
    done = run("runtime/synth.py", "--engine", voiced_engine, "--text", "hi.", "--out", out, "--overwrite",
               "--max-seconds", "1")
    assert done.returncode == 0, done.stderr
    assert sf.info(out).format == "WAV"


# -- 2. long text ----------------------------------------------------------------------------


def test_long_text_without_punctuation_is_cut_to_fit_the_engine(tiny_checkpoint, tmp_path):
    from melle_export.to_onnx import export

    # The capacity bug: an engine exported for fewer positions than the model's table.
    engine = export(tiny_checkpoint(4), tmp_path / "engine", vocoder="hifigan-universal", max_len=120)
    synthesizer = Synthesizer(engine)
    assert synthesizer.backend.capacity == 120
    short = synthesizer.speak("hello there.", seed=0)
    assert len(short.pieces) == 1 and len(short.wav) > 0
    words = " ".join(["word"] * 150)  # no punctuation at all: far beyond 120 positions
    long = synthesizer.speak(words, seed=0)
    assert len(long.pieces) > 1
    assert " ".join(p.text for p in long.pieces) == words  # every word spoken, in order, once
    budget = synthesizer.piece_budget()
    assert all(len(synthesizer.tokenizer.encode(p.text)) <= budget for p in long.pieces)
    # What cannot be cut to fit is a clear error naming the capacity: here a 4 s prompt.
    t = np.arange(4 * 22050) / 22050
    sf.write(tmp_path / "long_prompt.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 22050)
    with pytest.raises(EngineError, match="of the engine's 120 positions"):
        synthesizer.speak("hi.", prompt_wav=tmp_path / "long_prompt.wav", prompt_text="a long tone.")


def test_cli_speaks_a_long_unpunctuated_text_with_progress(voiced_engine, tmp_path):
    text = " ".join(["hello world"] * 300)  # 600 words, no full stop
    out = tmp_path / "long.wav"
    done = run("runtime/synth.py", "--engine", voiced_engine, "--text", text, "--out", out, "--max-seconds", "1")
    assert done.returncode == 0, done.stderr
    assert "pieces" in done.stdout and "wrote" in done.stdout
    assert "piece" in done.stderr  # the progress bar counts pieces
    assert sf.info(out).duration > 1.0


# -- 3. permissions --------------------------------------------------------------------------


def test_outputs_follow_the_umask(voiced_engine, tmp_path):
    out = tmp_path / "shared.wav"
    done = run("runtime/synth.py", "--engine", voiced_engine, "--text", "hi.", "--out", out, "--max-seconds", "1",
               umask=0o022)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    checkpoint = tmp_path / "ckpt"
    run("-m", "melle.init", "--preset", "tiny", "--out", checkpoint, umask=0o022).check_returncode()
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o755
    assert stat.S_IMODE((checkpoint / "config.json").stat().st_mode) == 0o644


# -- 4 and 5. ordinary mistakes and conflicting options ----------------------------------------


@pytest.mark.parametrize("case, args, code, words", [
    ("out under a file", ["--text", "hi.", "--out", "{tmp}/file.txt/x.wav"], ExitCode.OUTPUT, ["is a file"]),
    ("out is a directory", ["--text", "hi.", "--out", "{tmp}"], ExitCode.OUTPUT, ["is a directory"]),
    ("mel png under a file", ["--text", "hi.", "--out", "{tmp}/a.wav", "--mel-png", "{tmp}/file.txt/m.png"],
     ExitCode.OUTPUT, ["--mel-png", "is a file"]),
    ("zero candidates", ["--text", "hi.", "--candidates", "0"], ExitCode.USAGE, ["--candidates"]),
    ("negative candidates", ["--text", "hi.", "--candidates", "-1"], ExitCode.USAGE, ["--candidates"]),
    ("zero max seconds", ["--text", "hi.", "--max-seconds", "0"], ExitCode.USAGE, ["--max-seconds"]),
    ("negative threads", ["--text", "hi.", "--threads", "-1"], ExitCode.USAGE, ["--threads"]),
    ("text with out-dir", ["--text", "hi.", "--out-dir", "{tmp}/wavs"], ExitCode.USAGE, ["--out-dir"]),
    ("text file with out", ["--text-file", "{tmp}/lines.txt", "--out", "{tmp}/x.wav"], ExitCode.USAGE, ["--out"]),
    ("text and text file", ["--text", "hi.", "--text-file", "{tmp}/lines.txt"], ExitCode.USAGE, ["--text-file"]),
    ("prompt text alone", ["--text", "hi.", "--prompt-text", "words"], ExitCode.USAGE, ["--prompt-wav"]),
    ("unknown extension", ["--text", "hi.", "--out", "{tmp}/x.m4a"], ExitCode.USAGE, [".m4a", ".mp3"]),
    ("non-UTF-8 text file", ["--text-file", "{tmp}/latin1.txt"], ExitCode.INPUT, ["UTF-8"]),
    ("missing text file", ["--text-file", "{tmp}/nope.txt"], ExitCode.INPUT, ["does not exist"]),
])
def test_synth_mistakes_get_one_line_and_touch_nothing(case, args, code, words, voiced_engine, tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    (tmp_path / "lines.txt").write_text("one.\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait.\n".encode("latin-1"))
    before = snapshot(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = run("runtime/synth.py", "--engine", voiced_engine, *args)
    assert_refused(done, code, *words)
    assert snapshot(tmp_path) == before, case
    assert not (ROOT / "out.wav").exists() and not (ROOT / "synth_out").exists()


def test_mp3_and_flac_outputs_are_what_their_names_say(voiced_engine, tmp_path):
    for suffix, kind in ((".mp3", "MP3"), (".flac", "FLAC")):
        out = tmp_path / f"x{suffix}"
        done = run("runtime/synth.py", "--engine", voiced_engine, "--text", "hi.", "--out", out, "--max-seconds", "1")
        assert done.returncode == 0, done.stderr
        assert sf.info(out).format == kind


# -- 6. text a user types -------------------------------------------------------------------


def test_characters_the_voice_cannot_speak_are_named(voiced_engine, tmp_path):
    text = "Hello \u4e16\u754c and \U0001f642."
    done = run("runtime/synth.py", "--engine", voiced_engine, "--text", text, "--out", tmp_path / "a.wav",
               "--max-seconds", "1")
    assert done.returncode == 0, done.stderr
    assert "\u4e16" in done.stderr and "\U0001f642" in done.stderr and "cannot speak" in done.stderr
    done = run("runtime/synth.py", "--engine", voiced_engine, "--text", text, "--out", tmp_path / "b.wav", "--strict")
    assert_refused(done, ExitCode.INPUT, "cannot speak")
    assert not (tmp_path / "b.wav").exists()


def test_a_prompt_transcript_that_cannot_match_its_audio_is_warned_about(voiced_engine, tmp_path):
    t = np.arange(22050) / 22050
    sf.write(tmp_path / "p.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 22050)  # one second
    transcript = " ".join(["many"] * 30) + "."
    synthesizer = Synthesizer(voiced_engine)
    with pytest.warns(UserWarning, match="transcript"):
        synthesizer.prompt_mel(tmp_path / "p.wav", transcript)


# -- 7. batch mode says where each line went ------------------------------------------------------


def test_batch_files_are_named_by_line_number_and_reported(voiced_engine, tmp_path):
    done = run("runtime/synth.py", "--engine", voiced_engine, "--out-dir", tmp_path, "--max-seconds", "1",
               stdin="one.\n\ntwo.\n")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0001.wav", "0003.wav"]
    assert f"line 3 -> wrote {tmp_path / '0003.wav'}" in done.stdout
    assert "wrote 2 files" in done.stdout
    again = run("runtime/synth.py", "--engine", voiced_engine, "--out-dir", tmp_path, stdin="one.\n")
    assert_refused(again, ExitCode.OUTPUT, "0001.wav", "--overwrite")
