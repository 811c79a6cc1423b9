"""The torch-free runtime: the CLI, the Python API and its answers to bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from melle_runtime.text_pieces import PAUSE_AFTER, PAUSE_AFTER_PARAGRAPH, split_pieces, split_text
from melle_runtime.synthesizer import SynthesisOptions, Synthesizer

ROOT = Path(__file__).resolve().parents[1]
# Runs synth.py in a process where `import torch` fails, then proves torch never loaded.
NO_TORCH = """
import runpy, sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
sys.argv = ["synth.py"] + sys.argv[1:]
try:
    runpy.run_path("runtime/synth.py", run_name="__main__")
finally:
    assert "torch" not in sys.modules
"""


def synth(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


def write_tone(path: Path, seconds: float, rate: int, channels: int = 1, amplitude: float = 0.3) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    tone = amplitude * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, np.stack([tone] * channels, axis=1) if channels > 1 else tone, rate)
    return path


def test_cli_speaks_without_torch(voiced_engine, tmp_path):
    out = tmp_path / "hello.wav"
    done = synth("--engine", voiced_engine, "--text", "hello world.", "--out", out, "--max-seconds", "2",
                 "--mel-png", tmp_path / "mel.png")
    assert done.returncode == 0, done.stderr
    wav, rate = sf.read(out)
    assert rate == 22050 and len(wav) > 0 and np.abs(wav).max() > 0
    assert (tmp_path / "mel.png").stat().st_size > 1000


def test_cli_reads_lines_from_stdin(voiced_engine, tmp_path):
    done = synth("--engine", voiced_engine, "--out-dir", tmp_path, "--max-seconds", "1", stdin="one.\ntwo.\n")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == ["0001.wav", "0002.wav"]


def test_prompt_handling(voiced_engine, tmp_path):
    stereo = write_tone(tmp_path / "stereo.wav", 1.0, 22050, channels=2)
    other_rate = write_tone(tmp_path / "16k.wav", 1.0, 16000)
    synthesizer = Synthesizer(voiced_engine)
    with pytest.warns(UserWarning, match="downmix"):
        stereo_mel = synthesizer.prompt_mel(stereo, "a tone.")
    assert stereo_mel.shape == (22050 // 256, 80)
    assert synthesizer.prompt_mel(other_rate, "a tone.").shape == (22050 // 256, 80)  # resampled


@pytest.mark.parametrize("case, args, message", [
    ("empty text", ["--text", "   "], "empty"),
    ("only unknown symbols", ["--text", "\u4f60\u597d"], "nothing speakable"),
    ("missing engine", ["--engine", "/nonexistent/engine", "--text", "hi."], "does not exist"),
    ("prompt without text", ["--text", "hi.", "--prompt-wav", "PROMPT"], "--prompt-text"),
])
def test_cli_bad_input_exits_non_zero_with_a_message(case, args, message, voiced_engine, tmp_path):
    prompt = write_tone(tmp_path / "p.wav", 1.0, 22050)
    args = [str(prompt) if a == "PROMPT" else a for a in args]
    if "--engine" not in args:
        args = ["--engine", voiced_engine, *args]
    done = synth(*args, "--out", tmp_path / "x.wav")
    assert done.returncode != 0, case
    assert message.lower() in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("case, seconds, amplitude, message", [
    ("silent prompt", 1.0, 0.0, "silent"),
    ("short prompt", 0.3, 0.3, "shorter"),
])
def test_cli_rejects_unusable_prompts(case, seconds, amplitude, message, voiced_engine, tmp_path):
    prompt = write_tone(tmp_path / "p.wav", seconds, 22050, amplitude=amplitude)
    done = synth("--engine", voiced_engine, "--text", "hi.", "--prompt-wav", prompt, "--prompt-text", "a tone.",
                 "--out", tmp_path / "x.wav")
    assert done.returncode != 0, case
    assert message in done.stderr.lower() and "Traceback" not in done.stderr


def test_cli_refuses_a_tampered_engine(voiced_engine, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(voiced_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["graphs"]["latent_head"]["sha256"] = "0" * 64
    (engine / "manifest.json").write_text(json.dumps(manifest))
    done = synth("--engine", engine, "--text", "hi.", "--out", tmp_path / "x.wav")
    assert done.returncode != 0 and "sha256" in done.stderr


def test_api_joins_sentences_with_a_pause(voiced_engine):
    synthesizer = Synthesizer(voiced_engine)
    wav, rate = synthesizer.synthesize("hello there. how are you?", seed=1)
    one, _ = synthesizer.synthesize("hello there.", seed=1)
    assert rate == 22050 and wav.dtype == np.float32
    assert len(wav) > len(one) + int(0.25 * rate) - 1
    np.testing.assert_array_equal(wav[: len(one)], one)  # sentence 1 keeps its seed


def test_synthesizer_closes_its_backend(voiced_engine):
    with Synthesizer(voiced_engine) as synthesizer:
        wav, _ = synthesizer.synthesize("hi.", seed=0, options=SynthesisOptions(max_seconds=0.5))
        assert len(wav) > 0
    assert synthesizer.backend.sessions == {} and synthesizer.backend.vocoder is None


def test_pieces_are_sentences_with_pauses_from_their_punctuation():
    pieces = split_pieces(" One. Two!  Three? four; five, six ", lambda piece: True)
    assert [p.text for p in pieces] == ["One.", "Two!", "Three?", "four;", "five, six"]
    assert [p.pause_after for p in pieces] == [0.35, 0.35, 0.35, 0.25, 0.0]  # none after the last
    assert split_pieces("   ", lambda piece: True) == [] and split_pieces("... !", lambda piece: True) == []


def test_long_text_splits_at_sentences_not_at_initials_months_or_quotations():
    from melle.core.text import normalize_text

    text = ('Mr. Smith left at 4:30 p.m. on Jan. 5th. "Stop!" he said. The U.S. team won 3.5 points.\n'
            '  \n"It is late." Next paragraph!')
    pieces = split_text(text, normalize_text, lambda piece: True)
    assert [p.text for p in pieces] == ["Mister Smith left at four thirty p m on Jan. fifth.", '"Stop!" he said.',
                                        "The U.S. team won three point five points.", '"It is late."',
                                        "Next paragraph!"]
    assert [p.pause_after for p in pieces] == [0.35, 0.35, PAUSE_AFTER_PARAGRAPH, 0.35, 0.0]


def test_a_sentence_too_long_for_the_engine_splits_at_clauses_then_words():
    fits = lambda piece: len(piece.split()) <= 4  # noqa: E731 - the engine's capacity, in words
    pieces = split_pieces("one two, three four five six seven, eight. Nine ten.", fits)
    assert [p.text for p in pieces] == ["one two,", "three four five six", "seven,", "eight.", "Nine ten."]
    assert [p.pause_after for p in pieces] == [PAUSE_AFTER[","], 0.05, PAUSE_AFTER[","], PAUSE_AFTER["."], 0.0]
    with pytest.raises(ValueError, match="alone is longer"):
        split_pieces("supercalifragilistic", lambda piece: False)


def test_abbreviations_and_decimals_do_not_split_sentences(voiced_engine):
    speech = Synthesizer(voiced_engine).speak("Dr. Smith paid 3.5 dollars. Then he left!", seed=0)
    texts = [p.text for p in speech.pieces]
    assert len(speech.mels) == len(texts) and texts[-1] == "Then he left!"
    # The tiny engine holds ~36 characters of text per piece, so the first sentence is cut at a
    # word boundary, but never after "Dr." or inside "3.5".
    assert any("Doctor Smith" in t for t in texts) and any("three point five" in t for t in texts)


def test_cli_reports_non_finite_output_without_a_traceback(tiny_checkpoint, tmp_path):
    import torch

    from melle.checkpoint import load_checkpoint, save_checkpoint
    from melle_export.to_onnx import export

    model = load_checkpoint(tiny_checkpoint(1))
    with torch.no_grad():
        model.latent.to_stats.bias[0] = float("nan")
    save_checkpoint(tmp_path / "ckpt", model)
    engine = export(tmp_path / "ckpt", tmp_path / "engine", vocoder="hifigan-universal")
    done = synth("--engine", engine, "--text", "hi.", "--out", tmp_path / "x.wav")
    assert done.returncode != 0 and "NaN/inf" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize("folder", ["runtime", "export", "benchmarks", "scripts"])
def test_no_script_folder_module_shadows_an_installed_one(folder):
    # `python runtime/synth.py` puts runtime/ first on sys.path: a runtime/segments.py once
    # hid the `segments` package phonemizer imports, and every phoneme voice crashed.
    from importlib.machinery import PathFinder

    # Search what is installed (stdlib, site-packages), not sys.modules or this checkout.
    installed = [path for path in sys.path
                 if path and ("site-packages" in path or not Path(path).resolve().is_relative_to(ROOT))]
    shadowing = [p.stem for p in (ROOT / folder).glob("*.py")
                 if p.stem != "__init__" and PathFinder.find_spec(p.stem, installed) is not None]
    assert shadowing == [], f"{folder}/ modules shadow installed ones: {shadowing}"


def test_the_runtime_takes_from_melle_only_its_torch_free_core():
    import ast

    reached = set()
    for path in (ROOT / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            reached |= {(path.name, n) for n in names if n == "melle" or n.startswith("melle.")}
    outside = sorted((f, n) for f, n in reached if not n.startswith("melle.core"))
    assert reached and outside == [], outside


def test_the_core_imports_no_torch_and_nothing_of_melle_outside_it():
    code = ("import sys, pkgutil, importlib, melle.core\n"
            "names = [m.name for m in pkgutil.iter_modules(melle.core.__path__, 'melle.core.')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('melle.') "
            "and not m.startswith('melle.core'))\n"
            "assert len(names) >= 9 and loaded == [], (names, loaded)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
