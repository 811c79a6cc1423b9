"""Training: data pipeline, overfitting a few utterances, resume, DDP, checkpoint errors."""

import contextlib
import csv
import json
import os
import shutil
import subprocess
import signal
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from melle.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, save_checkpoint
from melle.checkpoint import main as checkpoint_main
from melle.align_heads import main as align_heads_main
from melle.core.cli import UserError
from melle.core.config import preset_config
from melle.data import bucket_batches, collate
from melle.core.decoding import DecodeOptions
from melle.core.fileio import current_umask
from melle.generate import generate
from melle.init import random_model
from melle.core.text import build_tokenizer, tokenizer_from_spec
from melle.model import Melle
from melle.data import MelDataset
from melle.train import TrainConfig, feed_own_predictions, main as train_main

RATE = 22050
TEXTS = ["a rising tone.", "falling low, then high!", "buzz"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three generated 'utterances' (distinct tone patterns, 0.6-1.0 s) and their manifest."""
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, (text, seconds) in enumerate(zip(TEXTS, [0.6, 1.0, 0.8])):
        t = np.arange(int(seconds * RATE)) / RATE
        f0 = 150 + 100 * i + 80 * np.sin(2 * np.pi * (i + 1) * t)
        wav = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / RATE) * np.hanning(len(t)) ** 0.3
        sf.write(root / f"u{i}.wav", wav, RATE)
        rows.append(json.dumps({"audio": f"u{i}.wav", "text": text, "speaker": "tone"}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root / "train.jsonl"


def train(manifest, out, *extra):
    train_main(["--manifest", str(manifest), "--preset", "tiny", "--out", str(out), "--tokenizer", "chars",
                "--log-every", "10", *map(str, extra)])


def read_log(out: Path) -> list[dict]:
    with open(out / "train_log.csv") as f:
        return list(csv.DictReader(f))


def test_overfit_a_few_utterances_and_stop_on_time(corpus, tmp_path):
    torch.manual_seed(0)
    train(corpus, tmp_path, "--steps", 300, "--lr", 3e-3, "--warmup-steps", 20, "--hold-steps", 1000,
          "--r", 2, "--batch-frames", 400, "--threads", 2)
    log = read_log(tmp_path)
    first, last = float(log[0]["reg"]), float(log[-1]["reg"])
    assert last < 0.3 * first, f"regression loss only went {first} -> {last}"

    model = load_checkpoint(tmp_path / "latest")
    tokenizer = tokenizer_from_spec(model.cfg.tokenizer)
    true_groups = [int(np.ceil(len(sf.read(corpus.parent / f"u{i}.wav")[0]) // 256 / 2)) for i in range(3)]
    for text, truth in zip(TEXTS, true_groups):
        made = generate(model, tokenizer.encode(text), options=DecodeOptions(max_steps=3 * truth), seed=0)
        assert made.stopped == [True] and abs(made.n_groups[0] - truth) <= 3, (text, made.n_groups, truth)


def test_resume_continues_where_it_stopped(corpus, tmp_path, capsys):
    train(corpus, tmp_path, "--steps", 4, "--batch-frames", 200)
    train(corpus, tmp_path, "--steps", 3, "--batch-frames", 200, "--resume", "--lr", 5e-4)
    assert "lr 0.001 -> 0.0005" in capsys.readouterr().out, "a changed schedule must be reported"
    state = load_trainer_state(tmp_path / "latest")
    assert state["step"] == 7
    assert set(state["optimizer"]["state"]), "optimizer moments must be saved for resume"
    for name in ("model.safetensors", "optimizer.safetensors"):  # safetensors alone makes them 0600
        assert stat.S_IMODE((tmp_path / "latest" / name).stat().st_mode) == 0o666 & ~current_umask(), name


# Dropout, input noise and scheduled sampling all draw from the RNG; 2 batches an epoch, so
# 6 steps cross two epoch ends and a resume at step 3 lands inside an epoch.
EXACT_RUN = ("--batch-frames", 200, "--warmup-steps", 2, "--input-noise", 0.1, "--scheduled-sampling", 0.5)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, optimizer moments and RNG state, and the same place in the data."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys(), name
        differ = [k for k in left if not torch.equal(left[k], right[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    left, right = (json.loads((d / "trainer.json").read_text()) for d in (a, b))
    assert {**left, "minutes": 0} == {**right, "minutes": 0}


def test_resume_is_exact(corpus, tmp_path):
    train(corpus, tmp_path / "straight", "--steps", 6, *EXACT_RUN)
    train(corpus, tmp_path / "resumed", "--steps", 3, *EXACT_RUN)
    assert load_trainer_state(tmp_path / "resumed" / "latest")["batch_in_epoch"] == 1, "resume mid-epoch"
    train(corpus, tmp_path / "resumed", "--steps", 3, "--resume", *EXACT_RUN)
    assert_same_run(tmp_path / "straight" / "latest", tmp_path / "resumed" / "latest")
    without_minutes = [[{**row, "minutes": ""} for row in read_log(tmp_path / run)] for run in ("straight", "resumed")]
    assert without_minutes[0] == without_minutes[1], "the same losses at every step"


def write_legacy_trainer_file(checkpoint: Path) -> None:
    """Replace the trainer files with the ``trainer.pt`` pickle older versions wrote."""
    torch.save(load_trainer_state(checkpoint), checkpoint / "trainer.pt")
    (checkpoint / "trainer.json").unlink()
    (checkpoint / "optimizer.safetensors").unlink()


def test_a_legacy_trainer_pt_converts_and_resumes_alike(corpus, tmp_path, capsys):
    train(corpus, tmp_path / "straight", "--steps", 6, *EXACT_RUN)
    train(corpus, tmp_path / "half", "--steps", 3, *EXACT_RUN)
    write_legacy_trainer_file(tmp_path / "half" / "latest")
    (tmp_path / "half" / "latest" / "TRAINING.txt").write_text("how it was trained\n")
    for way in ("converted", "read"):
        shutil.copytree(tmp_path / "half", tmp_path / way)
    checkpoint_main(["convert", str(tmp_path / "converted" / "latest")])
    assert "trainer.pt -> trainer.json + optimizer.safetensors" in capsys.readouterr().out
    converted = tmp_path / "converted" / "latest"
    assert sorted(os.listdir(converted)) == ["TRAINING.txt", "config.json", "model.safetensors",
                                             "optimizer.safetensors", "trainer.json"]
    assert (converted / "TRAINING.txt").read_text() == "how it was trained\n"
    for way in ("converted", "read"):  # "read": resumed from trainer.pt itself, saved in the new format
        train(corpus, tmp_path / way, "--steps", 3, "--resume", *EXACT_RUN)
        assert not (tmp_path / way / "latest" / "trainer.pt").exists()
        assert_same_run(tmp_path / "straight" / "latest", tmp_path / way / "latest")


class RunsCode:
    """A pickle payload: unpickling it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_trainer_state_is_never_unpickled_and_damage_is_clear(corpus, tmp_path):
    train(corpus, tmp_path, "--steps", 1, "--batch-frames", 200)
    checkpoint = tmp_path / "latest"
    good_json = (checkpoint / "trainer.json").read_text()
    (checkpoint / "trainer.json").write_text(good_json[:50])
    with pytest.raises(CheckpointError, match="corrupt.*restart the optimizer"):
        load_trainer_state(checkpoint)
    (checkpoint / "trainer.json").write_text(good_json)
    (checkpoint / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no optimizer.safetensors"):
        load_trainer_state(checkpoint)

    (checkpoint / "trainer.json").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "payload": RunsCode(marker)}, checkpoint / "trainer.pt")
    with pytest.raises(CheckpointError, match="more than plain data"):
        load_trainer_state(checkpoint)
    assert not marker.exists(), "loading a trainer state must never run code from it"


def test_bf16_training_keeps_fp32_weights(corpus, tmp_path):
    train(corpus, tmp_path, "--steps", 3, "--batch-frames", 200, "--precision", "bf16")
    model = load_checkpoint(tmp_path / "latest")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(np.isfinite(float(row["total"])) for row in read_log(tmp_path))


def test_scheduled_sampling_feeds_back_the_models_own_groups():
    torch.manual_seed(0)
    model = Melle(preset_config("tiny", r=2, n_text_vocab=40)).eval()
    rng = np.random.default_rng(0)
    batch = collate([([3, 4, 5], rng.standard_normal((40, 80)).astype(np.float32)),
                     ([6, 7], rng.standard_normal((30, 80)).astype(np.float32))], model.cfg)
    torch.manual_seed(1)  # the pre-net draws its dropout masks: same seed, same prediction
    own = model(batch.text, batch.text_lens, batch.frames, batch.n_groups).y_coarse.reshape(batch.frames.shape)
    assert (own - batch.frames).abs().amax(-1).min() > 1e-3, "own predictions must differ from every true group"
    for rate, (low, high) in {0.0: (0.0, 0.0), 0.5: (0.2, 0.8), 1.0: (1.0, 1.0)}.items():
        torch.manual_seed(1)
        fed = feed_own_predictions(model, batch, rate)
        is_own = torch.isclose(fed, own, atol=1e-6).all(-1)  # [B, G]
        assert torch.equal(fed[~is_own], batch.frames[~is_own]), "a group is either the true one or the model's own"
        assert low <= is_own.float().mean().item() <= high, (rate, is_own.float().mean().item())


def test_scheduled_sampling_training_runs_and_is_recorded(corpus, tmp_path, capsys):
    train(corpus, tmp_path, "--steps", 3, "--batch-frames", 200, "--scheduled-sampling", 0.5)
    assert all(np.isfinite(float(row["total"])) for row in read_log(tmp_path))
    assert load_trainer_state(tmp_path / "latest")["train_config"]["scheduled_sampling"] == 0.5
    train(corpus, tmp_path, "--steps", 2, "--batch-frames", 200, "--resume")
    assert "scheduled_sampling 0.5 -> 0.0" in capsys.readouterr().out
    # A run saved before the option existed: switching it on must still be announced.
    trainer_json = tmp_path / "latest" / "trainer.json"
    saved = json.loads(trainer_json.read_text())
    del saved["train_config"]["scheduled_sampling"]
    trainer_json.write_text(json.dumps(saved))
    train(corpus, tmp_path, "--steps", 1, "--batch-frames", 200, "--resume", "--scheduled-sampling", 0.5)
    assert "scheduled_sampling unset -> 0.5" in capsys.readouterr().out


def test_a_new_learning_rate_cycle_warms_up_holds_and_decays_from_its_start():
    linear = TrainConfig(lr=5e-4, cycle_start=28_000, warmup_steps=1000, hold_steps=0, total_steps=60_000)
    cosine = TrainConfig(lr=5e-4, cycle_start=28_000, warmup_steps=1000, hold_steps=0, total_steps=60_000,
                         decay="cosine")
    for cfg in (linear, cosine):
        assert cfg.lr_at(28_000) == pytest.approx(5e-7)  # the first warm-up step, not the old run's rate
        assert cfg.lr_at(28_999) == pytest.approx(5e-4)
        assert cfg.lr_at(29_000) == pytest.approx(5e-4)
        assert cfg.lr_at(60_000) == 0.0
    halfway = 29_000 + 31_000 // 2
    assert linear.lr_at(halfway) == pytest.approx(2.5e-4, rel=1e-3)
    assert cosine.lr_at(halfway) == pytest.approx(2.5e-4, rel=1e-3)  # cosine crosses half at the middle
    assert cosine.lr_at(32_000) > linear.lr_at(32_000)  # and stays higher before it
    assert cosine.lr_at(57_000) < linear.lr_at(57_000)  # and lower after
    # A run without a cycle start keeps the schedule the demo was trained with.
    assert TrainConfig(lr=1e-3, warmup_steps=500, hold_steps=100).lr_at(0) == pytest.approx(2e-6)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(decay="step")


def test_new_options_reach_the_saved_run_and_a_bad_one_is_refused(corpus, tmp_path, capsys):
    train(corpus, tmp_path, "--steps", 2, "--batch-frames", 200, "--input-noise", 0.2, "--guided-weight", 1.0,
          "--guided-layers", "0,1", "--guided-heads", "0,1", "--decay", "cosine", "--total-steps", 100)
    saved = load_trainer_state(tmp_path / "latest")["train_config"]
    assert saved["input_noise"] == 0.2 and saved["decay"] == "cosine"
    assert list(saved["loss"]["guided_layers"]) == [0, 1] and list(saved["loss"]["guided_heads"]) == [0, 1]
    # The model's config names the guided heads, for alignment-guided decoding of its exports.
    assert load_checkpoint(tmp_path / "latest").cfg.guided_heads == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert all(np.isfinite(float(row["guided"])) for row in read_log(tmp_path))
    train(corpus, tmp_path, "--steps", 1, "--batch-frames", 200, "--resume", "--cycle-start", 2,
          "--total-steps", 100)
    assert "cycle_start 0 -> 2" in capsys.readouterr().out
    for bad, message in ((["--guided-heads", "0,x"], "comma-separated"), (["--input-noise", "-1"], "input-noise"),
                         (["--probe-every", "10"], "probe-manifest"), (["--cycle-start", "30000"], "cycle-start")):
        with pytest.raises(SystemExit):
            train(corpus, tmp_path / "bad", "--steps", 1, *bad)
        assert message in capsys.readouterr().err


def test_align_heads_measures_every_head_and_writes_the_aligned_ones(corpus, tmp_path, capsys):
    train(corpus, tmp_path, "--steps", 1, "--batch-frames", 200)
    ckpt = tmp_path / "latest"
    align_heads_main([str(ckpt), "--manifest", str(corpus), "--threshold", "0", "--write"])
    assert "layer 1: head 0" in capsys.readouterr().out
    assert load_checkpoint(ckpt).cfg.guided_heads == [[0, 0], [0, 1], [1, 0], [1, 1]]  # tiny: 2 x 2, all >= 0
    with pytest.raises(UserError, match="no head reaches 1.01"):
        align_heads_main([str(ckpt), "--manifest", str(corpus), "--threshold", "1.01", "--write"])
    assert load_checkpoint(ckpt).cfg.guided_heads == [[0, 0], [0, 1], [1, 0], [1, 1]]  # left as it was
    with pytest.raises(UserError, match="--manifest"):
        align_heads_main([str(ckpt), "--manifest", str(tmp_path / "missing.jsonl")])


def test_utterances_the_tokenizer_cannot_spell_are_skipped_not_fatal(corpus, tmp_path, capsys):
    tokenizer = build_tokenizer("chars", TEXTS[:1])  # knows only the first text's letters
    model = random_model("tiny", 0, tokenizer=tokenizer.spec(), n_text_vocab=tokenizer.vocab_size)
    dataset = MelDataset(corpus, model.cfg, tokenizer_from_spec(model.cfg.tokenizer), tmp_path / "cache")
    assert [row.text for row in dataset.rows] == TEXTS[:1] and len(dataset.tokens) == len(dataset.n_frames) == 1
    assert "skipping 2 of 3 utterances" in capsys.readouterr().out


def torchrun(port: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def start_training(corpus, out, *extra, launcher=(), batch_frames=200) -> subprocess.Popen:
    cmd = [sys.executable, *launcher, "-m", "melle.train", "--manifest", str(corpus), "--preset", "tiny", "--out", str(out),
           "--tokenizer", "chars", "--batch-frames", str(batch_frames), "--threads", "1", "--log-every", "1",
           *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def child_pids(process: subprocess.Popen) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    return []


def kill_all(process: subprocess.Popen) -> None:
    """Kill a run that is still going, torchrun's workers included (they live in sessions of their own)."""
    for pid in [*child_pids(process), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def wait_for_log_rows(out: Path, n: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not ((out / "train_log.csv").exists() and len(read_log(out)) >= n):
        assert process.poll() is None, f"training ended early: {process.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, "training logged no steps in time"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_after_the_step_and_saves_it(corpus, tmp_path, sig):
    # No periodic checkpoint can happen in this run: whatever is saved, the signal saved.
    process = start_training(corpus, tmp_path, "--checkpoint-minutes", 60)
    try:
        wait_for_log_rows(tmp_path, 3, process)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=60)
    finally:
        kill_all(process)
    assert process.returncode == 0, output[-2000:]
    assert "stopping after this step and saving" in output
    logged = int(read_log(tmp_path)[-1]["step"])
    assert load_trainer_state(tmp_path / "latest")["step"] == logged >= 3, "the last logged step must be saved"


def test_a_signal_to_one_ddp_rank_stops_every_rank_after_the_same_step(corpus, tmp_path):
    process = start_training(corpus, tmp_path, "--checkpoint-minutes", 60, launcher=torchrun(29518))
    try:
        wait_for_log_rows(tmp_path, 3, process)
        workers = child_pids(process)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGTERM)  # the other rank never sees a signal
        output, _ = process.communicate(timeout=60)
    finally:
        kill_all(process)
    assert process.returncode == 0, output[-2000:]
    assert output.count("stopping after this step and saving") == 1
    check = json.loads((tmp_path / "ddp_check.json").read_text())
    assert len(check["digests"]) == 2 and len(set(check["digests"])) == 1, "ranks saved different weights"
    assert load_trainer_state(tmp_path / "latest")["step"] == int(read_log(tmp_path)[-1]["step"])


def test_two_process_torchrun_keeps_ranks_identical(corpus, tmp_path):
    process = start_training(corpus, tmp_path, "--steps", 3, launcher=torchrun(29517), batch_frames=150)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        kill_all(process)
    assert process.returncode == 0, output[-2000:]
    check = json.loads((tmp_path / "ddp_check.json").read_text())
    assert check["world"] == 2 and len(check["digests"]) == 2 and len(set(check["digests"])) == 1
    assert load_trainer_state(tmp_path / "latest")["step"] == 3


def test_bucket_batches_respect_budget_and_split_ranks():
    lengths = [10, 50, 12, 48, 30, 31, 5, 49]
    batches = bucket_batches(lengths, max_frames=100, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(max(lengths[i] for i in b) * len(b) <= 100 for b in batches)
    rank0 = bucket_batches(lengths, 100, 0, 0, rank=0, world=2)
    rank1 = bucket_batches(lengths, 100, 0, 0, rank=1, world=2)
    assert len(rank0) == len(rank1) and not {i for b in rank0 for i in b} & {i for b in rank1 for i in b}
    assert bucket_batches(lengths, 100, 0, 1) != batches, "each epoch reshuffles"


def test_checkpoint_errors_are_clear(tmp_path):
    good = tmp_path / "good"
    save_checkpoint(good, random_model("tiny", 0))
    tensors = load_file(good / "model.safetensors")

    missing = tmp_path / "missing"
    save_checkpoint(missing, random_model("tiny", 0))
    save_file({k: v for k, v in tensors.items() if k != "latent.stop.bias"}, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors.*latent.stop.bias"):
        load_checkpoint(missing)

    newer = tmp_path / "newer"
    save_checkpoint(newer, random_model("tiny", 0))
    config = json.loads((newer / "config.json").read_text())
    config["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer than this melle"):
        load_checkpoint(newer)

    corrupt = tmp_path / "corrupt"
    save_checkpoint(corrupt, random_model("tiny", 0))
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)

    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_failed_save_keeps_the_good_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    model = random_model("tiny", 0)
    save_checkpoint(target, model)
    before = (target / "model.safetensors").read_bytes()
    state = {"optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "torch_rng": torch.get_rng_state(),
             "step": 0, "epoch": 0, "batch_in_epoch": 0, "minutes": 0.0, "train_config": {"bad": lambda: None}}
    with pytest.raises(TypeError, match="not JSON serializable"):  # fails mid-write
        save_checkpoint(target, model, trainer_state=state)
    assert (target / "model.safetensors").read_bytes() == before
    load_checkpoint(target)
