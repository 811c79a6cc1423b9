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
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from melle.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from melle.config import PRESETS, preset_config
from melle.data import Batch, MelDataset, bucket_batches, collate, read_manifest
from melle.losses import LossConfig, alignment_score, melle_loss
from melle.model import Melle, count_parameters
from melle.text import build_tokenizer, tokenizer_from_spec

LOG_FIELDS = ["step", "epoch", "minutes", "lr", "total", "reg", "kl", "flux", "stop", "guided", "align"]


@dataclass
class TrainConfig:
    lr: float = 1e-3  # peak learning rate (paper: 5e-4 at 480K-frame batches)
    warmup_steps: int = 1000  # linear warm-up (paper: 32K)
    hold_steps: int = 10_000  # steps at peak before the linear decay: let alignment form first
    total_steps: int = 30_000  # the decay reaches 0 here
    batch_frames: int = 4000  # padded mel frames per batch per process
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 25
    scheduled_sampling: float = 0.0  # share of input groups replaced by the model's own predictions
    loss: LossConfig = field(default_factory=LossConfig)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_from = self.warmup_steps + self.hold_steps
        if step < decay_from:
            return self.lr
        return self.lr * max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_from))


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


def report_schedule_changes(saved: dict, now: dict, rank: int) -> None:
    """Say which settings a resumed run changes: the command line, not the checkpoint, decides them.

    A setting newer than the saved run shows as "unset -> value"; a checkpoint that saved no
    settings at all has nothing to compare.
    """
    if not saved:
        return
    changed = {k: (saved.get(k, "unset"), now[k]) for k in now if saved.get(k, "unset") != now[k]}
    if changed and rank == 0:
        print("resuming with settings that differ from the saved run (saved -> now): "
              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))


def build_model(args, train_cfg: TrainConfig, out: Path) -> tuple[Melle, dict | None]:
    latest = out / "latest"
    if args.resume and latest.exists():
        return load_checkpoint(latest), load_trainer_state(latest)
    texts = [u.text for u in read_manifest(args.manifest)]
    tokenizer = build_tokenizer(args.tokenizer, texts)
    overrides = dict(tokenizer=tokenizer.spec(), n_text_vocab=tokenizer.vocab_size, mel_preset=args.mel_preset)
    if args.r:
        overrides["r"] = args.r
    torch.manual_seed(train_cfg.seed)
    return Melle(preset_config(args.preset, **overrides)), None


def train(args) -> Path:
    rank, world = setup_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=args.warmup_steps, hold_steps=args.hold_steps,
                            total_steps=args.total_steps, batch_frames=args.batch_frames, seed=args.seed,
                            log_every=args.log_every, scheduled_sampling=args.scheduled_sampling,
                            loss=LossConfig(guided_weight=args.guided_weight, flux_form=args.flux_form,
                                            kl_start_step=args.kl_start_step))
    model, state = build_model(args, train_cfg, out)
    cfg = model.cfg
    tokenizer = tokenizer_from_spec(cfg.tokenizer)
    cache_dir = Path(args.cache) if args.cache else Path(args.manifest).parent / "cache"
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 fills the shared cache first
    dataset = MelDataset(args.manifest, cfg, tokenizer, cache_dir, show_progress=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()

    model.train()
    device = next(model.parameters()).device
    device_type = device.type
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=(0.9, 0.98),
                                  weight_decay=train_cfg.weight_decay)
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        report_schedule_changes(state.get("train_config", {}), dataclasses.asdict(train_cfg), rank)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
    if rank == 0:
        print(f"model {count_parameters(model) / 1e6:.2f}M params, r={cfg.r}, {len(dataset)} utterances, "
              f"world {world}, starting at step {step}")

    log_path = out / "train_log.csv"
    start = last_save = time.monotonic()
    minutes_before = state["minutes"] if state else 0.0
    progress = tqdm(total=min(args.steps, train_cfg.total_steps - step), disable=rank != 0, desc="train")

    def save() -> None:
        if world > 1:
            check_ranks_in_sync(model, out, rank, world)
        if rank == 0:
            trainer_state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                             "batch_in_epoch": batch_in_epoch, "torch_rng": torch.get_rng_state(),
                             "minutes": minutes_before + (time.monotonic() - start) / 60,
                             "train_config": dataclasses.asdict(train_cfg)}
            save_checkpoint(out / "latest", model, trainer_state)

    steps_done = 0
    with StopRequest() as stop:
        while steps_done < args.steps and step < train_cfg.total_steps:
            batches = bucket_batches(dataset.n_frames, train_cfg.batch_frames, train_cfg.seed, epoch, rank, world)
            for indices in batches[batch_in_epoch:]:
                batch: Batch = collate([dataset[i] for i in indices], cfg)
                for group in optimizer.param_groups:
                    group["lr"] = train_cfg.lr_at(step)
                log_now = step % train_cfg.log_every == 0
                # Attention maps cost a little: compute them for the guided loss or the log only.
                wants_attention = train_cfg.loss.guided_weight > 0 or log_now
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    frames = (feed_own_predictions(model, batch, train_cfg.scheduled_sampling)
                              if train_cfg.scheduled_sampling > 0 else batch.frames)
                    out_ = ddp_model(batch.text, batch.text_lens, frames, batch.n_groups,
                                     attention_layers=train_cfg.loss.guided_layers if wants_attention else ())
                terms = melle_loss(out_, batch.mel, batch.n_frames, batch.n_groups, batch.text_lens, step, train_cfg.loss)
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                optimizer.step()
                step, steps_done, batch_in_epoch = step + 1, steps_done + 1, batch_in_epoch + 1
                progress.update()
                if log_now and rank == 0:
                    row = {"step": step, "epoch": epoch, "lr": f"{train_cfg.lr_at(step):.3g}",
                           "minutes": f"{minutes_before + (time.monotonic() - start) / 60:.2f}",
                           "align": f"{alignment_score(out_.attention, batch.text_lens, batch.n_groups):.3f}",
                           **{k: f"{v:.4f}" for k, v in terms.as_floats().items()}}
                    write_header = not log_path.exists()
                    with open(log_path, "a", newline="") as f:
                        writer = csv.DictWriter(f, LOG_FIELDS)
                        if write_header:
                            writer.writeheader()
                        writer.writerow(row)
                    progress.set_postfix(loss=row["total"], align=row["align"])
                if not torch.isfinite(terms.total):
                    raise FloatingPointError(f"loss became {float(terms.total)} at step {step}; "
                                             "lower --lr or resume from the last checkpoint")
                out_of_time = args.max_minutes and (time.monotonic() - start) / 60 >= args.max_minutes
                if time.monotonic() - last_save >= args.checkpoint_minutes * 60:
                    save()
                    last_save = time.monotonic()
                stop_asked = stop.agreed(world, device)
                if steps_done >= args.steps or step >= train_cfg.total_steps or out_of_time or stop_asked:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
                continue
            break
    save()
    progress.close()
    if world > 1:
        dist.barrier()  # wait for rank 0's save: a rank tearing gloo down alone can abort ("terminate called")
        dist.destroy_process_group()
    return out / "latest"


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
    p.add_argument("--batch-frames", type=int, default=TrainConfig.batch_frames)
    p.add_argument("--guided-weight", type=float, default=0.0, help="guided-attention loss weight (0 = off)")
    p.add_argument("--flux-form", choices=["paper", "bounded"], default="bounded")
    p.add_argument("--kl-start-step", type=int, default=LossConfig.kl_start_step)
    p.add_argument("--scheduled-sampling", type=float, default=0.0, metavar="RATE",
                   help="share of input frame groups replaced by the model's own teacher-forced predictions "
                        "(0 = pure teacher forcing); costs one extra no-grad forward per step")
    p.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast the decoder's matmuls (weights, optimizer and heads stay FP32); "
                        "1.15-1.3x faster demo steps on 2-core CPUs with AVX512-BF16/AMX")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"checkpoint: {train(args)}")


if __name__ == "__main__":
    main()
