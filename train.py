"""Train a ViT / DeiT / CdeiT student on the thesis's 11-type corruption mix (thesis 3.4).

    python train.py --model cdeit --distill hard                  # one process (GPU if any)
    torchrun --nproc_per_node=8 train.py --model cdeit --distill hard
    python train.py --model cdeit --distill hard --dataset synthetic --device cpu  # offline smoke
    python train.py --model cdeit --distill hard --split standard  # fresh corruptions each epoch

Top to bottom: flags (defaults: thesis Table 1 / Table 4 best row), setup (torchrun's env), data
(download or synthesise, build the mix), the teacher (teacher.py: cached DeiT-III features, a
fitted 10-way head, thesis 4.1), the student, and the loop (device-resident batches, batched
augmentation, bf16 autocast, AdamW, warmup + cosine, DDP). checkpoint.py holds the run's state:
checkpoints, exact resume, random streams, interval logging, stop requests and faults.
Rank 0 prints and writes the out dir; across nodes (nodes.py) each node's local rank 0 prepares
its own data folder and teacher cache, checked against rank 0's.
"""
import argparse
import contextlib
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import data
import fileio
import kernels
import losses
import nodes  # torchrun across nodes whose disks are their own
import teacher  # the teacher stage (thesis 4.1): cached features, fitted head, logits
from augment import Augment, teacher_view
from checkpoint import STOP, TrainError
from cli import (
    FlagError,
    Parser,
    bounded,
    check_device,
    check_existing_file,
    fail,
    non_negative,
    positive,
    positive_int,
    probability,
    rate,
    seed_int,
    url,
)
from download import DataError, download, teacher_path
from heartbeat import PeerWatch
from model import LAYOUTS, ModelFileError, ViTConfig, count_params, create_model, param_groups
from scoring import run_student, summarize

# --dataset synthetic: what changes when the user did not set it (about 2,000 training images, so
# the whole pipeline runs in a couple of minutes on a laptop CPU). Data and teacher are fake.
SYNTHETIC_DEFAULTS = {"epochs": 1, "batch_size": 64, "warmup_epochs": 0.25, "train_per_class": 20,
                      "val_per_class": 5, "test_per_class": 5, "head_epochs": 50}
COMPILE_MODES = ("off", "default", "reduce-overhead")


# ----------------------------------------------------------------------------- flags

def get_args(argv=None):
    return fill_defaults(parser().parse_args(argv))


def parser():
    p = Parser(prog="train.py", description=__doc__.split("\n")[0] + "\nDefaults are thesis "
               "Table 1 / Table 4 best row (README \"Recipe\"); a flag shown without a default "
               "depends on --dataset (synthetic: small).")
    g = p.add_argument_group("model")
    a = g.add_argument
    a("--model", default="cdeit", choices=["vit", "deit", "cdeit"],
      help="vit: class token only; deit: + distillation token; cdeit: + corruption token "
           "(thesis 2-3)")
    a("--distill", default="hard", choices=["none", "hard", "soft"],
      help="distillation loss (thesis Eq. 4-7); vit needs none, deit / cdeit hard or soft")
    a("--strategy", type=int, default=2, choices=[1, 2, 3],
      help="CdeiT inference strategy (thesis 3.3; cdeit only)")
    a("--layout", default="thesis", choices=list(LAYOUTS),
      help="the students' layout and init: thesis (the thesis's code: no final norm, PyTorch's "
           "default init, randn tokens, one drop-path rate, MLP vit head) or timm (final norm, "
           "trunc-normal 0.02, DeiT's drop-path ramp, linear vit head; loads into timm's DeiT)")
    a("--depth", type=positive_int,
      help="transformer blocks (default 12, DeiT-Tiny; fewer: quick runs)")
    a("--embed-dim", type=positive_int, help="token width (default 192); divisible by --num-heads")
    a("--num-heads", type=positive_int, help="attention heads (default 3)")
    a("--drop-path", type=rate, default=0.1, help="stochastic depth rate (thesis Table 1)")
    a("--drop", type=rate, default=0.0, help="dropout rate (thesis Table 4 ablation: 0.1)")

    g = p.add_argument_group("data")
    a = g.add_argument
    a("--split", default="paper", choices=["paper", "grouped", "standard"],
      help="paper: the thesis's mix (3.4); grouped: leak-free; standard: CIFAR-10 train with "
           "fresh on-device corruptions each epoch, tested on CIFAR-10-C (RobustBench protocol)")
    a("--dataset", default="cifar", choices=["cifar", "synthetic"],
      help="cifar: the real files (fetched when missing); synthetic: small fake files, offline "
           "smoke run")
    a("--data-dir", default="./data",
      help="where the CIFAR-10 / CIFAR-10-C files and the teacher are (or go)")
    a("--mirror", type=url, help="base URL for downloads, <URL>/<filename> (env CDEIT_MIRROR)")
    a("--train-per-class", type=positive_int,
      help="images per class per type: 4500 (synthetic: 20)")
    a("--val-per-class", type=positive_int, help="200; 500 for --split standard (synthetic: 5)")
    a("--test-per-class", type=positive_int, help="200 (synthetic: 5)")

    g = p.add_argument_group("recipe (thesis Table 1 / Table 4 best row; crop and flip are ours, "
                             "off)")
    a = g.add_argument
    a("--epochs", type=positive_int, help="15 (synthetic: 1)")
    a("--batch-size", type=positive_int,
      help="global batch, split across ranks: 1024 (synthetic: 64)")
    a("--lr", type=positive, default=5e-4,
      help="base learning rate, scaled by global batch / 512 (DeiT)")
    a("--min-lr", type=non_negative, default=1e-5, help="cosine floor (DeiT)")
    a("--lr-per", default="epoch", choices=["epoch", "step"],
      help="the warmup + cosine schedule stepped once per epoch (the thesis's trainers call "
           "scheduler.step() after each epoch; warmup in whole epochs) or every step (DeiT / timm)")
    a("--weight-decay", type=non_negative, default=0.05, help="AdamW / SGD weight decay")
    a("--opt", default="adamw", choices=["adamw", "sgd"],
      help="sgd: momentum 0.9 (thesis Table 4 ablation)")
    a("--warmup-epochs", type=non_negative, help="linear warmup, then cosine: 3 (synthetic: 0.25)")
    a("--smoothing", type=rate, default=0.1, help="label smoothing of the label and type targets")
    a("--clip-grad", type=positive, help="max gradient norm (default: off)")
    a("--mixup", type=positive, default=1.0,
      help="Mixup alpha (torchvision MixUp's default, the thesis's code)")
    a("--mixup-prob", type=probability, default=0.3,
      help="Mixup probability per batch (thesis Table 1)")
    a("--cutmix", type=positive, default=1.0, help="CutMix alpha (torchvision CutMix's default)")
    a("--cutmix-prob", type=probability, default=0.0,
      help="per batch, drawn after and independently of Mixup")
    a("--mix-types", action=argparse.BooleanOptionalAction, default=False,
      help="mix CdeiT's corruption-type targets like the labels (the thesis's code mixes labels "
           "only)")
    a("--randaug", type=bounded(int, 0, 30), default=0,
      help="torchvision RandAugment magnitude M of 31 bins, 2 ops (thesis Table 4 ablation: 9); "
           "0 = off")
    a("--randaug-prob", type=probability, default=1.0, help="per-sample probability of RandAugment")
    a("--erase-prob", type=probability, default=0.25,
      help="Random Erasing probability (thesis Table 1)")
    a("--erase-mode", default="zero", choices=["zero", "pixel"],
      help="zero: torchvision RandomErasing's fill 0 on the image before normalising (the "
           "thesis's code); pixel: timm's per-pixel N(0, 1) noise after normalising")
    a("--draw-per", default="batch", choices=["batch", "image"],
      help="RandAugment's ops and Random Erasing's box drawn once per batch (the thesis's code "
           "calls torchvision's transforms on the whole batch) or per image")
    a("--crop-padding", type=bounded(int, 0, 31), default=0,
      help="random crop, zero padding, e.g. 4 (ours); 0 = none")
    a("--hflip", action=argparse.BooleanOptionalAction, default=False,
      help="random horizontal flip (ours)")

    g = p.add_argument_group("distillation (thesis 2.2, 4.1)")
    a = g.add_argument
    a("--tau", type=positive, default=3.0, help="soft distillation temperature (thesis Eq. 4)")
    a("--alpha", type=probability, default=0.5,
      help="weight of the teacher term, lambda (thesis Eq. 4-7)")
    a("--teacher", help="teacher safetensors (default: the downloaded DeiT-III Small)")
    a("--teacher-view", default="cached", choices=["cached", "augmented"],
      help="cached: logits of the un-augmented 224px image, computed once (thesis 3.4); "
           "augmented: teacher runs live on the student's augmented batch (Beyer et al. 2022)")
    a("--teacher-resize", default="bilinear", choices=["bilinear", "bicubic"],
      help="the 224px teacher view: bilinear as the thesis's code; bicubic as timm's DeiT-III "
           "config")
    a("--head-epochs", type=positive_int, help="epochs of the teacher-head fit: 10 (synthetic: 50)")

    g = p.add_argument_group("run")
    a = g.add_argument
    a("--seed", type=seed_int, default=0,
      help="seeds the mix's draw, the weights, the teacher head, every random stream")
    a("--out-dir", help="default: out/<model>-<distill>-<split>-s<seed>[-synthetic]")
    a("--resume", action="store_true",
      help="continue <out-dir>/ckpt.pt; every recipe flag must be as it was")
    a("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--amp", choices=["bf16", "fp16", "off"], help="autocast (default: bf16 on CUDA, off on CPU)")
    a("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
      help="torch.compile the student and the loss: default (bare --compile), or reduce-overhead "
           "(CUDA graphs: each step replays the recorded forward, loss and backward launches)")
    a("--fused", nargs="?", const="verify", default="verify", choices=("verify", "trust"),
      help="Triton kernels on CUDA, each checked against PyTorch at first use (verify, the "
           "default; bare --fused) or not (trust)")
    a("--no-fused", dest="fused", action="store_const", const=False, help="PyTorch only, no Triton")
    a("--log-interval", type=positive_int, default=20, help="steps per log line")
    return p


def fill_defaults(args):
    """The flags left None: the thesis's values, or SYNTHETIC_DEFAULTS; the out dir from the run's
    name."""
    defaults = SYNTHETIC_DEFAULTS
    if args.dataset != "synthetic":  # standard: 45,000 / 5,000 of CIFAR-10 train
        defaults = {"epochs": 15, "batch_size": 1024, "warmup_epochs": 3, "train_per_class": 4500,
                    "val_per_class": 500 if args.split == "standard" else 200,
                    "test_per_class": 200, "head_epochs": 10}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out_dir is None:
        tag = "-synthetic" if args.dataset == "synthetic" else ""
        name = f"{args.model}-{args.distill}-{args.split}-s{args.seed}{tag}"
        args.out_dir = os.path.join("out", name)
    return args


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
    checkpoint.check_out_dir(args)
    return notes


def check_flags(args, world_size=1):
    """The flag combinations alone (no device, no file): also what reproduce.py checks per run."""
    if args.model == "vit" and args.distill != "none":
        fail("--distill", args.distill,
             "--model vit has no distillation token: use --distill none")
    if args.model != "vit" and args.distill == "none":
        fail("--distill", "none", f"--model {args.model} learns its distillation token from the "
             "teacher: use --distill hard or soft (or --model vit)")
    if args.batch_size % world_size:
        fail("--batch-size", args.batch_size, f"not divisible by the {world_size} processes "
             f"(global batch, split evenly: use a multiple of {world_size})")
    n_train = args.train_per_class * 10 * (1 if args.split == "standard" else len(data.TYPES))
    if args.batch_size > n_train:
        fail("--batch-size", args.batch_size, f"larger than the {n_train:,} training images "
             f"(--train-per-class {args.train_per_class}); no step would run")
    if args.warmup_epochs > args.epochs:
        fail("--warmup-epochs", args.warmup_epochs, f"longer than --epochs {args.epochs}")
    dim, heads = args.embed_dim or ViTConfig.embed_dim, args.num_heads or ViTConfig.num_heads
    if dim % heads:
        fail("--embed-dim", dim, f"not divisible by --num-heads {heads} (each head takes "
             "embed-dim / num-heads)")
    default = get_args([])  # the parser's defaults, to tell a flag the user set from one left alone
    only = {"strategy": "cdeit", "mix_types": "cdeit", "tau": "deit/cdeit", "alpha": "deit/cdeit",
            "teacher_view": "deit/cdeit", "teacher_resize": "deit/cdeit", "teacher": "deit/cdeit"}
    return [f"--{k.replace('_', '-')} {getattr(args, k)} applies to --model {m} only; ignored "
            f"for --model {args.model}" for k, m in only.items()
            if getattr(args, k) != getattr(default, k) and args.model not in m.split("/")]


# ----------------------------------------------------------------------------- setup

def setup(args):
    """DDP from torchrun's env (RANK, LOCAL_RANK, WORLD_SIZE), nanoGPT style -> Context."""
    ddp = int(os.environ.get("RANK", "-1")) != -1
    w = nodes.where()  # rank 0 of 1 without torchrun
    rank, local_rank, world = w["rank"], w["local_rank"], int(os.environ.get("WORLD_SIZE", "1"))
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available (use --device cpu)")
        device = torch.device("cuda", local_rank if ddp else torch.device(dev).index or 0)
        torch.cuda.set_device(device)
        # TF32 matmuls unless --amp off, which runs fp32 throughout as the thesis's code does
        tf32 = args.amp != "off"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    else:
        device = torch.device("cpu")
    ctx = checkpoint.Context(ddp=ddp, rank=rank, local_rank=local_rank, world=world, device=device)
    if ddp:
        # long timeout: the other ranks wait while rank 0 runs the teacher over the whole mix once
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
        try:  # a dead rank stops the others in seconds, not after that timeout
            ctx.watch = PeerWatch(rank, world, note=lambda: checkpoint.kept_note(args.out_dir))
        except Exception as e:  # noqa: BLE001  (a launcher without MASTER_ADDR / MASTER_PORT)
            print(f"warning: {nodes.who()}: no heartbeat watch ({type(e).__name__}: {e}); a dead "
                  "rank may leave the others waiting until the process-group timeout",
                  file=sys.stderr)
    return ctx


# ----------------------------------------------------------------------------- data

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
        nodes.on_node_first(make)  # each node's local rank 0, in its own --data-dir
        ctx.log(f"NOTE: --dataset synthetic: the images are SYNTHETIC (written by "
                f"data.write_synthetic into {root}) and the teacher weights are RANDOM (a 1-block "
                f"deit3_small); accuracies say nothing about CIFAR-10. Small defaults unless set: "
                f"{SYNTHETIC_DEFAULTS}")
    else:
        root = args.data_dir
        tpath = args.teacher or teacher_path(root)
        teacher_args = {}
        fetch = needs_teacher and not args.teacher  # each node's local rank 0, its own --data-dir
        nodes.on_node_first(lambda: download(root, args.mirror, teacher=fetch, node_local=True))

    def key():  # what every node must hold alike, compared before any long stage
        if needs_teacher and not os.path.isfile(tpath):
            raise TrainError(f"teacher file {tpath} not found")
        sha = {"teacher": fileio.sha256_file(tpath)[:16]} if needs_teacher else {}
        return {**data.files_identity(root, args.split), **sha}
    nodes.same_data(key, root)
    if needs_teacher and not os.path.isfile(tpath):
        raise TrainError(f"teacher file {tpath} not found (python data.py --data-dir "
                         f"{args.data_dir} downloads it, or pass --teacher PATH)")
    data_args = {"root": os.path.abspath(root), "split": args.split, "seed": args.seed,
                     "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
                     "test_per_class": args.test_per_class}
    splits = {}
    nodes.on_node_first(lambda: splits.update(data.build_mix(**data_args)))  # each node's cache
    if not splits:
        splits = data.build_mix(**data_args)
    sizes = ", ".join(f"{k} {len(v['labels']):,}" for k, v in splits.items())
    ctx.log(f"data: {sizes} images ({args.split} split, {root})")
    return splits, data_args, (tpath if needs_teacher else None), teacher_args


# ----------------------------------------------------------------------------- teacher

def prepare_teacher(args, ctx, splits, data_args, path, teacher_args, amp_dtype):
    """teacher.py's cache, built once on rank 0 while the others wait, and shared by runs.
    Returns (info for the checkpoint, train logits on the device or None, live teacher or None)."""
    device = ctx.device
    sha = fileio.sha256_file(path)
    # the cache's identity: teacher, mix content, resize, head settings, seed (equal on all ranks)
    ident = teacher.identity(sha, teacher_args, splits, data_args, args.teacher_resize,
                             args.head_epochs, args.seed, amp_dtype)
    cache = teacher.cache_dir(data_args["root"], ident)
    nodes.on_rank0_first(lambda: teacher.build(path, teacher_args, splits, data_args, ident,
                                               device, amp_dtype, log=ctx.log))
    names = ["logits_train.pt"] * (args.split != "standard") + ["teacher_head.pt"]  # head last
    nodes.share_files(cache, names, "teacher cache", log=ctx.log)  # to nodes without a copy
    info = {"path": os.path.abspath(path), "sha256": sha,
            "head": os.path.abspath(os.path.join(cache, "teacher_head.pt"))}
    logits, live = None, None
    if args.split == "standard":  # each epoch's fresh corruptions: no fixed table to cache
        ctx.log("teacher: LIVE on every batch (split standard: fresh corruptions each epoch)")
    elif args.teacher_view == "cached":
        logits = teacher.load_logits(cache, ident, splits["train"], device)  # checked vs the mix
    if args.split == "standard" or args.teacher_view == "augmented":
        live = teacher.live(path, teacher_args, cache, ident, device)
    return info, logits, live


def teacher_targets(args, batch, images, x, cached, live, amp_dtype):
    """The teacher's logits for a batch: live on what the student sees (--teacher-view augmented),
    live on the corrupted, un-augmented batch (--split standard: as the cached splits' teacher saw
    its images), or read from the cache (thesis 4.1); None without distillation."""
    if live is None:
        return cached[batch["index"]] if cached is not None else None
    if args.teacher_view == "augmented":
        tx = F.interpolate(x, size=224, mode=args.teacher_resize)
    else:
        tx = teacher_view(images, 224, args.teacher_resize)  # (B, 3, 224, 224)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype,
                                         enabled=amp_dtype is not None):
        return live(tx).float()


# ----------------------------------------------------------------------------- model

def build_student(args, device):
    """The student on the device and create_model's overrides (saved to rebuild it)."""
    model_args = {"num_classes": 10, "num_types": len(data.TYPES), "drop_path": args.drop_path,
                      "drop": args.drop, "fused_attn": bool(args.fused), "layout": args.layout}
    if args.model == "cdeit":
        model_args["strategy"] = args.strategy
    model_args.update({k: getattr(args, k) for k in ("depth", "embed_dim", "num_heads")
                       if getattr(args, k)})
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = create_model(args.model, **model_args)
    if args.model == "vit":  # the head the layout gave it, recorded: the file rebuilds without it
        model_args["head"] = model.cfg.head
    return model.to(device), model_args


def build_optimizer(args, raw_model, device):
    """AdamW (or SGD) at DeiT's linearly scaled peak lr (thesis Table 1). -> (optimizer, peak)."""
    peak = args.lr * args.batch_size / 512
    groups = param_groups(raw_model, args.weight_decay)
    fused = True if device.type == "cuda" else None
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=peak, fused=fused), peak
    return torch.optim.SGD(groups, lr=peak, momentum=0.9, fused=fused), peak


def build_augment(args):
    return Augment(num_classes=10, num_types=len(data.TYPES), crop_padding=args.crop_padding,
                   flip=args.hflip, mixup_alpha=args.mixup, mixup_prob=args.mixup_prob,
                   cutmix_alpha=args.cutmix, cutmix_prob=args.cutmix_prob,
                   mix_types=args.mix_types, randaug_ops=2 if args.randaug else 0,
                   randaug_magnitude=args.randaug, randaug_prob=args.randaug_prob,
                   erase_prob=args.erase_prob, erase_mode=args.erase_mode, draw_per=args.draw_per)


def pick_loss(args, device):
    """losses.distillation_loss, or its Triton kernel on CUDA with --fused."""
    loss_fn = losses.distillation_loss
    if args.fused:
        kernels.verify.set_mode(args.fused)
    if args.fused and device.type == "cuda":
        loss_fn = getattr(kernels, "distillation_loss", loss_fn)
    return loss_fn


def compile_step(model, loss_fn, mode):
    """The student and the loss under torch.compile's `mode` (COMPILE_MODES); as is for "off"."""
    if mode == "off":
        return model, loss_fn
    kw = {} if mode == "default" else {"mode": mode}
    return torch.compile(model, **kw), torch.compile(loss_fn, fullgraph=True, **kw)


def lr_at(step, total, warmup, peak, floor):
    """Linear warmup then cosine decay to floor (thesis Table 1: cosine, 3 warmup epochs), in steps
    or epochs."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def lr_schedule(args, spe, peak):
    """step -> lr. --lr-per epoch: the curve in epochs, constant within each (the thesis's trainers
    call scheduler.step() once per epoch; warmup rounded down to whole epochs); --lr-per step: per
    step."""
    floor = min(args.min_lr, peak)
    if args.lr_per == "epoch":
        return lambda step: lr_at(step // spe, args.epochs, int(args.warmup_epochs), peak, floor)
    return lambda step: lr_at(step, args.epochs * spe, int(args.warmup_epochs * spe), peak, floor)


# ----------------------------------------------------------------------------- the loop

def train_step(model, optimizer, scaler, loss_fn, x, y, t, teacher_logits, args, amp_dtype):
    """One optimisation step on an augmented batch; returns (loss, parts), still on the device."""
    if args.compile == "reduce-overhead":  # a new step: last step's graph outputs may be reused
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(x)
    loss, parts = loss_fn(out, y, teacher_logits, t if args.model == "cdeit" else None,
                          distill=args.distill, tau=args.tau, alpha=args.alpha,
                          smoothing=args.smoothing)
    if out.corr_cls is not None:  # logged only: the class token alone, from the logits at hand
        cls = F.cross_entropy(out.cls.detach().float(), y, label_smoothing=args.smoothing)
        parts = {**parts, "cls": cls}
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(params, args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


def validate(raw_model, split, ctx):
    """The val columns of summary.csv, on rank 0, as eval.py reports them (run_student, summarize:
    bf16 autocast on CUDA, fp32 on the CPU, whatever --amp). Every rank gets val_accuracy (they
    must agree on "improved")."""
    m = {}
    if ctx.master:
        batch = 512 if ctx.device.type == "cuda" else 256
        outs, _ = run_student(raw_model, split["images"], ctx.device, batch)
        m = checkpoint.val_columns(summarize(outs, split))
        raw_model.train()
    val = torch.tensor([m.get("val_accuracy", 0.0)], device=ctx.device, dtype=torch.float64)
    if ctx.ddp:
        dist.broadcast(val, 0)
    return {**m, "val_accuracy": val.item()}


AMP_NAMES = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling",
             None: "off (fp32)"}


def train_student(args, ctx, splits, data_args, teacher_info, teacher_logits, live_teacher,
                  amp_dtype, stop_at_step=None):
    device, world, rank = ctx.device, ctx.world, ctx.rank
    raw_model, model_args = build_student(args, device)
    optimizer, peak = build_optimizer(args, raw_model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loader = data.DeviceLoader(splits["train"], args.batch_size, device, shuffle=True,
                               drop_last=True, seed=args.seed, rank=rank, world_size=world)
    augment = build_augment(args)
    # --split standard: the per-rank generator of the fresh corruptions (saved with the others)
    cgen = torch.Generator(device=device) if args.split == "standard" else None
    streams = checkpoint.Streams(device, torch.Generator(device=device), cgen)
    loss_fn = pick_loss(args, device)
    spe = len(loader)  # steps per epoch
    if spe == 0:
        raise TrainError(f"--batch-size {args.batch_size} exceeds the {loader.n} training images")
    total, lr_of = args.epochs * spe, lr_schedule(args, spe, peak)
    student = checkpoint.Student(raw_model, model_args, optimizer, scaler)
    run = checkpoint.Run(args, ctx, student, streams, data_args, teacher_info)
    if args.resume:
        run.resume(spe)
    model, loss_fn = compile_step(raw_model, loss_fn, args.compile)
    if ctx.ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if ctx.master:
        checkpoint.write_config(args)
    cfg = raw_model.cfg
    kernel = "PyTorch (losses.py)" if loss_fn is losses.distillation_loss \
        else "fused Triton kernel (kernels/)"
    ctx.log(f"student: {args.model} ({count_params(raw_model):,} params, {cfg.depth} blocks, "
            f"D={cfg.embed_dim}), {args.distill} distillation, {spe} steps/epoch x {args.epochs} "
            f"epochs, global batch {args.batch_size} on {world} x {device.type}, peak lr "
            f"{peak:.2e}, mixed precision {AMP_NAMES[amp_dtype]}, loss {kernel}")
    if run.step == 0 and not run.history:
        run.record_untrained(validate(raw_model, splits["val"], ctx))

    stopped, meter = None, checkpoint.Meter(run, total)
    with checkpoint.stop_requests():
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
                if cgen is not None:  # standard: a fresh (type, severity) per row; the token
                    images, types, _ = data.draw_corruptions(images, cgen)  # learns the drawn type
                x, y, t = augment(images, batch["labels"], types, generator=streams.augment)
                tl = teacher_targets(args, batch, images, x, teacher_logits, live_teacher,
                                     amp_dtype)
                loss, parts = train_step(model, optimizer, scaler, loss_fn, x, y, t, tl, args,
                                         amp_dtype)
                meter.add(loss, parts)
                run.step += 1
                if meter.steps_done == 1 and args.fused:  # kernels checked: one path on all ranks
                    record_kernels(args, ctx)
                if stop_at_step is not None and run.step >= stop_at_step:
                    STOP.why = STOP.why or f"stop_at_step={stop_at_step}"
                if meter.due(i == spe - 1) and meter.flush(lr):  # True: some rank asked to stop
                    stopped = STOP.why or "a stop on another rank"
                    break
            if stopped and run.step < (run.epoch + 1) * spe:  # mid-epoch: save where we are
                run.save(run.ckpt_path)
                ctx.log(f"stopped ({stopped}) at step {run.step}: saved {run.ckpt_path}; continue "
                        "with --resume")
                break
            run.end_epoch(validate(raw_model, splits["val"], ctx), lr, spe, t_epoch)
            if stopped:  # the stop came on an epoch's last step: the epoch was finished and saved
                ctx.log(f"stopped ({stopped}) after epoch {run.epoch}: saved {run.ckpt_path}; "
                        "continue with --resume")
    if run.epoch >= args.epochs and meter.steps_done == 0:
        epochs = "1 epoch" if run.epoch == 1 else f"{run.epoch} epochs"
        ctx.log(f"already trained {epochs}; nothing to do")
    return {"best_val_accuracy": run.best_val, "step": run.step, "stopped": stopped}


# ----------------------------------------------------------------------------- main

def record_kernels(args, ctx):
    """Every rank takes the strictest of all ranks' kernel verdicts (kernels/verify.py); rank 0
    records them in config.json's environment."""
    verdicts = kernels.verify.agree()
    if ctx.master:
        args.environment["kernels"] = verdicts
        checkpoint.write_config(args)


def run(args, stop_at_step=None):
    # recorded in config.json and the checkpoint's "config" (both write vars(args)); taken before
    # the process group starts its threads (git runs in a child process), on rank 0, which writes
    args.environment = checkpoint.environment() if int(os.environ.get("RANK", "0")) == 0 else None
    ctx = setup(args)
    error = None
    try:
        amp = args.amp or ("bf16" if ctx.device.type == "cuda" else "off")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        splits, data_args, tpath, targs = prepare_data(args, ctx)
        # only once the data are there
        nodes.on_rank0_first(lambda: checkpoint.prepare_out_dir(args))
        info, logits, live = None, None, None
        if tpath is not None:
            info, logits, live = prepare_teacher(args, ctx, splits, data_args, tpath, targs,
                                                 amp_dtype)
        t0 = time.time()
        with checkpoint.fault_lines(ctx, args.batch_size, args.out_dir):
            res = train_student(args, ctx, splits, data_args, info, logits, live, amp_dtype,
                                stop_at_step)
        if not res["stopped"]:
            best = os.path.join(args.out_dir, "best.pt")
            ctx.log(f"done in {(time.time() - t0) / 60:.1f} min: best val accuracy "
                    f"{res['best_val_accuracy']:.2%}; files in {args.out_dir} (config.json, "
                    f"summary.csv, ckpt.pt, best.pt); next: python eval.py {best}")
        return res
    except BaseException as e:
        error = " ".join(str(e).split()).split(";")[0] or type(e).__name__  # its gist, for peers
        if len(error) > 100:
            error = error.split(": ")[0]
        raise
    finally:
        if ctx.watch:
            ctx.watch.close(error)
        if ctx.ddp:
            with contextlib.suppress(Exception):  # after a lost peer this may fail too
                dist.destroy_process_group()


def main(argv=None, stop_at_step=None):
    args = get_args(argv)  # a bad value of one flag: one line from cli.Parser, exit 2
    try:  # flag combinations, the device and the paths, before any file is read or written
        notes, flag_error = check_args(args, int(os.environ.get("WORLD_SIZE", "1"))), None
    except FlagError as e:
        notes, flag_error = [], str(e)
    line, stop = nodes.flag_verdict(flag_error)  # under torchrun: every rank's check, agreed
    if line:
        print(f"train.py: error: {line}", file=sys.stderr, flush=True)
    if stop:
        return 2
    for n in notes if nodes.where()["rank"] == 0 else []:
        print(f"note: {n}", file=sys.stderr, flush=True)
    try:
        run(args, stop_at_step)
    except (TrainError, DataError, ModelFileError, OSError, nodes.RankError, nodes.Stopped) as e:
        line = checkpoint.error_line(e, args.out_dir)  # OSError: fileio.WriteError and kin
        if line:  # one line per failure, from the rank (or node) that can say it
            print(line, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
