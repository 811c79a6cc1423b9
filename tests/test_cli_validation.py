"""Every command refuses bad options and unusable inputs up front: one ``error:`` line, a distinct exit code.

Run as a user runs them (a subprocess from the repository root); codes from melle/core/cli.py: 2 option
(argparse), 3 input file, 4 checkpoint / engine / TensorRT, 5 output path, 6 NaN/inf.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT
from melle.core.cli import ExitCode, UserError
from melle.core.config import preset_config

RATE = 22050
# argparse writes "PROG: error: ...", UserError "error: ..."; both are the last line of stderr.
ERROR_LINE = re.compile(r"^(?:[\w.-]+\.py: )?error: ")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs for the cases: a good one-row corpus, a broken one, a file where a directory belongs,
    fake engine directories (sha256-correct dummy graphs: read_manifest does not parse ONNX)."""
    root = tmp_path_factory.mktemp("inputs")
    t = np.arange(int(0.3 * RATE)) / RATE
    sf.write(root / "u0.wav", 0.3 * np.sin(2 * np.pi * 220 * t), RATE)
    (root / "good.jsonl").write_text(json.dumps({"audio": "u0.wav", "text": "a tone.", "speaker": "s"}) + "\n")
    (root / "bad.jsonl").write_text('{"audio": "u0.wav", "text": "fine."}\n{"text": "no audio"}\n')
    (root / "a_file").write_text("not a directory\n")
    (root / "sentences.txt").write_text("a tone.\n")

    engine = root / "engine"
    engine.mkdir()
    graphs = {}
    for name in ("prefill", "decoder_step", "latent_head", "postnet"):
        (engine / f"{name}.onnx").write_bytes(name.encode())
        graphs[name] = {"file": f"{name}.onnx", "sha256": hashlib.sha256(name.encode()).hexdigest()}
    manifest = {"format_version": 1, "config": preset_config("tiny").to_dict(), "graphs": graphs,
                "max_len": 64, "batch_max": 1}
    (engine / "manifest.json").write_text(json.dumps(manifest))
    gone = root / "engine_missing_graph"
    gone.mkdir()
    (gone / "manifest.json").write_text(json.dumps(manifest))  # lists graphs that are not there
    corrupt = root / "engine_corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    return {"root": root, "good": root / "good.jsonl", "bad": root / "bad.jsonl", "file": root / "a_file",
            "sentences": root / "sentences.txt", "engine": engine, "engine_missing_graph": gone,
            "engine_corrupt": corrupt, "missing": root / "nowhere" / "x"}


def run(command: list[str], files: dict[str, Path]) -> subprocess.CompletedProcess:
    def resolve(arg: str) -> str:  # "@good" -> that path, "@root/run" -> a path under it
        key, _, rest = arg[1:].partition("/")
        return str(files[key] / rest if rest else files[key]) if arg.startswith("@") else arg

    args = [resolve(a) for a in command]
    prefix = ["-m", "melle.train"] if args[0] == "train" else [args[0]]
    return subprocess.run([sys.executable, *prefix, *args[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def assert_refused(done: subprocess.CompletedProcess, code: int, *names: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert ERROR_LINE.match(last), last
    for name in names:
        assert name in last, (name, last)


TRAIN = ["train", "--manifest", "@good", "--preset", "tiny", "--out", "@root/run", "--tokenizer", "chars",
         "--steps", "1"]

CASES = {
    # melle.train: options (2), inputs (3), output (5), the checkpoint to resume (4)
    "train steps": (TRAIN + ["--steps", "0"], 2, ["--steps", ">= 1"]),
    "train lr": (TRAIN + ["--lr", "-1e-3"], 2, ["--lr"]),
    "train scheduled sampling": (TRAIN + ["--scheduled-sampling", "1.5"], 2, ["--scheduled-sampling", "[0, 1]"]),
    "train manifest missing": (["train", "--manifest", "@missing", "--out", "@root/run"], 3,
                               ["--manifest", "does not exist", "scripts/build_corpus.py"]),
    "train manifest bad row": (["train", "--manifest", "@bad", "--out", "@root/run"], 3,
                               ["--manifest", "bad.jsonl:2"]),
    "train probe manifest missing": (TRAIN + ["--probe-every", "5", "--probe-manifest", "@missing"], 3,
                                     ["--probe-manifest"]),
    "train out is a file": (["train", "--manifest", "@good", "--out", "@file"], 5, ["--out"]),
    # export/to_trt.py: options (2), the engine directory (4), output paths (5)
    "to_trt workspace": (["export/to_trt.py", "@engine", "--workspace-gb", "0"], 2, ["--workspace-gb"]),
    "to_trt max-len above the export": (["export/to_trt.py", "@engine", "--max-len", "65"], 2, ["--max-len", "2..64"]),
    "to_trt engine missing": (["export/to_trt.py", "@missing"], 4, ["does not exist", "to_onnx.py"]),
    "to_trt engine corrupt": (["export/to_trt.py", "@engine_corrupt", "--check"], 4, ["not valid JSON"]),
    "to_trt onnx graph missing": (["export/to_trt.py", "@engine_missing_graph"], 4, ["prefill.onnx is missing"]),
    "to_trt timing cache dir missing": (["export/to_trt.py", "@engine", "--timing-cache", "@missing"], 5,
                                        ["--timing-cache"]),
    # export/verify.py
    "verify seeds": (["export/verify.py", "@engine", "--ckpt", "@root", "--seeds", "0,x"], 2, ["--seeds"]),
    "verify max-steps": (["export/verify.py", "@engine", "--ckpt", "@root", "--max-steps", "0"], 2, ["--max-steps"]),
    "verify ckpt missing": (["export/verify.py", "@engine", "--ckpt", "@missing"], 4, ["--ckpt", "not a checkpoint"]),
    # benchmarks/quality.py: options (2), inputs (3), engine (4)
    "quality limit": (["benchmarks/quality.py", "--ground-truth", "@good", "--limit", "0"], 2, ["--limit"]),
    "quality beam size": (["benchmarks/quality.py", "--ground-truth", "@good", "--beam-size", "0"], 2,
                          ["--beam-size"]),
    "quality sentences missing": (["benchmarks/quality.py", "--engine", "@engine", "--sentences", "@missing"], 3,
                                  ["--sentences", "does not exist"]),
    "quality ground truth bad row": (["benchmarks/quality.py", "--ground-truth", "@bad"], 3, ["bad.jsonl:2"]),
    "quality reference voice missing": (["benchmarks/quality.py", "--ground-truth", "@good", "--reference-voice",
                                         "@missing"], 3, ["--reference-voice", "does not exist"]),
    "quality engine missing": (["benchmarks/quality.py", "--engine", "@missing", "--sentences", "@sentences"], 4,
                               ["--engine"]),
    # benchmarks/latency.py
    "latency repeated r": (["benchmarks/latency.py", "--r", "1,1"], 2, ["--r", "more than once"]),
    "latency prompt seconds": (["benchmarks/latency.py", "--prompt-seconds", "-1"], 2, ["--prompt-seconds"]),
    "latency out is a file": (["benchmarks/latency.py", "--out", "@file"], 5, ["--out"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option_or_input_is_one_line_and_its_code(case, files):
    command, code, names = CASES[case]
    assert_refused(run(command, files), code, *names)


def test_resume_from_a_corrupt_checkpoint_is_a_model_error(files, tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "config.json").write_text("{not json")
    done = run(["train", "--manifest", "@good", "--preset", "tiny", "--out", str(tmp_path), "--resume",
                "--tokenizer", "chars", "--steps", "1"], files)
    assert_refused(done, 4, "config.json", "not valid JSON")


def test_a_nan_loss_is_a_numeric_error(monkeypatch, capsys, files):
    """FloatingPointError (the training loop's NaN/inf loss) through the command's entry point."""
    import melle.train as train

    def diverge(args):
        raise FloatingPointError("loss became nan at step 3; lower --lr or resume from the last checkpoint")

    monkeypatch.setattr(train, "train", diverge)
    monkeypatch.setattr(sys, "argv", ["train.py", "--manifest", str(files["good"]), "--out", str(files["root"])])
    with pytest.raises(SystemExit) as stop:
        train.cli()
    assert stop.value.code == ExitCode.NUMERIC
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: loss became nan at step 3; lower --lr or resume from the last checkpoint"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_to_trt_without_tensorrt_checks_the_engine_first_then_says_so(files):
    done = run(["export/to_trt.py", "@engine"], files)
    assert_refused(done, 4, "TensorRT is not installed")
    assert done.stdout == ""


# -- quality.py without the default corpus: WER and RTF still, SIM skipped and said so ----------


@pytest.fixture(scope="module")
def quality():
    from melle_bench import quality

    return quality


def test_reference_voice_default_missing_is_skipped_but_a_named_one_must_exist(quality, files, tmp_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)  # no corpus/joe here
    voice_files, note = quality.resolve_reference_voice(None, 5)
    assert voice_files == [] and quality.DEFAULT_REFERENCE_VOICE in note and "build_corpus.py" in note
    with pytest.raises(UserError, match="--reference-voice nope.wav does not exist") as err:
        quality.resolve_reference_voice("nope.wav", 5)
    assert err.value.code == ExitCode.INPUT

    default = tmp_path / quality.DEFAULT_REFERENCE_VOICE
    default.parent.mkdir(parents=True)
    default.write_text(files["good"].read_text().replace("u0.wav", str(files["root"] / "u0.wav")))
    assert quality.resolve_reference_voice(None, 5) == ([files["root"] / "u0.wav"], None)


def test_quality_without_the_default_corpus_scores_wer_and_rtf_and_skips_sim(quality, files, tmp_path,
                                                                             monkeypatch, capsys):
    """The whole command on --ground-truth, Whisper and the vocoder stubbed: SIM '-' and the reason given."""

    class NoModels(quality.Scorer):
        def __init__(self, beam_size: int, speaker: bool = True):
            assert not speaker, "no reference voice and no prompts: the speaker encoder must not load"
            self.whisper_name, self.whisper_path, self.beam_size, self.encoder = "stub", "-", beam_size, None

        def transcribe(self, wav, rate):
            return "a tone."

        def embed(self, wav, rate):
            raise AssertionError("nothing to compare an embedding with")

    monkeypatch.setattr(quality, "Scorer", NoModels)
    monkeypatch.setattr(quality, "torch_vocoder", lambda preset: lambda mel: np.zeros(256 * len(mel), np.float32))
    monkeypatch.chdir(tmp_path)
    quality.main(["--ground-truth", str(files["good"]), "--out", str(tmp_path / "out")])
    assert "SIM not scored" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    for name in ("ground_truth", "ground_truth_vocoded"):
        system = report["systems"][name]
        assert system["wer"] == 0.0 and system["sim"] is None and system["rows"][0]["sim"] is None
    assert report["systems"]["ground_truth_vocoded"]["rtf"] is not None
    config = report["config"]
    assert config["reference_voice"] == [] and "build_corpus.py" in config["reference_voice_skipped"]
    markdown = (tmp_path / "out" / "quality.md").read_text()
    assert "| ground_truth | 1 | 0.0 | - |" in markdown
    assert any(line.startswith("- SIM not scored") for line in markdown.splitlines())
