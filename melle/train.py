"""Train MELLE: ``python -m melle.train --manifest M --preset small --out DIR [--resume]``.

Runs on one process or under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl
on GPU). Checkpoints go to ``DIR/latest`` every ``--checkpoint-minutes`` with the
optimizer state, so a run can stop at any time (``--max-minutes``, Ctrl-C or ``kill``: the
step in flight finishes and is saved) and resume.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from melle.core.audio import get_preset
from melle.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, save_checkpoint
from melle.core.cli import ExitCode, OutputError, UserError, run_cli
from melle.core.config import PRESETS, preset_config
from melle.data import Batch, MelDataset, bucket_batches, collate, read_corpus
from melle.losses import LossConfig, LossTerms, alignment_score, melle_loss
from melle.model import Melle, MelleOutput, count_parameters
from melle.core.text import build_tokenizer, tokenizer_from_spec

QUALITY_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
LOG_FIELDS = ["step", "epoch", "minutes", "lr", "total", "reg", "kl", "flux", "stop", "guided", "align"]


@dataclass
class TrainConfig:
    lr: float = 1e-3  # peak learning rate (paper: 5e-4 at 480K-frame batches)
    cycle_start: int = 0  # the step this learning-rate cycle starts at (a resumed run may begin a new one)
    warmup_steps: int = 1000  # linear warm-up from cycle_start (paper: 32K)
    hold_steps: int = 10_000  # steps at peak before the decay: let alignment form first
    total_steps: int = 30_000  # the decay reaches 0 at this (absolute) step
    decay: str = "linear"  # "linear" or "cosine" from the peak to 0
    batch_frames: int = 4000  # padded mel frames per batch per process
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 25
    scheduled_sampling: float = 0.0  # share of input groups replaced by the model's own predictions
    input_noise: float = 0.0  # std of Gaussian noise added to the decoder's input frames (log-mel units)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.decay not in ("linear", "cosine"):
            raise ValueError(f"decay must be 'linear' or 'cosine', got {self.decay!r}")

    def lr_at(self, step: int) -> float:
        into_cycle = step - self.cycle_start
        if into_cycle < self.warmup_steps:
            return self.lr * (max(0, into_cycle) + 1) / self.warmup_steps
        decay_from = self.cycle_start + self.warmup_steps + self.hold_steps
        if step < decay_from:
            return self.lr
        left = max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_from))  # 1 -> 0
        return self.lr * (left if self.decay == "linear" else 0.5 * (1.0 - math.cos(math.pi * left)))


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_ranks_in_sync(model: torch.nn.Module, out: Path, rank: int, world: int) -> None:
    """Gather every rank's weight digest; record them, and stop loudly if they diverged."""
    digests = [None] * world
    dist.all_gather_object(digests, weights_digest(model))
    if rank == 0:
        (out / "ddp_check.json").write_text(json.dumps({"world": world, "digests": digests}, indent=1))
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks hold different weights: {digests}")


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request the loop honours after the step in flight.

    Stopping then saves a checkpoint instead of losing the work since the last one; the first
    signal restores the previous handlers, so a second one stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _request(self, signum, frame) -> None:
        self.requested = True
        self._restore()
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving "
              "(send it again to stop at once)", flush=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, world: int, device: torch.device) -> bool:
        """Under DDP every rank must stop after the same step, even if only one got the signal."""
        if world == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def feed_own_predictions(model: Melle, batch: Batch, rate: float) -> torch.Tensor:
    """Input frame groups with a share ``rate`` replaced by the model's own predictions of them.

    Parallel scheduled sampling (Duckworth et al., 2019): one no-grad teacher-forced pass
    predicts every group; feeding some of those back trains the decoder on the kind of input
    free-running decoding gives it, instead of only ever on the recording's true frames.
    """
    with torch.no_grad():
        own = model(batch.text, batch.text_lens, batch.frames, batch.n_groups).y_coarse
    pick = torch.rand(batch.frames.shape[:2], device=batch.frames.device) < rate  # [B, G]
    return torch.where(pick[..., None], own.reshape(batch.frames.shape), batch.frames)


def run_probe(checkpoint: Path, manifest: str, limit: int, out: Path) -> None:
    """Score ``checkpoint`` on the first ``limit`` utterances of a held-out ``manifest`` with
    ``benchmarks/quality.py``: the reference decoding freely and teacher-forced, Whisper WER.

    Runs in a child process while training waits, so the probe's threads do not compete with
    the training step; a failed probe is reported and training goes on.
    """
    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()][:limit]
    out.mkdir(parents=True, exist_ok=True)
    sentences = out / "sentences.txt"
    sentences.write_text("".join(row["text"] + "\n" for row in rows))
    command = [sys.executable, str(QUALITY_SCRIPT), "--ckpt", str(checkpoint), "--sentences", str(sentences),
               "--ground-truth", str(manifest), "--limit", str(limit), "--out", str(out),
               "--align-guide", "off"]  # free-running, as every probe before alignment-guided decoding
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"probe at {out} failed (exit {result.returncode}); training goes on:\n"
              f"{result.stderr.strip()[-2000:]}", flush=True)
    else:
        print(f"probe: {out / 'quality.md'}", flush=True)


def report_schedule_changes(saved: dict, now: dict, rank: int) -> None:
    """Say which settings a resumed run changes: the command line, not the checkpoint, decides them.

    A setting newer than the saved run shows as "unset -> value"; a checkpoint that saved no
    settings at all has nothing to compare. Values compare as json holds them ((0, 1) == [0, 1]).
    """
    if not saved:
        return
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    changed = {k: (saved.get(k, "unset"), now[k]) for k in now if saved.get(k, "unset") != now[k]}
    if changed and rank == 0:
        print("resuming with settings that differ from the saved run (saved -> now): "
              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's schedule and loss settings from the command line."""
    return TrainConfig(lr=args.lr, cycle_start=args.cycle_start, warmup_steps=args.warmup_steps,
                       hold_steps=args.hold_steps, total_steps=args.total_steps, decay=args.decay,
                       batch_frames=args.batch_frames, seed=args.seed, log_every=args.log_every,
                       scheduled_sampling=args.scheduled_sampling, input_noise=args.input_noise,
                       loss=LossConfig(guided_weight=args.guided_weight, flux_form=args.flux_form,
                                       kl_start_step=args.kl_start_step, guided_layers=args.guided_layers,
                                       guided_heads=args.guided_heads))


def build_model(args, train_cfg: TrainConfig, out: Path) -> tuple[Melle, dict | None]:
    """The model and trainer state to resume from ``OUT/latest``, or a new model (seeded) and None."""
    latest = out / "latest"
    if args.resume and latest.exists():
        model, state = load_checkpoint(latest), load_trainer_state(latest)
    else:
        texts = [u.text for u in read_corpus(args.manifest)]
        tokenizer = build_tokenizer(args.tokenizer, texts)
        overrides = dict(tokenizer=tokenizer.spec(), n_text_vocab=tokenizer.vocab_size, mel_preset=args.mel_preset)
        if args.r:
            overrides["r"] = args.r
        torch.manual_seed(train_cfg.seed)
        model, state = Melle(preset_config(args.preset, **overrides)), None
    loss = train_cfg.loss
    # The config tells inference which heads align (alignment-guided decoding): at first every guided
    # head; a choice measured since (python -m melle.align_heads --write) is kept.
    if loss.guided_weight > 0 and not model.cfg.guided_heads:
        model.cfg.guided_heads = [[layer, head] for layer in loss.guided_layers for head in loss.guided_heads]
    return model, state


def append_log_row(path: Path, row: dict) -> None:
    """Add ``row`` to the csv training log, writing the header when the log is new."""
    write_header = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        if write_header:
            writer.writeheader()
        writer.writerow(row)


class Trainer:
    """One training run (one process of it under torchrun): set up by the constructor, then
    :meth:`run` repeats :meth:`train_step`, :meth:`log`, :meth:`save` and :meth:`probe`.

    ``step``, ``epoch`` and ``batch_in_epoch`` say where the run is: the batch after the last
    one trained. With the optimizer state and the RNG state they are all a resume needs.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world = setup_distributed()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = train_config_from_args(args)
        self.model, state = build_model(args, self.cfg, self.out)
        self.dataset = self._load_dataset()
        self.model.train()
        self.device = next(self.model.parameters()).device
        self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, betas=(0.9, 0.98),
                                           weight_decay=self.cfg.weight_decay)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.minutes_before = 0.0  # training time of the runs this one resumes
        self._epoch_batches: tuple[int, list[list[int]]] | None = None  # (epoch, its batches for this rank)
        if state is not None:
            self._restore(state)
        self.started = self.last_save = time.monotonic()
        if self.rank == 0:
            print(f"model {count_parameters(self.model) / 1e6:.2f}M params, r={self.model.cfg.r}, "
                  f"{len(self.dataset)} utterances, world {self.world}, starting at step {self.step}")

    def _load_dataset(self) -> MelDataset:
        """The corpus with its mel/token cache; under DDP rank 0 fills the shared cache first."""
        args = self.args
        cache_dir = Path(args.cache) if args.cache else Path(args.manifest).parent / "cache"
        if self.world > 1 and self.rank != 0:
            dist.barrier()
        dataset = MelDataset(args.manifest, self.model.cfg, tokenizer_from_spec(self.model.cfg.tokenizer),
                             cache_dir, show_progress=self.rank == 0)
        if self.world > 1 and self.rank == 0:
            dist.barrier()
        return dataset

    def _restore(self, state: dict) -> None:
        """Continue from a saved trainer state (see :func:`melle.checkpoint.load_trainer_state`)."""
        report_schedule_changes(state.get("train_config", {}), dataclasses.asdict(self.cfg), self.rank)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise CheckpointError(f"{self.out / 'latest'}: the optimizer state does not fit the model ({err}); "
                                  "delete its trainer files to restart the optimizer") from None
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.minutes_before = state["minutes"]
        torch.set_rng_state(state["torch_rng"])  # dropout, noise and sampling continue their sequence
        if state.get("n_utterances") != len(self.dataset):
            # Another corpus (or one the run did not record): the saved place in the epoch
            # indexes batches of the old one.
            if self.rank == 0:
                print(f"the corpus changed ({state.get('n_utterances', 'unrecorded')} -> {len(self.dataset)} "
                      "utterances): starting a new epoch")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def minutes(self) -> float:
        """Training time of the whole run, resumed parts included."""
        return self.minutes_before + (time.monotonic() - self.started) / 60

    def run(self) -> Path:
        """Train until --steps, the end of the schedule, --max-minutes or a stop signal; save; return OUT/latest."""
        args, cfg = self.args, self.cfg
        progress = tqdm(total=min(args.steps, cfg.total_steps - self.step), disable=self.rank != 0, desc="train")
        steps_done = 0
        with StopRequest() as stop:
            while steps_done < args.steps and self.step < cfg.total_steps:
                log_now = self.step % cfg.log_every == 0
                batch, output, terms = self.train_step(self._next_batch(), with_attention=log_now)
                steps_done += 1
                progress.update()
                if log_now and self.rank == 0:
                    self.log(batch, output, terms, progress)
                if not torch.isfinite(terms.total):
                    raise FloatingPointError(f"loss became {float(terms.total)} at step {self.step}; "
                                             "lower --lr or resume from the last checkpoint")
                out_of_time = args.max_minutes and (time.monotonic() - self.started) / 60 >= args.max_minutes
                probe_now = args.probe_every and self.step % args.probe_every == 0
                if probe_now or time.monotonic() - self.last_save >= args.checkpoint_minutes * 60:
                    self.save()
                if probe_now:
                    self.probe()
                if stop.agreed(self.world, self.device) or out_of_time:  # every rank agrees every step
                    break
        self.save()
        progress.close()
        self._finish_distributed()
        return self.out / "latest"

    def _next_batch(self) -> list[int]:
        """Dataset indices of the batch at (epoch, batch_in_epoch), moving to a new epoch after the last one."""
        if self._epoch_batches is None or self._epoch_batches[0] != self.epoch:
            self._epoch_batches = (self.epoch, bucket_batches(self.dataset.n_frames, self.cfg.batch_frames,
                                                              self.cfg.seed, self.epoch, self.rank, self.world))
        batches = self._epoch_batches[1]
        if self.batch_in_epoch >= len(batches):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            return self._next_batch()
        return batches[self.batch_in_epoch]

    def train_step(self, indices: list[int], with_attention: bool) -> tuple[Batch, MelleOutput, LossTerms]:
        """One optimizer step on the utterances ``indices``; the output keeps attention maps when asked."""
        batch = collate([self.dataset[i] for i in indices], self.model.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(self.step)
        # Attention maps cost a little: compute them for the guided loss or the log only.
        wants_attention = self.cfg.loss.guided_weight > 0 or with_attention
        output = self._forward(batch, self.cfg.loss.guided_layers if wants_attention else ())
        terms = melle_loss(output, batch.mel, batch.n_frames, batch.n_groups, batch.text_lens, self.step, self.cfg.loss)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        return batch, output, terms

    def _forward(self, batch: Batch, attention_layers: tuple[int, ...]) -> MelleOutput:
        """The model on ``batch`` (bf16 autocast with --precision bf16), its input frames perturbed
        by scheduled sampling and input noise when those are on."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16"):
            frames = (feed_own_predictions(self.model, batch, self.cfg.scheduled_sampling)
                      if self.cfg.scheduled_sampling > 0 else batch.frames)
            if self.cfg.input_noise > 0:
                frames = frames + self.cfg.input_noise * torch.randn_like(frames)
            return self.ddp_model(batch.text, batch.text_lens, frames, batch.n_groups,
                                  attention_layers=attention_layers)

    def log(self, batch: Batch, output: MelleOutput, terms: LossTerms, progress: tqdm) -> None:
        """Append the step just trained to OUT/train_log.csv and show its loss on the progress bar."""
        row = {"step": self.step, "epoch": self.epoch, "lr": f"{self.cfg.lr_at(self.step):.3g}",
               "minutes": f"{self.minutes():.2f}",
               "align": f"{alignment_score(output.attention, batch.text_lens, batch.n_groups):.3f}",
               **{k: f"{v:.4f}" for k, v in terms.as_floats().items()}}
        append_log_row(self.out / "train_log.csv", row)
        progress.set_postfix(loss=row["total"], align=row["align"])

    def save(self) -> None:
        """Write OUT/latest (rank 0), after checking under DDP that every rank holds the same weights."""
        if self.world > 1:
            check_ranks_in_sync(self.model, self.out, self.rank, self.world)
        if self.rank == 0:
            save_checkpoint(self.out / "latest", self.model, self.trainer_state())
        self.last_save = time.monotonic()

    def trainer_state(self) -> dict:
        """What a resume needs besides the weights (the format of :func:`melle.checkpoint.load_trainer_state`)."""
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "torch_rng": torch.get_rng_state(),
                "minutes": self.minutes(), "n_utterances": len(self.dataset),
                "train_config": dataclasses.asdict(self.cfg)}

    def probe(self) -> None:
        """Score the checkpoint just saved on held-out sentences (rank 0; the other ranks go on)."""
        if self.rank == 0:
            run_probe(self.out / "latest", self.args.probe_manifest, self.args.probe_limit,
                      self.out / "probes" / f"step{self.step}")

    def _finish_distributed(self) -> None:
        """Leave the process group once rank 0 has saved."""
        if self.world > 1:
            dist.barrier()  # a rank tearing gloo down alone can abort ("terminate called")
            dist.destroy_process_group()


def train(args: argparse.Namespace) -> Path:
    """Run the training ``args`` describe; the checkpoint it leaves (OUT/latest)."""
    return Trainer(args).run()


def int_list(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)`` for argparse."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", required=True, help="jsonl with audio, text, speaker")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--out", required=True, help="run directory (checkpoints in OUT/latest)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest if it exists")
    p.add_argument("--r", type=int, help="reduction factor (default: the preset's)")
    p.add_argument("--tokenizer", choices=["chars", "phonemes", "bpe"], default="phonemes")
    p.add_argument("--mel-preset", default="hifigan-22k")
    p.add_argument("--cache", help="mel/token cache directory (default: beside the manifest)")
    p.add_argument("--steps", type=int, default=1_000_000, help="optimizer steps in this run")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and checkpoint) after this long; 0 = no limit")
    p.add_argument("--checkpoint-minutes", type=float, default=10)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--hold-steps", type=int, default=TrainConfig.hold_steps)
    p.add_argument("--total-steps", type=int, default=TrainConfig.total_steps)
    p.add_argument("--cycle-start", type=int, default=TrainConfig.cycle_start,
                   help="step the learning-rate cycle (warm-up, hold, decay) starts at: a resumed run "
                        "starts a new cycle by passing its current step")
    p.add_argument("--decay", choices=["linear", "cosine"], default=TrainConfig.decay)
    p.add_argument("--batch-frames", type=int, default=TrainConfig.batch_frames)
    p.add_argument("--guided-weight", type=float, default=0.0, help="guided-attention loss weight (0 = off)")
    p.add_argument("--guided-layers", type=int_list, default=LossConfig.guided_layers, metavar="I,J",
                   help="layers whose guided heads get the diagonal prior")
    p.add_argument("--guided-heads", type=int_list, default=LossConfig.guided_heads, metavar="I,J",
                   help="guided heads in each of --guided-layers")
    p.add_argument("--flux-form", choices=["paper", "bounded"], default="bounded")
    p.add_argument("--kl-start-step", type=int, default=LossConfig.kl_start_step)
    p.add_argument("--scheduled-sampling", type=float, default=0.0, metavar="RATE",
                   help="share of input frame groups replaced by the model's own teacher-forced predictions "
                        "(0 = pure teacher forcing); costs one extra no-grad forward per step")
    p.add_argument("--input-noise", type=float, default=0.0, metavar="STD",
                   help="Gaussian noise added to the decoder's input frames, so it learns to read imperfect ones")
    p.add_argument("--probe-every", type=int, default=0, metavar="STEPS",
                   help="every STEPS steps, save and score the checkpoint on held-out sentences "
                        "(benchmarks/quality.py, into OUT/probes/stepN); 0 = never")
    p.add_argument("--probe-manifest", help="held-out corpus jsonl for --probe-every (e.g. corpus/joe/test.jsonl)")
    p.add_argument("--probe-limit", type=int, default=20, help="held-out utterances per probe")
    p.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast the decoder's matmuls (weights, optimizer and heads stay FP32); "
                        "1.15-1.3x faster demo steps on 2-core CPUs with AVX512-BF16/AMX")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args(argv)
    validate_args(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"checkpoint: {train(args)}")


def validate_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options before any model, data or process group is touched.

    Option values and conflicts: ``p.error`` (exit 2). Input files that are missing or unreadable:
    :class:`UserError` (exit 3); an output that cannot be a run directory: :class:`OutputError` (exit 5).
    """
    ranges = [  # (option, value, acceptable, what it must be); NaN fails every check
        ("--steps", args.steps, args.steps >= 1, ">= 1"),
        ("--lr", args.lr, 0 < args.lr < math.inf, "> 0 (and finite)"),
        ("--warmup-steps", args.warmup_steps, args.warmup_steps >= 1, ">= 1"),
        ("--hold-steps", args.hold_steps, args.hold_steps >= 0, ">= 0"),
        ("--total-steps", args.total_steps, args.total_steps >= 1, ">= 1"),
        ("--batch-frames", args.batch_frames, args.batch_frames >= 1, ">= 1"),
        ("--threads", args.threads, args.threads >= 0, ">= 0 (0 = torch default)"),
        ("--scheduled-sampling", args.scheduled_sampling, 0 <= args.scheduled_sampling <= 1, "a share in [0, 1]"),
        ("--guided-weight", args.guided_weight, 0 <= args.guided_weight < math.inf, ">= 0"),
        ("--kl-start-step", args.kl_start_step, args.kl_start_step >= 0, ">= 0"),
        ("--log-every", args.log_every, args.log_every >= 1, ">= 1"),
        ("--checkpoint-minutes", args.checkpoint_minutes, 0 < args.checkpoint_minutes < math.inf, "> 0"),
        ("--max-minutes", args.max_minutes, 0 <= args.max_minutes < math.inf, ">= 0 (0 = no limit)"),
        ("--input-noise", args.input_noise, 0 <= args.input_noise < math.inf, "a standard deviation: >= 0"),
        ("--probe-every", args.probe_every, args.probe_every >= 0, ">= 0 (0 = never)"),
        ("--probe-limit", args.probe_limit, args.probe_limit >= 1, ">= 1"),
    ]
    if args.r is not None:
        ranges.append(("--r", args.r, args.r >= 1, ">= 1 (mel frames per decoder step)"))
    for option, value, ok, what in ranges:
        if not ok:
            p.error(f"{option} must be {what}, got {value}")
    if args.probe_every and not args.probe_manifest:
        p.error("--probe-every needs --probe-manifest (a held-out corpus jsonl)")
    if not 0 <= args.cycle_start < args.total_steps:
        p.error(f"--cycle-start must lie in [0, --total-steps), got {args.cycle_start}")
    try:
        get_preset(args.mel_preset)
    except ValueError as err:
        p.error(f"--mel-preset: {err}")

    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise UserError(f"--manifest {manifest} {'is a directory' if manifest.is_dir() else 'does not exist'}: "
                        "give a corpus jsonl (build one with `python scripts/build_corpus.py --out corpus/joe ...`)",
                        ExitCode.INPUT)
    if args.probe_manifest and not Path(args.probe_manifest).is_file():
        raise UserError(f"--probe-manifest {args.probe_manifest} does not exist: give a held-out corpus jsonl "
                        "(e.g. corpus/joe/test.jsonl from scripts/build_corpus.py)", ExitCode.INPUT)
    for option, path in (("--manifest", manifest), ("--probe-manifest", args.probe_manifest)):
        if path:
            try:
                read_corpus(path)  # a bad row fails here, not after the model is built
            except (ValueError, OSError) as err:
                raise UserError(f"{option}: {err}", ExitCode.INPUT) from None
    for option, path in (("--out", Path(args.out)), ("--cache", Path(args.cache) if args.cache else None)):
        if path is not None and path.exists() and not path.is_dir():
            raise OutputError(f"{option} {path} is a file; give a directory (it is created when missing)")


EXPECTED_ERRORS = {
    CheckpointError: ExitCode.MODEL,  # --resume from an unreadable OUT/latest
    FloatingPointError: ExitCode.NUMERIC,  # the loss became NaN/inf
}


def cli() -> None:
    """Entry point: expected failures are one line on stderr and an exit code (melle.core.cli); ``main``
    itself raises, for tests and callers that want the exception."""
    sys.exit(run_cli(main, EXPECTED_ERRORS))


if __name__ == "__main__":
    cli()
