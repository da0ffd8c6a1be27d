"""Train a ViT / DeiT / CdeiT student on the seed's 11-type corruption mix (seed 3.4).

    python train.py --model cdeit --distill hard                  # one process (GPU if there is one)
    torchrun --nproc_per_node=8 train.py --model cdeit --distill hard
    python train.py --model cdeit --distill hard --dataset synthetic --device cpu   # offline smoke run
    python train.py --model cdeit --distill hard --split standard  # fresh corruptions every epoch

Top to bottom: flags (defaults = the seed's Table 1 / Table 4 best row), distributed set-up,
(1) data: download or synthesise, build the mix; (2) the teacher, once per dataset (teacher.py:
DeiT-III Small features cached fp16, a fresh 10-way head fitted on them (seed 4.1), logits for
every training row cached); (3) the student loop: device-resident loader, with --split standard
fresh corruptions per batch on the device, batched augmentation, bf16 autocast, AdamW, warmup +
cosine stepped per epoch (--lr-per), DDP; atomic checkpoints, exact resume, clean stop on SIGTERM / Ctrl-C.
Only rank 0 prints and writes. Checkpoint format: what eval.py reads (see `Run.save` below).
"""
import argparse
import contextlib
import csv
import datetime
import hashlib
import io
import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import fileio
import losses
import teacher  # the teacher stage (seed 4.1): cached features, fitted head, logits
from augment import Augment, teacher_view
from cli import (FlagError, Parser, bounded, check_device, check_existing_file, check_writable_dir, fail, non_negative,
                 positive, positive_int, probability, rate, seed_int, url)
from download import DataError, download, teacher_path
from eval import run_student, summarize  # val metrics computed exactly as eval.py reports them
from heartbeat import PeerWatch
from model import (LAYOUTS, STUDENT_KIND, ModelFileError, ViTConfig, count_params, create_model, param_groups,
                   saved_model_args)

# --dataset synthetic: what changes when the user did not set it (about 2,000 training images, so
# the whole pipeline runs in a couple of minutes on a laptop CPU). Data and teacher are fake.
SYNTHETIC_DEFAULTS = dict(epochs=1, batch_size=64, warmup_epochs=0.25, train_per_class=20,
                          val_per_class=5, test_per_class=5, head_epochs=50)


class TrainError(RuntimeError):
    """A bad flag combination or an unusable file or folder; printed as one line."""


class FaultError(TrainError):
    """A fault met by one rank (out of memory, a lost peer): that rank prints it, not only rank 0."""


def get_args(argv=None):
    return fill_defaults(parser().parse_args(argv))


def parser():
    p = Parser(prog="train.py", description=__doc__.split("\n")[0] + "\nDefaults are the seed's Table 1 / Table 4 "
               "best row (README \"Recipe\"); a flag shown without a default depends on --dataset (synthetic: small).")
    g = p.add_argument_group("model")
    a = g.add_argument
    a("--model", default="cdeit", choices=["vit", "deit", "cdeit"],
      help="vit: class token only; deit: + distillation token; cdeit: + corruption token (seed 2-3)")
    a("--distill", default="hard", choices=["none", "hard", "soft"],
      help="distillation loss (seed Eq. 4-7); vit needs none, deit / cdeit hard or soft")
    a("--strategy", type=int, default=2, choices=[1, 2, 3], help="CdeiT inference strategy (seed 3.3; cdeit only)")
    a("--layout", default="thesis", choices=list(LAYOUTS),
      help="the students' layout and init: thesis (the seed's code: no final norm, PyTorch's default init, "
           "randn tokens, one drop-path rate, MLP vit head) or timm (final norm, trunc-normal 0.02, DeiT's "
           "drop-path ramp, linear vit head; loads into timm's DeiT)")
    a("--depth", type=positive_int, default=None, help="transformer blocks (default 12, DeiT-Tiny; fewer: quick runs)")
    a("--embed-dim", type=positive_int, default=None, help="token width (default 192); divisible by --num-heads")
    a("--num-heads", type=positive_int, default=None, help="attention heads (default 3)")
    a("--drop-path", type=rate, default=0.1, help="stochastic depth rate (seed Table 1)")
    a("--drop", type=rate, default=0.0, help="dropout rate (seed Table 4 ablation: 0.1)")

    g = p.add_argument_group("data")
    a = g.add_argument
    a("--split", default="paper", choices=["paper", "grouped", "standard"],
      help="paper: the seed's mix (3.4); grouped: leak-free; standard: CIFAR-10 train with fresh "
           "on-device corruptions each epoch, tested on CIFAR-10-C (RobustBench protocol)")
    a("--dataset", default="cifar", choices=["cifar", "synthetic"],
      help="cifar: the real files (fetched when missing); synthetic: small fake files, offline smoke run")
    a("--data-dir", default="./data", help="where the CIFAR-10 / CIFAR-10-C files and the teacher are (or go)")
    a("--mirror", type=url, default=None, help="base URL for downloads, <URL>/<filename> (env CDEIT_MIRROR)")
    a("--train-per-class", type=positive_int, default=None, help="images per class per type: 4500 (synthetic: 20)")
    a("--val-per-class", type=positive_int, default=None, help="200; 500 for --split standard (synthetic: 5)")
    a("--test-per-class", type=positive_int, default=None, help="200 (synthetic: 5)")

    g = p.add_argument_group("recipe (seed Table 1 / Table 4 best row; crop and flip are ours, off)")
    a = g.add_argument
    a("--epochs", type=positive_int, default=None, help="15 (synthetic: 1)")
    a("--batch-size", type=positive_int, default=None, help="global batch, split across ranks: 1024 (synthetic: 64)")
    a("--lr", type=positive, default=5e-4, help="base learning rate, scaled by global batch / 512 (DeiT)")
    a("--min-lr", type=non_negative, default=1e-5, help="cosine floor (DeiT)")
    a("--lr-per", default="epoch", choices=["epoch", "step"],
      help="the warmup + cosine schedule stepped once per epoch (the seed's trainers call scheduler.step() "
           "after each epoch; warmup in whole epochs) or every step (DeiT / timm)")
    a("--weight-decay", type=non_negative, default=0.05, help="AdamW / SGD weight decay")
    a("--opt", default="adamw", choices=["adamw", "sgd"], help="sgd: momentum 0.9 (seed Table 4 ablation)")
    a("--warmup-epochs", type=non_negative, default=None, help="linear warmup, then cosine: 3 (synthetic: 0.25)")
    a("--smoothing", type=rate, default=0.1, help="label smoothing of the label and type targets")
    a("--clip-grad", type=positive, default=None, help="max gradient norm (default: off)")
    a("--mixup", type=positive, default=1.0, help="Mixup alpha (torchvision MixUp's default, the seed's code)")
    a("--mixup-prob", type=probability, default=0.3, help="Mixup probability per batch (seed Table 1)")
    a("--cutmix", type=positive, default=1.0, help="CutMix alpha (torchvision CutMix's default)")
    a("--cutmix-prob", type=probability, default=0.0, help="per batch, drawn after and independently of Mixup")
    a("--mix-types", action=argparse.BooleanOptionalAction, default=False,
      help="mix CdeiT's corruption-type targets like the labels (the seed's code mixes labels only)")
    a("--randaug", type=bounded(int, 0, 30), default=0,
      help="torchvision RandAugment magnitude M of 31 bins, 2 ops (seed Table 4 ablation: 9); 0 = off")
    a("--randaug-prob", type=probability, default=1.0, help="per-sample probability of RandAugment")
    a("--erase-prob", type=probability, default=0.25, help="Random Erasing probability (seed Table 1)")
    a("--erase-mode", default="zero", choices=["zero", "pixel"],
      help="zero: torchvision RandomErasing's fill 0 on the image before normalising (the seed's code); "
           "pixel: timm's per-pixel N(0, 1) noise after normalising")
    a("--draw-per", default="batch", choices=["batch", "image"],
      help="RandAugment's ops and Random Erasing's box drawn once per batch (the seed's code calls "
           "torchvision's transforms on the whole batch) or per image")
    a("--crop-padding", type=bounded(int, 0, 31), default=0, help="random crop, zero padding, e.g. 4 (ours); 0 = none")
    a("--hflip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flip (ours)")

    g = p.add_argument_group("distillation (seed 2.2, 4.1)")
    a = g.add_argument
    a("--tau", type=positive, default=3.0, help="soft distillation temperature (seed Eq. 4)")
    a("--alpha", type=probability, default=0.5, help="weight of the teacher term, lambda (seed Eq. 4-7)")
    a("--teacher", default=None, help="teacher safetensors (default: the downloaded DeiT-III Small)")
    a("--teacher-view", default="cached", choices=["cached", "augmented"],
      help="cached: logits of the un-augmented 224px image, computed once (seed 3.4); "
           "augmented: teacher runs live on the student's augmented batch (Beyer et al. 2022)")
    a("--teacher-resize", default="bilinear", choices=["bilinear", "bicubic"],
      help="the 224px teacher view: bilinear as the seed's code; bicubic as timm's DeiT-III config")
    a("--head-epochs", type=positive_int, default=None, help="epochs of the teacher-head fit: 10 (synthetic: 50)")

    g = p.add_argument_group("run")
    a = g.add_argument
    a("--seed", type=seed_int, default=0, help="seeds the mix's draw, the weights, the teacher head, every random stream")
    a("--out-dir", default=None, help="default: out/<model>-<distill>-<split>-s<seed>[-synthetic]")
    a("--resume", action="store_true", help="continue <out-dir>/ckpt.pt; every recipe flag must be as it was")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--amp", default=None, choices=["bf16", "fp16", "off"], help="autocast (default: bf16 on CUDA, off on CPU)")
    a("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
      help="torch.compile the student and the loss: default (bare --compile), or reduce-overhead "
           "(CUDA graphs: each step replays the recorded forward, loss and backward launches)")
    a("--fused", action=argparse.BooleanOptionalAction, default=True, help="Triton kernels on CUDA")
    a("--log-interval", type=positive_int, default=20, help="steps per log line")
    return p


def fill_defaults(args):
    """The flags left None: the seed's values, or SYNTHETIC_DEFAULTS; the out dir from the run's name."""
    defaults = SYNTHETIC_DEFAULTS if args.dataset == "synthetic" else dict(
        epochs=15, batch_size=1024, warmup_epochs=3, train_per_class=4500,
        val_per_class=500 if args.split == "standard" else 200,  # standard: 45,000 / 5,000 of CIFAR-10 train
        test_per_class=200, head_epochs=10)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out_dir is None:
        tag = "-synthetic" if args.dataset == "synthetic" else ""
        args.out_dir = os.path.join("out", f"{args.model}-{args.distill}-{args.split}-s{args.seed}{tag}")
    return args


# flags that change how a run executes, not what it trains: they may differ on --resume
RUN_ONLY = {"resume", "out_dir", "device", "data_dir", "mirror", "log_interval", "environment", "compile", "fused",
            "amp", "teacher"}


def check_args(args, world_size=1):
    """Every flag combination, the device and the paths, before any file is read or written (each
    flag's own range is its argparse type in get_args). Raises cli.FlagError; returns notes on
    flags that do not apply to this model (reproduce.py passes flags after -- to every run)."""
    notes = check_flags(args, world_size)
    check_device("--device", args.device)
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.amp == "fp16" and not on_cuda:
        fail("--amp", "fp16", "needs CUDA; use --amp bf16 or off on the CPU")
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        fail("--data-dir", args.data_dir, "is a file, not a folder")
    check_existing_file("--teacher", args.teacher)
    check_out_dir(args)
    return notes


def check_flags(args, world_size=1):
    """The flag combinations alone (no device, no file): also what reproduce.py checks for each run."""
    if args.model == "vit" and args.distill != "none":
        fail("--distill", args.distill, "--model vit has no distillation token: use --distill none")
    if args.model != "vit" and args.distill == "none":
        fail("--distill", "none", f"--model {args.model} learns its distillation token from the teacher: "
             "use --distill hard or soft (or --model vit)")
    if args.batch_size % world_size:
        fail("--batch-size", args.batch_size, f"not divisible by the {world_size} processes (global batch, split "
             f"evenly: use a multiple of {world_size})")
    n_train = args.train_per_class * 10 * (1 if args.split == "standard" else len(data.TYPES))
    if args.batch_size > n_train:
        fail("--batch-size", args.batch_size, f"larger than the {n_train:,} training images (--train-per-class "
             f"{args.train_per_class}); no step would run")
    if args.warmup_epochs > args.epochs:
        fail("--warmup-epochs", args.warmup_epochs, f"longer than --epochs {args.epochs}")
    dim, heads = args.embed_dim or ViTConfig.embed_dim, args.num_heads or ViTConfig.num_heads
    if dim % heads:
        fail("--embed-dim", dim, f"not divisible by --num-heads {heads} (each head takes embed-dim / num-heads)")
    default = get_args([])  # the parser's defaults, to tell a flag the user set from one left alone
    only = {"strategy": "cdeit", "mix_types": "cdeit", "tau": "deit/cdeit", "alpha": "deit/cdeit",
            "teacher_view": "deit/cdeit", "teacher_resize": "deit/cdeit", "teacher": "deit/cdeit"}
    return [f"--{k.replace('_', '-')} {getattr(args, k)} applies to --model {m} only; ignored for --model {args.model}"
            for k, m in only.items() if getattr(args, k) != getattr(default, k) and args.model not in m.split("/")]


def check_out_dir(args):
    """--out-dir can be written, holds a checkpoint exactly when --resume says so, and a resumed
    run keeps every flag that shapes the training (a longer --epochs would stretch a cosine
    schedule half gone). Reads ckpt.pt's config; creates nothing."""
    check_writable_dir("--out-dir", args.out_dir)
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    if os.path.exists(ckpt) and not args.resume:
        fail("--out-dir", args.out_dir, "holds a run (ckpt.pt): pass --resume to continue it, or choose another "
             "--out-dir")
    if not args.resume:
        return
    if not os.path.exists(ckpt):
        fail("--resume", ckpt, "no checkpoint there")
    try:
        was = torch.load(ckpt, map_location="cpu", weights_only=True).get("config") or {}
    except Exception as e:  # noqa: BLE001  (any damage: one line)
        fail("--resume", ckpt, f"unreadable checkpoint ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})")
    now = vars(args)
    diff = [k for k in sorted(set(was) & set(now)) if k not in RUN_ONLY and was[k] != now[k]]
    if diff:
        what = ", ".join(f"--{k.replace('_', '-')} {was[k]} -> {now[k]}" for k in diff)
        fail("--resume", ckpt, f"was trained with other flags ({what}); resume with the run's own flags, or start "
             "a new --out-dir")


# ----------------------------------------------------------------------------- distributed set-up

def setup(args):
    """DDP from torchrun's env (RANK, LOCAL_RANK, WORLD_SIZE), nanoGPT style."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                               int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available (use --device cpu)")
        device = torch.device("cuda", local_rank if ddp else torch.device(dev).index or 0)
        torch.cuda.set_device(device)
        # TF32 matmuls unless --amp off, which runs fp32 throughout as the seed's code does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.amp != "off"
    else:
        device = torch.device("cpu")
    watch = None
    if ddp:
        # long timeout: the other ranks wait while rank 0 runs the teacher over the whole mix once
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
        try:  # a dead rank stops the others in seconds, not after that timeout
            watch = PeerWatch(rank, world, note=lambda: kept_note(args.out_dir))
        except Exception as e:  # noqa: BLE001  (a launcher without MASTER_ADDR / MASTER_PORT)
            print(f"warning: rank {rank}: no heartbeat watch ({type(e).__name__}: {e}); a dead rank may "
                  "leave the others waiting until the process-group timeout", file=sys.stderr)
    return dict(ddp=ddp, rank=rank, world=world, device=device, master=rank == 0, watch=watch)


def on_master_first(ctx, fn):
    """Run fn on rank 0 while the others wait; a failure there stops every rank (no hang)."""
    err = None
    if ctx["master"]:
        try:
            fn()
        except (TrainError, DataError, ModelFileError, OSError) as e:
            err = e
    if ctx["ddp"]:
        msg = [str(err) if err else None]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] and not ctx["master"]:
            raise SystemExit(1)  # rank 0 prints the reason
    if err:
        raise err


def log(ctx, *msg):
    if ctx["master"]:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------- files

def environment():
    """What a run ran on, for config.json and the checkpoint: git commit and whether tracked files
    differed from it, torch / triton / CUDA versions, GPU name and count (None where unknown)."""
    import importlib.metadata
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*cmd):
        try:
            r = subprocess.run(["git", "-C", here, *cmd], capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status),
            "torch": str(torch.__version__), "triton": triton, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpu_count": gpus,
            "python": sys.version.split()[0]}


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
    stale = fileio.temp_files(args.out_dir)  # a kill mid-save leaves its temp file; the real files are whole
    for f in stale:
        os.remove(f)
    if stale:
        print(f"removed {len(stale)} partial file(s) a killed run left in {args.out_dir}", flush=True)


# ----------------------------------------------------------------------------- (1) data

def prepare_data(args, ctx):
    """Files on disk -> the mix. Returns (splits, data_args, teacher_path, teacher_args)."""
    needs_teacher = args.model != "vit"
    if args.dataset == "synthetic":
        root = os.path.join(args.data_dir, "synthetic")
        tpath = args.teacher or os.path.join(root, "teacher_synthetic.safetensors")
        teacher_args = {} if args.teacher else dict(teacher.SYNTHETIC_TEACHER)

        def make():
            if not os.path.exists(os.path.join(root, "CIFAR-10-C", "labels.npy")):
                data.write_synthetic(root)
            if needs_teacher and not args.teacher and not os.path.exists(tpath):
                teacher.write_synthetic_teacher(tpath, args.seed)
        on_master_first(ctx, make)
        log(ctx, f"NOTE: --dataset synthetic: the images are SYNTHETIC (written by data.write_synthetic "
                 f"into {root}) and the teacher weights are RANDOM (a 1-block deit3_small); accuracies "
                 f"say nothing about CIFAR-10. Small defaults unless set: {SYNTHETIC_DEFAULTS}")
    else:
        root = args.data_dir
        tpath = args.teacher or teacher_path(root)
        teacher_args = {}
        # every rank calls download: rank 0 fetches while the others wait, and a failure raises everywhere
        download(root, args.mirror, teacher=needs_teacher and not args.teacher)
    if needs_teacher and not os.path.isfile(tpath):
        raise TrainError(f"teacher file {tpath} not found (python data.py --data-dir {args.data_dir} "
                         "downloads it, or pass --teacher PATH)")
    data_args = dict(root=os.path.abspath(root), split=args.split, seed=args.seed, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class, test_per_class=args.test_per_class)
    splits = {}
    on_master_first(ctx, lambda: splits.update(data.build_mix(**data_args)))  # rank 0 builds the cache
    if not splits:
        splits = data.build_mix(**data_args)  # the other ranks read it
    log(ctx, "data: " + ", ".join(f"{k} {len(v['labels']):,}" for k, v in splits.items())
        + f" images ({args.split} split, {root})")
    return splits, data_args, (tpath if needs_teacher else None), teacher_args


# ----------------------------------------------------------------------------- (2) the teacher

def prepare_teacher(args, ctx, splits, data_args, path, teacher_args, amp_dtype):
    """teacher.py's cache, built once on rank 0 while the others wait, and shared by runs.
    Returns (info for the checkpoint, train logits on the device or None, live teacher or None)."""
    device = ctx["device"]
    sha = fileio.sha256_file(path)
    # the cache's identity: teacher, mix content, resize, head settings, seed (every rank, the same)
    ident = teacher.identity(sha, teacher_args, splits, data_args, args.teacher_resize, args.head_epochs,
                             args.seed, amp_dtype)
    cache = teacher.cache_dir(data_args["root"], ident)
    on_master_first(ctx, lambda: teacher.build(path, teacher_args, splits, data_args, ident, device, amp_dtype,
                                               log=lambda *m: log(ctx, *m)))
    info = {"path": os.path.abspath(path), "sha256": sha, "head": os.path.abspath(os.path.join(cache, "teacher_head.pt"))}
    logits, live = None, None
    if args.split == "standard":  # the teacher's input changes every epoch: no table to read
        log(ctx, "teacher: LIVE on every batch (split standard: fresh corruptions each epoch cannot be "
                 "cached; a table per (sample, type, severity) would need 45,000 x 51 teacher passes, "
                 "more than 15 epochs of live ones)")
    elif args.teacher_view == "cached":
        logits = teacher.load_logits(cache, ident, splits["train"], device)  # checked against the mix
    if args.split == "standard" or args.teacher_view == "augmented":
        live = teacher.live(path, teacher_args, cache, ident, device)
    return info, logits, live


# ----------------------------------------------------------------------------- (3) the student

def lr_at(step, total, warmup, peak, floor):
    """Linear warmup then cosine decay to floor (seed Table 1: cosine, 3 warmup epochs), in steps or epochs."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def lr_schedule(args, spe, peak):
    """step -> lr. --lr-per epoch: the curve in epochs, constant within each (the seed's trainers call
    scheduler.step() once per epoch; warmup rounded down to whole epochs); --lr-per step: per step."""
    floor = min(args.min_lr, peak)
    if args.lr_per == "epoch":
        return lambda step: lr_at(step // spe, args.epochs, int(args.warmup_epochs), peak, floor)
    return lambda step: lr_at(step, args.epochs * spe, int(args.warmup_epochs * spe), peak, floor)


def stream_seed(seed, epoch, rank, stream):
    """Each random stream's seed for (seed, epoch, rank): an epoch replays exactly on resume, and no
    two streams (ranks, epochs, or drop-path / augmentation / corruption) share a seed (hashed)."""
    h = hashlib.sha256(f"{seed}/{epoch}/{rank}/{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


# ----------------------------------------------------------------------------- the per-epoch record
# One row per epoch in summary.csv and the checkpoint's history; row 0 is the untrained model, so the
# seed's 4.4 token similarities can be read at the start and the end of training. Absent parts
# (no distillation token, no corruption token, strategy 1) are left empty.
SUMMARY_FIELDS = ["epoch", "step", "lr",
                  "train_loss",      # the optimised loss (seed Eq. 4-7)
                  "train_cls",       # CE(class token head, y): the class token alone
                  "train_cls_corr",  # CE(cls + corr_proj(corr), y): CdeiT strategies 2/3's label term
                  "train_dist",      # the distillation token's term (hard CE or tau^2 KL)
                  "train_type",      # CE(corruption token head, type)
                  "val_accuracy",    # the eval-mode (combined) output; selects best.pt
                  "val_cls", "val_dist", "val_cls_corr",  # each head alone
                  "val_type",        # corruption-token type accuracy over the 11 types (seed 4.3)
                  "val_cos_cls_dist", "val_cos_cls_corr",  # final-layer token cosines (seed 4.4)
                  "epoch_time_s"]


def loss_columns(args):
    """summary column -> the part of losses.distillation_loss (or train_step) that fills it."""
    proj = args.model == "cdeit" and args.strategy != 1  # the label term is CE(cls + corr_proj(corr))
    cols = {"cls": "cls" if proj else "label"}
    if proj:
        cols["cls_corr"] = "label"
    if args.distill != "none":
        cols["dist"] = "teacher"
    if args.model == "cdeit":
        cols["type"] = "type"
    return cols


def evaluate(model, split, device):
    """The val columns of SUMMARY_FIELDS, computed as eval.py computes them (its run_student and
    summarize: one forward_tokens pass per batch gives every head and the token cosines; bf16
    autocast on CUDA, fp32 on CPU, whatever --amp)."""
    outs, _ = run_student(model, split["images"], device, 512 if device.type == "cuda" else 256)
    r = summarize(outs, split)
    model.train()
    h, cos = r["head_accuracy"], r["token_similarity"]
    return {"val_accuracy": h["combined"], "val_cls": h.get("cls"), "val_dist": h.get("dist"),
            "val_cls_corr": h.get("cls_corr"), "val_type": r["corruption_accuracy"],
            "val_cos_cls_dist": cos["cls_dist"], "val_cos_cls_corr": cos["cls_corr"]}


def validate(raw_model, split, ctx):
    """evaluate() on rank 0; every rank gets val_accuracy (they must agree on "improved")."""
    device = ctx["device"]
    m = evaluate(raw_model, split, device) if ctx["master"] else {}
    val = torch.tensor([m.get("val_accuracy", 0.0)], device=device, dtype=torch.float64)
    if ctx["ddp"]:
        dist.broadcast(val, 0)
    return {**m, "val_accuracy": val.item()}


def _fmt(v, pct=False):
    return "-" if v is None else f"{100 * v:.2f}%" if pct else f"{v:.3f}"


def epoch_line(row):
    """The log line of one history row: val accuracy of the output and of each head, type
    accuracy and the token cosines (seed 4.4)."""
    heads = " ".join(f"{k} {_fmt(row.get('val_' + c), True)}" for k, c in
                     (("cls", "cls"), ("dist", "dist"), ("cls+corr", "cls_corr"), ("type", "type"))
                     if row.get("val_" + c) is not None)
    cos = " ".join(f"cos(cls,{k}) {_fmt(row['val_cos_cls_' + k])}" for k in ("dist", "corr")
                   if row.get("val_cos_cls_" + k) is not None)
    return f"val accuracy {_fmt(row['val_accuracy'], True)}" + (f" | heads {heads}" if heads else "") \
        + (f" | {cos}" if cos else "")


def write_summary(history, path):
    w = io.StringIO()
    wr = csv.DictWriter(w, fieldnames=SUMMARY_FIELDS, restval="", extrasaction="ignore")
    wr.writeheader(), wr.writerows(history)
    fileio.atomic_write(path, w.getvalue(), "summary")


COMPILE_MODES = ("off", "default", "reduce-overhead")


def compile_step(model, loss_fn, mode):
    """The student and the loss under torch.compile's `mode` (COMPILE_MODES); unchanged for "off"."""
    if mode == "off":
        return model, loss_fn
    kw = {} if mode == "default" else {"mode": mode}
    return torch.compile(model, **kw), torch.compile(loss_fn, fullgraph=True, **kw)


def train_step(model, optimizer, scaler, loss_fn, x, y, t, teacher_logits, args, amp_dtype):
    """One optimisation step on an augmented batch; returns (loss, parts) undetached from the device."""
    if args.compile == "reduce-overhead":  # a new step: last step's graph outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(x)
    loss, parts = loss_fn(out, y, teacher_logits, t if args.model == "cdeit" else None, distill=args.distill,
                          tau=args.tau, alpha=args.alpha, smoothing=args.smoothing)
    if out.corr_cls is not None:  # logged only: the class token alone, from the logits at hand
        parts = {**parts, "cls": F.cross_entropy(out.cls.detach().float(), y, label_smoothing=args.smoothing)}
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


def rng_state(device, gen, cgen=None):
    s = {"cpu": torch.get_rng_state(), "augment": gen.get_state()}
    if cgen is not None:
        s["corrupt"] = cgen.get_state()
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(device, gen, s, cgen=None):
    torch.set_rng_state(s["cpu"])
    gen.set_state(s["augment"])
    if cgen is not None:
        cgen.set_state(s["corrupt"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


STOP = {"why": None}  # set by SIGTERM / Ctrl-C; the loop saves and leaves at the next check


def _request_stop(signum, frame):
    STOP["why"] = signal.Signals(signum).name
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


@contextlib.contextmanager
def stop_requests():
    """SIGTERM / Ctrl-C ask the loop to stop at its next check (it saves first) instead of killing it."""
    handlers = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    STOP["why"] = None
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def build_student(args, device):
    model_args = dict(num_classes=10, num_types=len(data.TYPES), drop_path=args.drop_path, drop=args.drop,
                      fused_attn=args.fused, layout=args.layout,
                      **({"strategy": args.strategy} if args.model == "cdeit" else {}))
    model_args.update({k: getattr(args, k) for k in ("depth", "embed_dim", "num_heads") if getattr(args, k)})
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = create_model(args.model, **model_args)
    if args.model == "vit":  # the head the layout gave it, recorded: the file rebuilds without the rule
        model_args["head"] = model.cfg.head
    return model.to(device), model_args


def build_optimizer(args, raw_model, device):
    """AdamW (or SGD) at DeiT's linearly scaled peak lr (seed Table 1). Returns (optimizer, peak lr)."""
    peak = args.lr * args.batch_size / 512
    groups = param_groups(raw_model, args.weight_decay)
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(groups, lr=peak, fused=fused) if args.opt == "adamw" else \
        torch.optim.SGD(groups, lr=peak, momentum=0.9, fused=fused)
    return optimizer, peak


def build_augment(args):
    return Augment(num_classes=10, num_types=len(data.TYPES), crop_padding=args.crop_padding,
                   flip=args.hflip, mixup_alpha=args.mixup, mixup_prob=args.mixup_prob,
                   cutmix_alpha=args.cutmix, cutmix_prob=args.cutmix_prob, mix_types=args.mix_types,
                   randaug_ops=2 if args.randaug else 0, randaug_magnitude=args.randaug,
                   randaug_prob=args.randaug_prob, erase_prob=args.erase_prob,
                   erase_mode=args.erase_mode, draw_per=args.draw_per)


def pick_loss(args, device):
    """losses.distillation_loss, or its Triton kernel on CUDA with --fused."""
    loss_fn = losses.distillation_loss
    if args.fused and device.type == "cuda":
        import kernels
        loss_fn = getattr(kernels, "distillation_loss", loss_fn)
    return loss_fn


def teacher_targets(args, batch, images, x, cached, live, amp_dtype):
    """The teacher's logits for a batch: live on what the student sees (--teacher-view augmented),
    live on the corrupted, un-augmented batch (--split standard: as the cached splits' teacher saw
    its images), or read from the cache (seed 4.1); None without distillation."""
    if live is not None:
        tx = F.interpolate(x, size=224, mode=args.teacher_resize) if args.teacher_view == "augmented" \
            else teacher_view(images, 224, args.teacher_resize)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return live(tx).float()
    return cached[batch["index"]] if cached is not None else None


class Run:
    """A run's state, and what a checkpoint saves of it: model, optimizer, every rank's RNG, epoch,
    step, best val accuracy, the history and this epoch's loss sums (an exact mid-epoch resume)."""

    def __init__(self, args, ctx, raw_model, model_args, optimizer, scaler, data_args, teacher_info, gen, cgen,
                 cols):
        self.args, self.ctx, self.cols = args, ctx, cols
        self.raw_model, self.model_args, self.optimizer, self.scaler = raw_model, model_args, optimizer, scaler
        self.data_args, self.teacher_info, self.gen, self.cgen = data_args, teacher_info, gen, cgen
        self.ckpt_path, self.best_path, self.summary_path = (os.path.join(args.out_dir, n) for n in
                                                             ("ckpt.pt", "best.pt", "summary.csv"))
        self.epoch, self.step, self.best_val, self.history, self.resume_rng = 0, 0, -1.0, [], None
        self.sums = self.zero_sums()

    def zero_sums(self):
        return torch.zeros(1 + len(self.cols), dtype=torch.float64)  # per-epoch sums of the loss and its parts

    def resume(self, spe):
        """--resume: model, optimizer, counters and history from ckpt.pt; after a mid-epoch stop also
        this epoch's loss sums so far and this rank's RNG states (replayed by seed_epoch)."""
        args, ctx, path = self.args, self.ctx, self.ckpt_path
        ck = torch.load(path, map_location="cpu", weights_only=True)
        same = lambda d: {k: v for k, v in d.items() if k != "fused_attn"}  # noqa: E731  (a kernel choice, not weights)
        saved = saved_model_args(ck.get("model_args", {}))  # an older file: the timm layout, as it was built
        if ck.get("kind") != STUDENT_KIND or (ck["model_name"], same(saved), ck["data_args"]) \
                != (args.model, same(self.model_args), self.data_args):
            was, now = dict(model=ck.get("model_name"), **saved, **ck.get("data_args", {})), \
                dict(model=args.model, **self.model_args, **self.data_args)
            diff = ", ".join(f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now))
                             if k != "fused_attn" and was.get(k) != now.get(k))
            raise TrainError(f"{path} was trained with another model or data configuration ({diff})")
        self.raw_model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if "scaler" in ck:  # --amp fp16: the loss scale and its growth tracker continue too
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step, self.best_val, self.history = (ck["epoch"], ck["step"], ck["best_val_accuracy"],
                                                              ck["history"])
        if self.step > self.epoch * spe:  # stopped mid-epoch
            self.sums = torch.tensor(ck["epoch_sums"], dtype=torch.float64)
            if ck["rng"]["world_size"] == ctx["world"]:
                self.resume_rng = ck["rng"]["ranks"][ctx["rank"]]
            else:
                log(ctx, "warning: mid-epoch resume on another process count is not bit-exact")
        log(ctx, f"resumed {path}: epoch {self.epoch}, step {self.step}, best val {self.best_val:.2%}")

    def seed_epoch(self):
        """Seed this epoch's generators from (seed, epoch, rank); after a mid-epoch stop, continue the
        saved states instead."""
        seed = lambda stream: stream_seed(self.args.seed, self.epoch, self.ctx["rank"], stream)  # noqa: E731
        torch.manual_seed(seed("drop-path"))
        self.gen.manual_seed(seed("augment"))
        if self.cgen is not None:
            self.cgen.manual_seed(seed("corrupt"))
        if self.resume_rng is not None:
            set_rng_state(self.ctx["device"], self.gen, self.resume_rng, self.cgen)
            self.resume_rng = None

    def save(self, path):
        """The file eval.py reads: only tensors and plain values (torch.load weights_only=True).
        Every rank calls it (the RNG states are gathered); rank 0 writes."""
        args, ctx, device = self.args, self.ctx, self.ctx["device"]
        states = [rng_state(device, self.gen, self.cgen)] * ctx["world"]
        if ctx["ddp"]:
            dist.all_gather_object(states, rng_state(device, self.gen, self.cgen))
        if ctx["master"]:
            fileio.atomic_write(path, {
                "kind": STUDENT_KIND, "version": 1, "model_name": args.model,
                "model_args": self.model_args, "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step,
                "rng": {"world_size": ctx["world"], "ranks": states}, "config": vars(args),
                "data_args": self.data_args, "dataset": args.dataset, "best_val_accuracy": self.best_val,
                "teacher": self.teacher_info, "history": self.history, "epoch_sums": self.sums.tolist()},
                "best checkpoint" if path == self.best_path else "checkpoint")

    def save_summary(self):
        if self.ctx["master"]:
            write_summary(self.history, self.summary_path)

    def record_untrained(self, val_split):
        """History row 0: the untrained model, the start of the seed's 4.4 token comparison."""
        self.history.append({"epoch": 0, "step": 0, **validate(self.raw_model, val_split, self.ctx)})
        log(self.ctx, f"epoch 0 (untrained): {epoch_line(self.history[0])}")
        self.save_summary()

    def end_epoch(self, val_split, lr, spe, t_epoch):
        """Validate, append the epoch's row, save. ckpt.pt last: a kill before it reruns this epoch
        exactly and rewrites best.pt and summary.csv."""
        self.epoch += 1
        metrics = validate(self.raw_model, val_split, self.ctx)  # collective: save() is too
        val = metrics["val_accuracy"]
        row = dict(epoch=self.epoch, step=self.step, lr=lr, **{f"train_{k}": v / spe for k, v in
                                                              zip(["loss", *self.cols], self.sums.tolist())},
                   **metrics, epoch_time_s=round(time.time() - t_epoch, 2))
        self.history.append(row)
        self.sums = self.zero_sums()
        improved, self.best_val = val > self.best_val, max(self.best_val, val)
        log(self.ctx, f"epoch {self.epoch}/{self.args.epochs}: train loss {row['train_loss']:.4f} | "
            f"{epoch_line(row)}" + (" (best)" if improved else "") + f" | {row['epoch_time_s']:.0f}s")
        if improved:  # best val accuracy; test data never selects anything
            self.save(self.best_path)
        self.save_summary()
        self.save(self.ckpt_path)


class Meter:
    """The loss and its parts per step, kept on the device and read once per interval: one host sync
    that averages over ranks, checks for a non-finite loss, adds to the epoch sums and logs a line."""

    def __init__(self, args, ctx, cols, total):
        self.args, self.ctx, self.cols, self.total = args, ctx, cols, total
        self.t_start, self.steps_done = time.time(), 0

    def start_epoch(self):
        # (log_interval, 1 + parts): the loss and its parts of each step since the last read
        self.buf = torch.zeros(self.args.log_interval, 1 + len(self.cols), device=self.ctx["device"])
        self.n, self.t_int = 0, time.time()

    def add(self, loss, parts):
        self.buf[self.n] = torch.stack([loss.detach().float()] + [parts[p].float() for p in self.cols.values()])
        self.n, self.steps_done = self.n + 1, self.steps_done + 1

    def due(self, last_of_epoch):
        # one process checks for a stop every step; DDP ranks must agree, so only at intervals
        return self.n == self.args.log_interval or last_of_epoch or (STOP["why"] and not self.ctx["ddp"])

    def flush(self, run, lr):
        """Read back, check and log the interval; True when any rank asked to stop."""
        ctx = self.ctx
        flag = torch.tensor([float(STOP["why"] is not None)], device=ctx["device"])
        if ctx["ddp"]:
            dist.all_reduce(self.buf), dist.all_reduce(flag)
            self.buf /= ctx["world"]
        rows = self.buf[:self.n].double().cpu()
        bad = (~torch.isfinite(rows[:, 0])).nonzero()
        if len(bad):
            kept = f"the last good checkpoint is {run.ckpt_path} (epoch {run.epoch})" if run.epoch > 0 \
                else "no checkpoint was written"
            raise TrainError(f"non-finite loss at step {run.step - self.n + int(bad[0]) + 1}; stopped, {kept}")
        run.sums += rows.sum(0)
        m, rate = rows.mean(0), self.n * self.args.batch_size / (time.time() - self.t_int)
        eta = (self.total - run.step) * (time.time() - self.t_start) / self.steps_done
        log(ctx, f"step {run.step}/{self.total} | epoch {run.epoch + 1} | loss {m[0]:.4f} ("
            + " ".join(f"{k.replace('_', '+')} {m[j + 1]:.3f}" for j, k in enumerate(self.cols))
            + f") | lr {lr:.2e} | {rate:.0f} img/s | eta {eta / 60:.1f}m")
        self.buf.zero_()
        self.n, self.t_int = 0, time.time()
        return flag.item() > 0


def train_student(args, ctx, splits, data_args, teacher_info, teacher_logits, live_teacher, amp_dtype,
                  stop_at_step=None):
    device, world, rank = ctx["device"], ctx["world"], ctx["rank"]
    raw_model, model_args = build_student(args, device)
    optimizer, peak = build_optimizer(args, raw_model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loader = data.DeviceLoader(splits["train"], args.batch_size, device, shuffle=True, drop_last=True,
                               seed=args.seed, rank=rank, world_size=world)
    augment = build_augment(args)
    gen = torch.Generator(device=device)
    # --split standard: the per-rank generator of the fresh corruptions (saved with the others)
    cgen = torch.Generator(device=device) if args.split == "standard" else None
    loss_fn = pick_loss(args, device)
    spe = len(loader)  # steps per epoch
    if spe == 0:
        raise TrainError(f"--batch-size {args.batch_size} exceeds the {loader.n} training images")
    total, lr_of = args.epochs * spe, lr_schedule(args, spe, peak)
    cols = loss_columns(args)  # the loss parts logged per step and per epoch
    run = Run(args, ctx, raw_model, model_args, optimizer, scaler, data_args, teacher_info, gen, cgen, cols)
    if args.resume:
        run.resume(spe)
    model, loss_fn = compile_step(raw_model, loss_fn, args.compile)
    if ctx["ddp"]:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if ctx["master"]:
        fileio.atomic_write(os.path.join(args.out_dir, "config.json"), json.dumps(vars(args), indent=2) + "\n",
                            "run config")
    cfg = raw_model.cfg
    amp = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling", None: "off (fp32)"}
    loss = "PyTorch (losses.py)" if loss_fn is losses.distillation_loss else "fused Triton kernel (kernels/)"
    log(ctx, f"student: {args.model} ({count_params(raw_model):,} params, {cfg.depth} blocks, D={cfg.embed_dim}), "
             f"{args.distill} distillation, {spe} steps/epoch x {args.epochs} epochs, global batch "
             f"{args.batch_size} on {world} x {device.type}, peak lr {peak:.2e}, mixed precision "
             f"{amp[amp_dtype]}, loss {loss}")
    if run.step == 0 and not run.history:
        run.record_untrained(splits["val"])

    stopped, meter = None, Meter(args, ctx, cols, total)
    with stop_requests():
        while run.epoch < args.epochs and not stopped:
            run.seed_epoch()
            loader.set_epoch(run.epoch)
            meter.start_epoch()
            t_epoch, lr = time.time(), lr_of(run.step)
            for i, batch in enumerate(loader):
                if i < run.step - run.epoch * spe:
                    continue  # mid-epoch resume: these batches were trained before the stop
                lr = lr_of(run.step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                images, types = batch["images"], batch["types"]
                if cgen is not None:  # standard: a fresh (type, severity) per row, before augmentation;
                    images, types, _ = data.draw_corruptions(images, cgen)  # the token learns the drawn type
                x, y, t = augment(images, batch["labels"], types, generator=gen)
                tl = teacher_targets(args, batch, images, x, teacher_logits, live_teacher, amp_dtype)
                loss, parts = train_step(model, optimizer, scaler, loss_fn, x, y, t, tl, args, amp_dtype)
                meter.add(loss, parts)
                run.step += 1
                if stop_at_step is not None and run.step >= stop_at_step:
                    STOP["why"] = STOP["why"] or f"stop_at_step={stop_at_step}"
                if meter.due(i == spe - 1) and meter.flush(run, lr):  # True: some rank asked to stop
                    stopped = STOP["why"] or "a stop on another rank"
                    break
            if stopped and run.step < (run.epoch + 1) * spe:  # mid-epoch: save where we are
                run.save(run.ckpt_path)
                log(ctx, f"stopped ({stopped}) at step {run.step}: saved {run.ckpt_path}; continue with --resume")
                break
            run.end_epoch(splits["val"], lr, spe, t_epoch)
            if stopped:  # the stop came on an epoch's last step: the epoch was finished and saved
                log(ctx, f"stopped ({stopped}) after epoch {run.epoch}: saved {run.ckpt_path}; "
                         "continue with --resume")
    if run.epoch >= args.epochs and meter.steps_done == 0:
        log(ctx, f"already trained {run.epoch} epochs; nothing to do")
    return dict(best_val_accuracy=run.best_val, step=run.step, stopped=stopped)


# ----------------------------------------------------------------------------- main

def run(args, stop_at_step=None):
    # recorded in config.json and the checkpoint's "config" (both write vars(args)); taken before the
    # process group starts its threads (git runs in a child process), on rank 0, the one that writes
    args.environment = environment() if int(os.environ.get("RANK", 0)) == 0 else None
    ctx = setup(args)
    try:
        device = ctx["device"]
        amp = args.amp or ("bf16" if device.type == "cuda" else "off")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        splits, data_args, tpath, targs = prepare_data(args, ctx)
        on_master_first(ctx, lambda: prepare_out_dir(args))  # only once the data are there
        info, logits, live = None, None, None
        if tpath is not None:
            info, logits, live = prepare_teacher(args, ctx, splits, data_args, tpath, targs, amp_dtype)
        t0 = time.time()
        res = train_student_or_fault(args, ctx, splits, data_args, info, logits, live, amp_dtype, stop_at_step)
        if not res["stopped"]:
            log(ctx, f"done in {(time.time() - t0) / 60:.1f} min: best val accuracy "
                     f"{res['best_val_accuracy']:.2%}; files in {args.out_dir} "
                     "(config.json, summary.csv, ckpt.pt, best.pt); next: python eval.py "
                     f"{os.path.join(args.out_dir, 'best.pt')}")
        error = None
        return res
    except BaseException as e:
        error = " ".join(str(e).split()).split(";")[0] or type(e).__name__  # its gist, for the other ranks
        error = error.split(": ")[0] if len(error) > 100 else error
        raise
    finally:
        if ctx["watch"]:
            ctx["watch"].close(error)
        if ctx["ddp"]:
            with contextlib.suppress(Exception):  # after a lost peer this may fail too; the error is told
                dist.destroy_process_group()


def kept_note(out_dir):
    ckpt = os.path.join(out_dir, "ckpt.pt")
    return f"the last checkpoint {ckpt} is kept" if os.path.exists(ckpt) else "no checkpoint was written yet"


def train_student_or_fault(args, ctx, *rest):
    """train_student, with the faults a long run meets turned into one line (FaultError): out of GPU
    memory, and under torchrun a collective that failed because another rank is gone."""
    try:
        return train_student(args, ctx, *rest)
    except torch.OutOfMemoryError:
        per = args.batch_size // ctx["world"]
        over = f"--batch-size {args.batch_size} over {ctx['world']} processes" if ctx["ddp"] else "--batch-size"
        raise FaultError(f"out of GPU memory on {ctx['device']} at {per} images per GPU ({over}): use a smaller "
                         f"--batch-size (e.g. {max(ctx['world'], args.batch_size // 2)}) in a new --out-dir "
                         f"(--resume needs the same flags); {kept_note(args.out_dir)}") from None
    except RuntimeError as e:
        why = ctx["watch"].verdict() if ctx["watch"] and not isinstance(e, TrainError) else None
        if why is None:
            raise
        raise FaultError(f"{why}; {kept_note(args.out_dir)}") from None


def main(argv=None, stop_at_step=None):
    args = get_args(argv)  # a bad value of one flag: one line from cli.Parser, exit 2
    rank = int(os.environ.get("RANK", 0))
    try:  # flag combinations, the device and the paths, before any file is read or written
        notes = check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    except FlagError as e:
        if rank == 0:  # under torchrun every rank checks; one copy of the line
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    for n in notes if rank == 0 else []:
        print(f"note: {n}", file=sys.stderr, flush=True)
    try:
        run(args, stop_at_step)
    except FaultError as e:  # met by this rank alone: it says so
        print(f"error: rank {rank}: {e}" if "RANK" in os.environ else f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except (TrainError, DataError, ModelFileError, OSError) as e:  # OSError: fileio.WriteError and kin
        if rank == 0:  # under torchrun, one copy of the message
            more = "; then continue with --resume" if isinstance(e, fileio.WriteError) and \
                os.path.exists(os.path.join(args.out_dir, "ckpt.pt")) else ""
            # the download instructions are several lines (one per file); every other error is one
            text = str(e).strip() if isinstance(e, DataError) else " ".join(str(e).split())
            print(f"error: {text}{more}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
