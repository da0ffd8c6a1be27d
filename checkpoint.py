"""What train.py keeps beside its loop: the run's state and files, exact resume, the random
streams, interval logging, stop requests and faults.

    Context                    this process under torchrun (train.setup builds it)
    Streams, stream_seed       the per-rank random generators: seeded per epoch, saved, restored
    SUMMARY_FIELDS, ...        the per-epoch record: summary.csv and the checkpoint's history
    Student, Run               a run's state; Run.save writes ckpt.pt / best.pt (the format eval.py
                               reads), Run.resume reads ckpt.pt back, Run.end_epoch records an epoch
    check_out_dir, RUN_ONLY    --out-dir and --resume checked before any work
    prepare_out_dir            the out dir made, a killed save's temp file removed
    environment, write_config  what a run ran on (config.json and the checkpoint's config)
    stop_requests, STOP        SIGTERM / Ctrl-C as a request to save and stop
    Meter                      the loss parts per step, read and logged once per interval
    fault_lines, kept_note     out of memory or a lost peer as one line naming the checkpoint kept
    error_line                 a run's error as the one line this rank prints (or None)
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import fileio
import nodes
from cli import check_writable_dir, fail
from download import DataError
from heartbeat import PeerWatch
from model import STUDENT_KIND, saved_model_args


class TrainError(RuntimeError):
    """A bad flag combination or an unusable file or folder; printed as one line."""


class FaultError(TrainError):
    """A fault one rank met (out of memory, a lost peer): printed by that rank, not only rank 0."""


@dataclass
class Context:
    """Where this process runs: one process, or one rank of torchrun."""
    ddp: bool                       # under torchrun (RANK set)
    rank: int                       # global rank; 0 prints and writes
    local_rank: int                 # the GPU index on this node
    world: int                      # number of processes
    device: torch.device
    watch: PeerWatch | None = None  # heartbeats between ranks (torchrun only)

    @property
    def master(self):
        return self.rank == 0

    def log(self, *msg):
        if self.master:
            print(*msg, flush=True)


# ----------------------------------------------------------------------------- random streams

def stream_seed(seed, epoch, rank, stream):
    """Each random stream's seed for (seed, epoch, rank): an epoch replays exactly on resume, and no
    two streams (ranks, epochs, or drop-path / augmentation / corruption) share a seed (hashed)."""
    h = hashlib.sha256(f"{seed}/{epoch}/{rank}/{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@dataclass
class Streams:
    """This rank's random generators: torch's global one (drop-path), augmentation, and with
    --split standard the fresh corruptions."""
    device: torch.device
    augment: torch.Generator
    corrupt: torch.Generator | None = None

    def seed(self, seed, epoch, rank):
        torch.manual_seed(stream_seed(seed, epoch, rank, "drop-path"))
        self.augment.manual_seed(stream_seed(seed, epoch, rank, "augment"))
        if self.corrupt is not None:
            self.corrupt.manual_seed(stream_seed(seed, epoch, rank, "corrupt"))

    def state(self):
        """Every generator's state, as a checkpoint stores it per rank."""
        s = {"cpu": torch.get_rng_state(), "augment": self.augment.get_state()}
        if self.corrupt is not None:
            s["corrupt"] = self.corrupt.get_state()
        if self.device.type == "cuda":
            s["cuda"] = torch.cuda.get_rng_state(self.device)
        return s

    def restore(self, s):
        torch.set_rng_state(s["cpu"])
        self.augment.set_state(s["augment"])
        if self.corrupt is not None:
            self.corrupt.set_state(s["corrupt"])
        if self.device.type == "cuda" and "cuda" in s:
            torch.cuda.set_rng_state(s["cuda"], self.device)


# ----------------------------------------------------------------------------- the per-epoch record
# One row per epoch in summary.csv and the checkpoint's history; row 0 is the untrained model, so
# the token similarities of thesis 4.4 can be read at the start and the end of training. Absent
# parts (no distillation token, no corruption token, strategy 1) are left empty.
SUMMARY_FIELDS = ["epoch", "step", "lr",
                  "train_loss",      # the optimised loss (thesis Eq. 4-7)
                  "train_cls",       # CE(class token head, y): the class token alone
                  "train_cls_corr",  # CE(cls + corr_proj(corr), y): strategies 2/3's label term
                  "train_dist",      # the distillation token's term (hard CE or tau^2 KL)
                  "train_type",      # CE(corruption token head, type)
                  "val_accuracy",    # the eval-mode (averaged) output; selects best.pt
                  "val_cls", "val_dist", "val_cls_corr",  # each head alone
                  "val_type",        # corruption-token type accuracy over the 11 types (thesis 4.3)
                  "val_cos_cls_dist", "val_cos_cls_corr",  # final-layer token cosines (thesis 4.4)
                  "epoch_time_s"]


def loss_columns(args):
    """summary column -> the part of losses.distillation_loss (or train.train_step) filling it."""
    proj = args.model == "cdeit" and args.strategy != 1  # label term: CE(cls + corr_proj(corr))
    cols = {"cls": "cls" if proj else "label"}
    if proj:
        cols["cls_corr"] = "label"
    if args.distill != "none":
        cols["dist"] = "teacher"
    if args.model == "cdeit":
        cols["type"] = "type"
    return cols


def val_columns(r):
    """scoring.summarize's result -> the val columns of SUMMARY_FIELDS."""
    h, cos = r["head_accuracy"], r["token_similarity"]
    return {"val_accuracy": h["combined"], "val_cls": h.get("cls"), "val_dist": h.get("dist"),
            "val_cls_corr": h.get("cls_corr"), "val_type": r["corruption_accuracy"],
            "val_cos_cls_dist": cos["cls_dist"], "val_cos_cls_corr": cos["cls_corr"]}


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.3f}"


def epoch_line(row):
    """The log line of one history row: val accuracy of the output and of each head, type
    accuracy and the token cosines (thesis 4.4)."""
    names = (("cls", "cls"), ("dist", "dist"), ("cls+corr", "cls_corr"), ("type", "type"))
    heads = " ".join(f"{k} {_fmt(row.get('val_' + c), True)}" for k, c in names
                     if row.get("val_" + c) is not None)
    cos = " ".join(f"cos(cls,{k}) {_fmt(row['val_cos_cls_' + k])}" for k in ("dist", "corr")
                   if row.get("val_cos_cls_" + k) is not None)
    line = f"val accuracy {_fmt(row['val_accuracy'], True)}"
    if heads:
        line += f" | heads {heads}"
    if cos:
        line += f" | {cos}"
    return line


def write_summary(history, path):
    w = io.StringIO()
    writer = csv.DictWriter(w, fieldnames=SUMMARY_FIELDS, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    fileio.atomic_write(path, w.getvalue(), "summary")


# ----------------------------------------------------------------------------- the run

@dataclass
class Student:
    """What the optimiser updates and a checkpoint saves."""
    model: nn.Module                  # the bare model (before DDP and torch.compile)
    model_args: dict                  # create_model's overrides: the file rebuilds the model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler      # --amp fp16's loss scale (disabled otherwise)


def _weights_args(model_args):
    # fused_attn picks a kernel, not the weights: a resume may change it
    return {k: v for k, v in model_args.items() if k != "fused_attn"}


@dataclass
class Run:
    """A run's state, and what a checkpoint saves of it: model, optimizer, every rank's RNG, epoch,
    step, best val accuracy, the history and this epoch's loss sums (an exact mid-epoch resume)."""
    args: argparse.Namespace        # the flags, saved as "config"
    ctx: Context
    student: Student
    streams: Streams
    data_args: dict                 # data.build_mix's arguments: the mix trained on
    teacher_info: dict | None       # the teacher file, its sha256 and fitted head; None for vit
    epoch: int = 0                  # epochs finished
    step: int = 0                   # optimiser steps taken
    best_val: float = -1.0          # the best val accuracy so far (selects best.pt)
    history: list = field(default_factory=list)  # SUMMARY_FIELDS rows; row 0: untrained
    resume_rng: dict | None = None  # this rank's saved generators, after a mid-epoch stop
    cols: dict = field(init=False)  # loss_columns(args)
    sums: torch.Tensor = field(init=False)  # (1 + len(cols),) float64: this epoch's loss sums

    def __post_init__(self):
        self.cols = loss_columns(self.args)
        self.sums = self.zero_sums()

    @property
    def ckpt_path(self):
        return os.path.join(self.args.out_dir, "ckpt.pt")

    @property
    def best_path(self):
        return os.path.join(self.args.out_dir, "best.pt")

    @property
    def summary_path(self):
        return os.path.join(self.args.out_dir, "summary.csv")

    def zero_sums(self):
        return torch.zeros(1 + len(self.cols), dtype=torch.float64)

    def resume(self, spe):
        """--resume: model, optimizer, counters and history from ckpt.pt; after a mid-epoch stop
        also this epoch's loss sums so far and this rank's RNG states (replayed by seed_epoch)."""
        args, ctx, path, student = self.args, self.ctx, self.ckpt_path, self.student
        ck = nodes.load_shared(path)  # rank 0's file, sent to every rank
        saved = saved_model_args(ck.get("model_args", {}))  # an older file: the timm layout
        data_args = self.data_args  # across nodes each holds its own folder: rank 0's root counts
        if nodes.where()["nodes"] > 1:
            data_args = dict(data_args, root=ck.get("data_args", {}).get("root"))
        was = dict(model=ck.get("model_name"), **_weights_args(saved), **ck.get("data_args", {}))
        now = dict(model=args.model, **_weights_args(student.model_args), **data_args)
        if ck.get("kind") != STUDENT_KIND or ck.get("data_args") != data_args or was != now:
            diff = ", ".join(f"{k} {was.get(k)} -> {now.get(k)}"
                             for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
            raise TrainError(f"{path} was trained with another model or data configuration "
                             f"({diff})")
        student.model.load_state_dict(ck["model"])
        student.optimizer.load_state_dict(ck["optimizer"])
        if "scaler" in ck:  # --amp fp16: the loss scale and its growth tracker continue too
            student.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step = ck["epoch"], ck["step"]
        self.best_val, self.history = ck["best_val_accuracy"], ck["history"]
        if self.step > self.epoch * spe:  # stopped mid-epoch
            self.sums = torch.tensor(ck["epoch_sums"], dtype=torch.float64)
            if ck["rng"]["world_size"] == ctx.world:
                self.resume_rng = ck["rng"]["ranks"][ctx.rank]
            else:
                ctx.log("warning: mid-epoch resume on another process count is not bit-exact")
        ctx.log(f"resumed {path}: epoch {self.epoch}, step {self.step}, "
                f"best val {self.best_val:.2%}")

    def seed_epoch(self):
        """Seed this epoch's generators from (seed, epoch, rank); after a mid-epoch stop, continue
        the saved states instead."""
        self.streams.seed(self.args.seed, self.epoch, self.ctx.rank)
        if self.resume_rng is not None:
            self.streams.restore(self.resume_rng)
            self.resume_rng = None

    def save(self, path):
        """The file eval.py reads: only tensors and plain values (torch.load weights_only=True).
        Every rank calls it (the RNG states are gathered); rank 0 writes."""
        args, ctx, student = self.args, self.ctx, self.student
        states = [self.streams.state()] * ctx.world
        if ctx.ddp:
            dist.all_gather_object(states, self.streams.state())
        if not ctx.master:
            return
        fileio.atomic_write(path, {
            "kind": STUDENT_KIND, "version": 1, "model_name": args.model,
            "model_args": student.model_args, "model": student.model.state_dict(),
            "optimizer": student.optimizer.state_dict(), "scaler": student.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step,
            "rng": {"world_size": ctx.world, "ranks": states}, "config": vars(args),
            "data_args": self.data_args, "dataset": args.dataset,
            "best_val_accuracy": self.best_val, "teacher": self.teacher_info,
            "history": self.history, "epoch_sums": self.sums.tolist()},
            "best checkpoint" if path == self.best_path else "checkpoint")

    def save_summary(self):
        if self.ctx.master:
            write_summary(self.history, self.summary_path)

    def record_untrained(self, metrics):
        """History row 0: the untrained model's val metrics (thesis 4.4 compares from here)."""
        self.history.append({"epoch": 0, "step": 0, **metrics})
        self.ctx.log(f"epoch 0 (untrained): {epoch_line(self.history[0])}")
        self.save_summary()

    def end_epoch(self, metrics, lr, spe, t_epoch):
        """Append the epoch's row (its val metrics: every rank has val_accuracy) and save: best.pt
        if val accuracy improved, summary.csv, ckpt.pt last (a kill before it reruns this epoch
        exactly and rewrites the others)."""
        self.epoch += 1
        train = {f"train_{k}": v / spe for k, v in zip(["loss", *self.cols], self.sums.tolist())}
        row = dict(epoch=self.epoch, step=self.step, lr=lr, **train, **metrics,
                   epoch_time_s=round(time.time() - t_epoch, 2))
        self.history.append(row)
        self.sums = self.zero_sums()
        improved = metrics["val_accuracy"] > self.best_val
        self.best_val = max(self.best_val, metrics["val_accuracy"])
        self.ctx.log(f"epoch {self.epoch}/{self.args.epochs}: train loss {row['train_loss']:.4f} | "
                     f"{epoch_line(row)}" + (" (best)" if improved else "")
                     + f" | {row['epoch_time_s']:.0f}s")
        if improved:  # best val accuracy; test data never selects anything
            self.save(self.best_path)
        self.save_summary()
        self.save(self.ckpt_path)


# ----------------------------------------------------------------------------- the out dir

# flags that change how a run executes, not what it trains: they may differ on --resume
RUN_ONLY = {"resume", "out_dir", "device", "data_dir", "mirror", "log_interval", "environment",
            "compile", "fused", "amp", "teacher"}


def check_out_dir(args):
    """--out-dir can be written, holds a checkpoint exactly when --resume says so, and a resumed
    run keeps every flag that shapes the training (a longer --epochs would stretch a cosine
    schedule half gone). Reads ckpt.pt's config; creates nothing."""
    check_writable_dir("--out-dir", args.out_dir)
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    if os.path.exists(ckpt) and not args.resume:
        fail("--out-dir", args.out_dir, "holds a run (ckpt.pt): pass --resume to continue it, or "
             "choose another --out-dir")
    if not args.resume:
        return
    if not os.path.exists(ckpt):
        if int(os.environ.get("RANK", "0")) != 0:
            return  # another node: rank 0 reads its ckpt.pt and sends the state (Run.resume)
        fail("--resume", ckpt, "no checkpoint there")
    try:
        was = torch.load(ckpt, map_location="cpu", weights_only=True).get("config") or {}
    except Exception as e:  # noqa: BLE001  (any damage: one line)
        why = str(e).strip().splitlines()[0][:120]
        fail("--resume", ckpt, f"unreadable checkpoint ({type(e).__name__}: {why})")
    now = vars(args)
    diff = [k for k in sorted(set(was) & set(now)) if k not in RUN_ONLY and was[k] != now[k]]
    if diff:
        what = ", ".join(f"--{k.replace('_', '-')} {was[k]} -> {now[k]}" for k in diff)
        fail("--resume", ckpt, f"was trained with other flags ({what}); resume with the run's own "
             "flags, or start a new --out-dir")


def prepare_out_dir(args):
    """Create --out-dir (check_out_dir has checked it, and the resume, before any work) and remove
    the temp file of a save a kill interrupted."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        probe = os.path.join(args.out_dir, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainError(f"cannot write to out dir {args.out_dir}: {e.strerror or e}") from None
    stale = fileio.temp_files(args.out_dir)  # a kill mid-save leaves its temp file only
    for f in stale:
        os.remove(f)
    if stale:
        print(f"removed {len(stale)} partial file(s) a killed run left in {args.out_dir}",
              flush=True)


def environment():
    """What a run ran on, for config.json and the checkpoint: git commit and whether tracked files
    differed from it, torch / triton / CUDA versions, GPU name and count (None where unknown)."""
    import importlib.metadata
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*cmd):
        try:
            r = subprocess.run(["git", "-C", here, *cmd], capture_output=True, text=True,
                               timeout=10, check=False)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status),
            "torch": str(torch.__version__), "triton": triton, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpu_count": gpus,
            "python": sys.version.split()[0]}


def write_config(args):
    """config.json: every flag and args.environment, as the run records them."""
    fileio.atomic_write(os.path.join(args.out_dir, "config.json"),
                        json.dumps(vars(args), indent=2) + "\n", "run config")


# ----------------------------------------------------------------------------- stop requests

@dataclass
class Stop:
    """Why the loop should save and stop at its next check (None: keep going)."""
    why: str | None = None


STOP = Stop()  # set by SIGTERM / Ctrl-C (a signal handler reaches only module state)


def _request_stop(signum, frame):
    STOP.why = signal.Signals(signum).name
    # a second signal acts at once
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


@contextlib.contextmanager
def stop_requests():
    """SIGTERM / Ctrl-C ask the loop to stop at its next check (it saves first) instead of killing
    it. Yields STOP."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    STOP.why = None
    try:
        yield STOP
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- interval logging

class Meter:
    """The loss and its parts per step, kept on the device and read once per interval: one host
    sync that averages over ranks, checks for a non-finite loss, adds to the epoch sums and logs a
    line."""

    def __init__(self, run, total):
        self.run, self.ctx, self.total = run, run.ctx, total
        self.interval, self.batch_size = run.args.log_interval, run.args.batch_size
        self.t_start, self.steps_done = time.time(), 0

    def start_epoch(self):
        # (interval, 1 + parts): the loss and its parts of each step since the last read
        self.buf = torch.zeros(self.interval, 1 + len(self.run.cols), device=self.ctx.device)
        self.n, self.t_int = 0, time.time()

    def add(self, loss, parts):
        row = [loss.detach().float()] + [parts[p].float() for p in self.run.cols.values()]
        self.buf[self.n] = torch.stack(row)
        self.n += 1
        self.steps_done += 1

    def due(self, last_of_epoch):
        # one process checks for a stop every step; DDP ranks must agree, so only at intervals
        return self.n == self.interval or last_of_epoch or (STOP.why and not self.ctx.ddp)

    def flush(self, lr):
        """Read back, check and log the interval; True when any rank asked to stop."""
        run, ctx = self.run, self.ctx
        flag = torch.tensor([float(STOP.why is not None)], device=ctx.device)
        if ctx.ddp:
            dist.all_reduce(self.buf)
            dist.all_reduce(flag)
            self.buf /= ctx.world
        rows = self.buf[:self.n].double().cpu()  # (n, 1 + parts)
        bad = (~torch.isfinite(rows[:, 0])).nonzero()
        if len(bad):
            kept = "no checkpoint was written"
            if run.epoch > 0:
                kept = f"the last good checkpoint is {run.ckpt_path} (epoch {run.epoch})"
            step = run.step - self.n + int(bad[0]) + 1
            raise TrainError(f"non-finite loss at step {step}; stopped, {kept}")
        run.sums += rows.sum(0)
        m = rows.mean(0)
        rate = self.n * self.batch_size / (time.time() - self.t_int)
        eta = (self.total - run.step) * (time.time() - self.t_start) / self.steps_done
        parts = " ".join(f"{k.replace('_', '+')} {m[j + 1]:.3f}" for j, k in enumerate(run.cols))
        ctx.log(f"step {run.step}/{self.total} | epoch {run.epoch + 1} | loss {m[0]:.4f} ({parts}) "
                f"| lr {lr:.2e} | {rate:.0f} img/s | eta {eta / 60:.1f}m")
        self.buf.zero_()
        self.n, self.t_int = 0, time.time()
        return flag.item() > 0


# ----------------------------------------------------------------------------- faults

def kept_note(out_dir):
    """What a fault's line says about the files kept."""
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt):
        return f"the last checkpoint {ckpt} is kept"
    return "no checkpoint was written yet"


@contextlib.contextmanager
def fault_lines(ctx, batch_size, out_dir):
    """The faults a long run meets, turned into one line (FaultError): out of GPU memory, and under
    torchrun a collective that failed because another rank is gone."""
    try:
        yield
    except torch.OutOfMemoryError:
        per = batch_size // ctx.world
        over = "--batch-size"
        if ctx.ddp:
            over = f"--batch-size {batch_size} over {ctx.world} processes"
        smaller = max(ctx.world, batch_size // 2)
        raise FaultError(f"out of GPU memory on {ctx.device} at {per} images per GPU ({over}): use "
                         f"a smaller --batch-size (e.g. {smaller}) in a new --out-dir (--resume "
                         f"needs the same flags); {kept_note(out_dir)}") from None
    except RuntimeError as e:
        why = ctx.watch.verdict() if ctx.watch and not isinstance(e, TrainError) else None
        if why is None:
            raise
        raise FaultError(f"{why}; {kept_note(out_dir)}") from None


def error_line(e, out_dir):
    """The line this rank prints for a run's error e, or None where another rank speaks for it:
    a fault or a RankError by the rank that met it, Stopped by rank 0, any other error by rank 0
    and by every other node's local rank 0 (each on its own console), named with nodes.who()."""
    here, who = nodes.where(), nodes.who() + ": "
    if isinstance(e, nodes.RankError):
        return f"error: {e}"  # already named
    if isinstance(e, FaultError):
        return f"error: {who if 'RANK' in os.environ else ''}{e}"
    if isinstance(e, nodes.Stopped):
        return f"error: {who}stopped: {e}" if here["rank"] == 0 else None
    if here["rank"] != 0 and (here["local_rank"] != 0 or here["node"] == 0):
        return None
    more = ""
    if isinstance(e, fileio.WriteError) and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        more = "; then continue with --resume"
    # the download instructions are several lines (one per file); every other error is one
    text = str(e).strip() if isinstance(e, DataError) else " ".join(str(e).split())
    return f"error: {who if here['rank'] != 0 else ''}{text}{more}"
