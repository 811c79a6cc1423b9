"""scripts/plot_training.py: the curve, and held-out probes joined by step."""

import csv
import json
import subprocess
import sys

from conftest import ROOT

LOG = """step,epoch,minutes,lr,total,reg,kl,flux,stop,guided,align
1,0,0.10,0.0001,9.0,8.0,1.0,0.5,0.3,0.6,0.2
26,0,0.50,0.001,5.0,4.0,1.2,0.4,0.2,0.3,0.6
"""


def run_plot(tmp_path, *extra):
    (tmp_path / "train_log.csv").write_text(LOG)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_training.py"), str(tmp_path / "train_log.csv"),
                           "--out", str(tmp_path / "out"), *map(str, extra)], capture_output=True, text=True)


def test_probes_join_the_curve_by_step(tmp_path):
    quality = {"systems": {"reference": {"n": 10, "wer": 1.125, "sim": 0.64},
                           "runtime": {"n": 10, "wer": 0.25, "sim": 0.8},
                           "teacher_forced": {"n": 10, "wer": 0.5, "sim": 0.7},
                           "ground_truth": {"n": 10, "wer": 0.02, "sim": 0.94}}}
    (tmp_path / "q.json").write_text(json.dumps(quality))
    done = run_plot(tmp_path, "--probe", f"26={tmp_path / 'q.json'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "training_curve.png").stat().st_size > 10_000
    with open(tmp_path / "out" / "probes.csv") as f:
        rows = list(csv.DictReader(f))
    # Only synthesised systems are probes; ground truth does not change with the step.
    assert [(r["step"], r["system"], r["wer"], r["sim"]) for r in rows] == [
        ("26", "reference", "1.1250", "0.6400"), ("26", "runtime", "0.2500", "0.8000"),
        ("26", "teacher_forced", "0.5000", "0.7000")]


def test_malformed_probe_is_a_clear_error(tmp_path):
    done = run_plot(tmp_path, "--probe", "latest.json")
    assert done.returncode != 0 and "STEP=PATH" in done.stderr


def test_a_probe_directory_gives_every_step_it_holds(tmp_path):
    probes = tmp_path / "probes"
    for step, wer, layout in ((5, 0.9, "step5.json"), (26, 0.4, "step26/quality.json")):
        path = probes / layout
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"systems": {"reference": {"n": 20, "wer": wer, "sim": 0.8}}}))
    (probes / "notes.json").write_text("{}")  # not a probe: ignored
    done = run_plot(tmp_path, "--probe-dir", probes)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out" / "probes.csv") as f:
        assert [(r["step"], r["wer"]) for r in csv.DictReader(f)] == [("5", "0.9000"), ("26", "0.4000")]
