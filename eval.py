"""Evaluate trained students (and the fitted teacher head) on the thesis's mix or on CIFAR-10-C.

    python eval.py runs/cdeit/best.pt                   # test split of the mix it was trained on
    python eval.py vit.pt deit.pt cdeit.pt --baseline vit.json   # side by side, like Table 3
    python eval.py --teacher data/cache/teacher_head.pt # the fitted teacher head (thesis 4.1)
    python eval.py best.pt --benchmark cifar10c [--extra]  # the standard 15 x 5 CIFAR-10-C protocol
    python eval.py best.pt --calibrate                  # temperature scaling, see calibrate.py
    python eval.py best.pt --benchmark cifar10c --robustbench Ours.json   # see robustbench.py

A checkpoint trained with --split standard is tested by default on clean CIFAR-10 test + the
real CIFAR-10-C files, with the errors on the thesis's 10 training corruptions (seen) and on the
5 others (unseen) apart.

Top to bottom: 1. input files (students: model.load_student), 2. running a model over a split
(bf16 autocast on CUDA), 3. the metrics of one run (metrics.py, thesis 3.5), 4. the CIFAR-10-C
benchmark, 5. run labels and JSON, 6. student-teacher agreement, then the command line. The
tables printed are tables.py's, the --plot figure plots.py's. --json writes one dict for one
checkpoint, a list (command-line order, the teacher last) for several; every output is written
only after everything succeeded, atomically.

ECE is Guo et al.'s definition over the whole split at once (thesis Eq. 8-9). The thesis's ECEs
(~0.0002) come from per-batch ECEs summed and divided by the number of samples: not comparable.
"""
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch

import augment
import calibrate
import cli
import corruptions
import data
import download
import fileio
import model as model_lib
import plots
import robustbench
import scoring
import tables
import teacher as teacher_lib
from metrics import (
    mce,
    relative_mce,
    relative_mce_undefined,
)

EVAL_KIND = "cdeit-kit/eval"
EXTRA = download.CORRUPTION_FILES[15:]  # the release's 4 extra corruptions


class EvalError(RuntimeError):
    """A bad input file or option; the message names the file and the problem."""


# ----------------------------------------------------------------------------- 1. input files

def load_head(path):
    """A teacher head file (teacher.py's HEAD_KIND) with its cache identity, checked."""
    hint = {model_lib.STUDENT_KIND: "; pass a student checkpoint positionally"}
    ck = model_lib.load_checked(path, "teacher head", teacher_lib.HEAD_KIND,
                                ("weight", "bias", "teacher_path", "data_args"), hint)
    w, b = ck["weight"], ck["bias"]
    if not (torch.is_tensor(w) and torch.is_tensor(b) and w.ndim == 2 and b.shape == (w.shape[0],)):
        raise EvalError(f"{path}: weight/bias must be (C, D) and (C,) tensors")
    ident = ck.get("identity")
    if not (isinstance(ident, dict) and isinstance(ident.get("mix"), dict)
            and "content" in ident["mix"]):
        raise EvalError(f"{path}: teacher head without a cache identity (an older teacher.py wrote "
                        "it), so it cannot be checked against the data; rerun train.py to rebuild "
                        "its cache")
    return ck


def check_head_mix(head, data_args, split_name, split):
    """Refuse a teacher head whose cache was built on another mix: the mix identity (version, split,
    seed, counts, the files' content) and the evaluated split's digest (labels, types, severities,
    sources, sampled images) must equal what teacher.py stored."""
    folder = os.path.dirname(os.path.abspath(head["_path"]))
    stored, now = head["identity"]["mix"], data.mix_identity(**data_args)
    stored_files = stored.get("files") or {}
    diff = [k for k in sorted(now) if k != "files" and now[k] != stored.get(k)]
    diff += [f for f in sorted(now["files"]) if now["files"][f] != stored_files.get(f)]
    digest = data.mix_digest({split_name: split})[split_name]
    if not diff and digest != stored["content"].get(split_name):
        diff = [f"the {split_name} split's labels, types, severities, sources or images"]
    if diff:
        raise EvalError(f"{folder}: this teacher cache was built for another mix (differs in "
                        f"{', '.join(diff)}); rebuild it with train.py on this data, or pass the "
                        "--data-dir it was built from")


def load_baseline(path):
    """An earlier eval.py --json of one checkpoint (the --baseline of Eq. 10)."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: baseline JSON not found")
    try:
        with open(path) as f:
            base = json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: not a readable JSON file ({model_lib.first_line(e)})") from None
    if isinstance(base, list):
        if len(base) != 1:
            raise EvalError(f"{path}: holds {len(base)} results; a baseline must be one eval "
                            "(one checkpoint)")
        base = base[0]
    if not isinstance(base, dict) or base.get("kind") != EVAL_KIND:
        raise EvalError(f"{path}: not a JSON written by eval.py --json (kind != {EVAL_KIND!r})")
    if not isinstance(base.get("corruption_errors"), dict) or base.get("clean_error") is None:
        raise EvalError(f"{path}: baseline lacks corruption_errors / clean_error")
    return base


def _images_seen(r):
    """What tells the images of two runs apart: the benchmark, or the split and its mix."""
    if r.get("benchmark"):
        return {"benchmark": r["benchmark"]}
    data_args = {k: v for k, v in (r.get("data_args") or {}).items() if k != "root"}
    return {"split": r.get("split"), "data_args": data_args}


def check_baseline(base, res, path):
    """A run and its --baseline must have seen the same images (the file paths may differ)."""
    a, b = _images_seen(res), _images_seen(base)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        what = "; ".join(f"{k}: baseline {b.get(k)} vs this run {a.get(k)}" for k in diff)
        raise EvalError(f"{path}: baseline was evaluated on other images ({what})")


# ----------------------------------------------------------------------------- 2. running a model

@torch.no_grad()
def run_teacher(head, split_name, split, device, batch_size):
    """The fitted teacher head (thesis 4.1) on the split: from the cached class-token features
    beside the head when they match the split, else DeiT-III on augment.teacher_view of the
    images. -> ({"combined": logits}, images/s, the source read)."""
    path = head["_path"]
    W, b = head["weight"].float(), head["bias"].float()  # (C, D), (C,)
    folder = os.path.dirname(os.path.abspath(path))
    feats = os.path.join(folder, f"features_{split_name}.pt")
    if os.path.isfile(feats):
        try:  # checked like train.py's reads: identity, labels and sources row for row
            f = teacher_lib.read_features(folder, head["identity"], split_name, split)["features"]
            if f.shape[1] != W.shape[1]:
                raise teacher_lib.CacheError(f"{feats}: {f.shape[1]} features, the head takes "
                                             f"{W.shape[1]}")
            t0 = time.perf_counter()
            logits = f.float() @ W.T + b  # (N, C)
            return {"combined": logits}, len(logits) / max(time.perf_counter() - t0, 1e-9), feats
        except teacher_lib.CacheMismatch as e:
            raise EvalError(str(e)) from None
        except teacher_lib.CacheError as e:  # a damaged file is recomputed, never trusted
            print(f"eval.py: ignoring {feats} ({e}); running the teacher", file=sys.stderr)
    try:
        net = model_lib.load_teacher(head["teacher_path"], num_classes=W.shape[0],
                                     **head.get("teacher_args", {}))
    except model_lib.ModelFileError as e:
        raise EvalError(f"{path}: {e}") from None
    net.head.weight.copy_(W)
    net.head.bias.copy_(b)
    net = net.to(device).eval()
    images = split["images"].to(device)
    out = []
    t0 = scoring.synced_time(device)
    for i in range(0, len(images), batch_size):
        x = augment.teacher_view(images[i:i + batch_size], size=net.cfg.img_size,
                                 mode=head["resize"])
        with scoring.eval_autocast(device):
            out.append(net(x).float().cpu())
    ips = len(images) / max(scoring.synced_time(device) - t0, 1e-9)
    return {"combined": torch.cat(out)}, ips, head["teacher_path"]


# ------------------------------------------------------------------------- 3. metrics of one run

def add_mce(res, base, base_path):
    """Eq. 10 against --baseline ("mCE vs ViT" when the baseline is the ViT), beside the
    headline mCE; the relative mCE, or the reason it is undefined."""
    try:
        res["mce_vs_baseline"] = mce(res["corruption_errors"], base["corruption_errors"])
        why = relative_mce_undefined(base["corruption_errors"], base["clean_error"])
        res["relative_mce"] = None if why else relative_mce(
            res["corruption_errors"], res["clean_error"], base["corruption_errors"],
            base["clean_error"])
        res["relative_mce_undefined"] = why  # printed as "undefined" and why, never a number
    except ValueError as e:
        raise EvalError(f"{base_path}: {e}") from None
    res["baseline"] = base_path
    name = base.get("label") or base.get("model_name")
    res["baseline_run"] = f"{name} ({base.get('checkpoint')})"
    res["baseline_model"] = base.get("model_name")


# ----------------------------------------------------------------------------- 4. CIFAR-10-C

def run_benchmark(net, root, device, batch_size, extra=False, temps=None):
    """Hendrycks & Dietterich's protocol: clean CIFAR-10 test + every row of the real files (5
    severities x the test set) of the 15 benchmark corruptions, through run_student file by file,
    then summarize() over clean + 15 x 5 pooled. The 4 extra corruptions are reported on their own.
    accuracy = robustbench_accuracy = the mean over the 15 x 5 cells (RobustBench's number).
    -> (result, images/s)."""
    cifar = data.read_cifar10(root)
    y = torch.from_numpy(cifar["test_labels"])
    n = len(y)
    names = ["clean"] + corruptions.CORRUPTIONS
    outs, book, per = {}, {"labels": [], "types": [], "severities": []}, {}
    done = 0
    t0 = time.perf_counter()
    for name in names + (EXTRA if extra else []):
        if name == "clean":
            x = cifar["test_images"]
        else:
            x = data.read_cifar10c(root, name, cifar["test_labels"])[0]
        images = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        o, _ = scoring.run_student(net, images, device, batch_size)
        done += len(x)
        labels = y.repeat(len(x) // n)
        if name != "clean":  # rows (s-1)*n .. s*n are severity s
            per[name] = (o["combined"].argmax(-1) == labels).view(5, n).double().mean(1).tolist()
            rate = done / (time.perf_counter() - t0)
            print(f"  {name:<18} " + " ".join(f"{100 * a:6.2f}" for a in per[name])
                  + f"   ({rate:,.0f} img/s)", flush=True)
        if name in names:
            for k, v in o.items():
                outs.setdefault(k, []).append(v)
            book["labels"].append(labels)
            book["types"].append(torch.full((len(x),), names.index(name)))
            book["severities"].append(torch.arange(len(x)) // n + (name != "clean"))
    ips = done / max(time.perf_counter() - t0, 1e-9)
    outs = {k: torch.cat(v) for k, v in outs.items()}
    book = {k: torch.cat(v) for k, v in book.items()}
    r = scoring.summarize(outs, book, names)

    def cells(cs):  # equal-sized cells: their mean is the pooled accuracy too
        return float(np.mean([per[c] for c in cs]))

    mean15 = cells(corruptions.CORRUPTIONS)
    r.update(n=n, clean_accuracy=r["per_type"]["clean"], accuracy=mean15,
             robustbench_accuracy=mean15, per_corruption=per,
             mean_accuracy_seen=cells(corruptions.SEEN),
             mean_accuracy_unseen=cells(corruptions.UNSEEN),
             robustbench_reference=robustbench.STANDARD_ACCURACY)
    if extra:
        r["mean_accuracy_extra"] = cells(EXTRA)
    if temps:  # calibration under the benchmark's shift, unseen corruptions included
        r["calibration_scaling"] = calibrate.report(outs, book, names, temps)
    return r, ips


def cosine_history(ck):
    """The val token cosines train.py logged per epoch (epoch 0 = the untrained model), so
    thesis 4.4's start -> end values can be read from a checkpoint.
    -> [{epoch, cls_dist, cls_corr}]."""
    rows = ck.get("history") if isinstance(ck.get("history"), list) else []
    out = [{"epoch": h.get("epoch"), "cls_dist": h.get("val_cos_cls_dist"),
            "cls_corr": h.get("val_cos_cls_corr")} for h in rows if isinstance(h, dict)]
    return [h for h in out if h["cls_dist"] is not None or h["cls_corr"] is not None]


# ----------------------------------------------------------------------------- 5. labels, JSON

# train.py flags that say how a run executed, not what it trained: never what tells two runs apart
NOT_RECIPE = {"out_dir", "resume", "environment", "device", "data_dir", "mirror", "log_interval",
              "compile", "fused", "amp", "teacher"}


def run_labels(results):
    """A label per result that tells runs apart: model/distillation, and where several results share
    that, the train.py flags in which they differ (up to 3), else their out-dir names; results that
    still tie (best.pt and ckpt.pt of one run) get their checkpoint path."""
    base = [f"{r['model_name']}/{r['distill'] or '-'}" if r["model_name"] != "deit3_small"
            else "teacher head" for r in results]
    out = list(base)
    for b in dict.fromkeys(base):
        idx = [i for i, x in enumerate(base) if x == b]
        if len(idx) < 2:
            continue
        cfgs = [results[i].get("train_config") or {} for i in idx]
        keys = sorted(k for k in set().union(*cfgs) if k not in NOT_RECIPE and len(
            {json.dumps(c.get(k), sort_keys=True, default=str) for c in cfgs}) > 1)
        for i, c in zip(idx, cfgs):
            if 0 < len(keys) <= 3:
                out[i] += " " + " ".join(f"--{k.replace('_', '-')} {c.get(k)}" for k in keys)
            else:
                folder = os.path.dirname(os.path.abspath(results[i]["checkpoint"]))
                out[i] += " " + os.path.basename(folder)
    tied = {x for x in out if out.count(x) > 1}
    return [f"{x} ({r['checkpoint']})" if x in tied else x for x, r in zip(out, results)]


def _jsonable(v):
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ----------------------------------------------------------------------------- 6. teacher agreement

def _agreement(s, t, y, m):
    """Student predictions s vs teacher predictions t on labels y, over the images of mask m."""
    n = int(m.sum())

    def share(c):
        return float(c[m].double().mean()) if n else None

    return {"n": n, "agreement": share(s == t), "both_right": share((s == y) & (t == y)),
            "student_only": share((s == y) & (t != y)), "teacher_only": share((s != y) & (t == y)),
            "same_error": share((s != y) & (s == t)),
            "different_errors": share((s != y) & (t != y) & (s != t))}


def add_agreement(results, mixes, split_name):
    """Student vs teacher head on the same images (the teacher result is last): how often their
    predictions agree, per type and per (type, severity), and how the errors split: both right,
    only the student right, only the teacher right, both wrong with the same class (an error the
    student shares with its teacher), both wrong differently."""
    teacher = results[-1]

    def mix_of(r):
        return {k: v for k, v in r["data_args"].items() if k != "root"}

    for r in results[:-1]:
        if "_pred" not in r or mix_of(r) != mix_of(teacher):
            continue
        split = mixes[(json.dumps(r["data_args"], sort_keys=True), split_name)]
        s, t, y = r["_pred"], teacher["_pred"], split["labels"]
        types, sev = split["types"], split["severities"]
        rep = {"teacher": teacher["checkpoint"],
               "overall": _agreement(s, t, y, torch.ones_like(y, dtype=torch.bool)),
               "per_type": {}, "cells": []}
        for k, name in enumerate(data.TYPES):
            if (types == k).any():
                rep["per_type"][name] = _agreement(s, t, y, types == k)
            for v in sorted(set(sev[types == k].tolist())):
                cell = _agreement(s, t, y, (types == k) & (sev == v))
                rep["cells"].append({"type": name, "severity": v, **cell})
        r["teacher_agreement"] = rep


# ----------------------------------------------------------------------------- command line

def _device(name):
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise EvalError(f"--device {name}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available on this machine")
    return dev


def check_options(args):
    """Every option, the device and the output paths, before any file is read (each flag's own
    range is its argparse type in main). Raises cli.FlagError."""
    if not args.checkpoints and not args.teacher:
        cli.fail("checkpoints", "(none)", "give at least one checkpoint (or --teacher HEAD.pt)")
    if args.extra and not args.benchmark:
        cli.fail("--extra", "", "applies only with --benchmark cifar10c")
    if args.benchmark and args.teacher:
        cli.fail("--teacher", args.teacher,
             "--benchmark evaluates students; the teacher head is evaluated on the mix only")
    if args.benchmark and args.split != "test":
        cli.fail("--split", args.split, "--benchmark cifar10c is a test set; leave --split at test")
    if args.calibrate and args.split == "val":
        cli.fail("--calibrate", "",
             "fits the temperatures on val; evaluate them on --split test (the default)")
    if args.calibrate and not args.checkpoints:
        cli.fail("--calibrate", "",
                 "needs a student checkpoint (the teacher head is not calibrated)")
    if args.robustbench and (not args.benchmark or len(args.checkpoints) != 1):
        cli.fail("--robustbench", args.robustbench,
             "needs --benchmark cifar10c and exactly one checkpoint")
    if args.robustbench and not args.robustbench.endswith(".json"):
        cli.fail("--robustbench", args.robustbench,
                 "give a .json path (RobustBench's model-info file)")
    cli.check_device("--device", args.device)
    cli.check_existing_dir("--data-dir", args.data_dir)
    cli.check_existing_file("--baseline", args.baseline)
    cli.check_existing_file("--teacher", args.teacher)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (optional dependency, checked before any work)
        except ImportError:
            cli.fail("--plot", args.plot,
                 "needs matplotlib, not installed (pip install -r requirements-plot.txt)")
    for flag, out in (("--json", args.json), ("--plot", args.plot),
                      ("--robustbench", args.robustbench)):
        if out:  # fail before the work, not after it
            cli.check_writable_file(flag, out)


def load_jobs(args, device):
    """Every checkpoint, the teacher head and the baseline, loaded and checked before any work.
    -> ([(result skeleton, model or head)] in command-line order, the teacher last; baseline)."""
    jobs = []
    for path in args.checkpoints:
        net, ck = model_lib.load_student(
            path, {teacher_lib.HEAD_KIND: "; pass a teacher head with --teacher"})
        cfg = ck.get("config") if isinstance(ck.get("config"), dict) else {}
        r = {"checkpoint": path, "model_name": ck["model_name"], "model_args": ck["model_args"],
             "distill": cfg.get("distill"), "dataset": ck.get("dataset"), "epoch": ck.get("epoch"),
             "data_args": dict(ck["data_args"]), "token_similarity_history": cosine_history(ck),
             "train_config": {k: v for k, v in cfg.items() if k != "environment"}}
        jobs.append((r, net))
    if args.teacher:
        head = load_head(args.teacher)
        head["_path"] = args.teacher
        r = {"checkpoint": args.teacher, "model_name": "deit3_small",
             "model_args": head.get("teacher_args", {}), "distill": None, "dataset": None,
             "epoch": None, "data_args": dict(head["data_args"])}
        jobs.append((r, head))
    base = load_baseline(args.baseline) if args.baseline else None
    for r, obj in jobs:
        student = not isinstance(obj, dict)
        if student and not args.calibrate:  # temperatures stored by an earlier --calibrate
            types = obj.cfg.num_types if obj.head_corr is not None else None
            r["temperatures"] = model_lib.load_temperatures(r["checkpoint"], types)
        if args.data_dir:
            r["data_args"]["root"] = args.data_dir
        root = r["data_args"].get("root")
        if root is not None and not os.path.isdir(root):  # a moved data folder: say where we looked
            where = "(--data-dir) does not exist" if args.data_dir else (
                "(recorded by train.py) does not exist; moved? pass --data-dir with the folder it "
                "was trained on")
            raise EvalError(f"{r['checkpoint']}: its data folder {root} {where}")
        # a standard-split student's test set is CIFAR-10-C itself: the benchmark's images and code
        standard = r["data_args"].get("split") == "standard" and args.split == "test" and student
        r.update(kind=EVAL_KIND, version=1, split="cifar10c" if args.benchmark else args.split,
                 benchmark=args.benchmark or ("cifar10c" if standard else None),
                 device=str(device), baseline=None)
        if base is not None:
            check_baseline(base, r, args.baseline)  # refuse a baseline on other images
    return jobs, base


def split_of(r, name, args, mixes):
    """Split `name` of r's mix. mixes caches, per data_args, the splits eval.py reads (the one
    evaluated, and val with --calibrate; not the real mix's 1.5 GB train split), so jobs on the
    same mix build it once."""
    key = json.dumps(r["data_args"], sort_keys=True)
    if (key, name) not in mixes:
        try:
            mix = data.build_mix(**r["data_args"])
        except download.DataError as e:
            where = "--data-dir" if args.data_dir else (
                "the one train.py recorded; --data-dir sets another")
            root = r["data_args"]["root"]
            raise EvalError(f"{e} (eval.py read the data folder {root}: {where})") from None
        except (TypeError, ValueError) as e:
            raise EvalError(f"{r['checkpoint']}: data_args {r['data_args']} do not build a mix "
                            f"({e})") from None
        for kept in {name, args.split} | ({"val"} if args.calibrate else set()):
            mixes[(key, kept)] = mix[kept]
    return mixes[(key, name)]


def fit_on_val(r, net, args, device, mixes):
    """--calibrate: r's temperatures fitted on the val split of its mix (calibrate.py)."""
    val = split_of(r, "val", args, mixes)
    outs, _ = scoring.run_student(net, val["images"], device, args.batch_size)
    return calibrate.fit_temperatures(outs, val["labels"], r["checkpoint"], args.min_type_images)


def evaluate_one(r, obj, args, device, mixes):
    """The metrics of one student (or the teacher head) and its images/s; the split evaluated
    comes from mixes (split_of)."""
    if r["benchmark"]:
        trained_on = r["data_args"].get("split")
        if trained_on in ("paper", "grouped"):  # "standard" trains on CIFAR-10 train only
            print(f"eval.py: warning: {r['checkpoint']} was trained on the {trained_on!r} mix, "
                  "whose corrupted images come from CIFAR-10-C itself: these benchmark images "
                  "are NOT held out", file=sys.stderr)
        print(f"{r['checkpoint']}: CIFAR-10-C accuracy % per severity 1..5")
        return run_benchmark(obj, r["data_args"]["root"], device, args.batch_size, args.extra,
                             r.get("temperatures"))
    split = split_of(r, args.split, args, mixes)
    if isinstance(obj, dict):
        check_head_mix(obj, r["data_args"], args.split, split)
        outs, ips, source = run_teacher(obj, args.split, split, device, args.batch_size)
        r["teacher_source"] = source
    else:
        outs, ips = scoring.run_student(obj, split["images"], device, args.batch_size)
    m = scoring.summarize(outs, split)
    if r.get("temperatures"):
        m["calibration_scaling"] = calibrate.report(outs, split, data.TYPES, r["temperatures"])
    r["_pred"] = outs["combined"].argmax(-1)  # for add_agreement, dropped before output
    return m, ips


def evaluate(args):
    """Every job of the command line -> results (dicts), labelled, in command-line order."""
    device = _device(args.device)
    jobs, base = load_jobs(args, device)
    results = []
    mixes = {}  # split_of's cache
    for r, obj in jobs:
        if args.calibrate and not isinstance(obj, dict):
            r["temperatures"] = fit_on_val(r, obj, args, device, mixes)
            r["_fitted"] = True
        m, ips = evaluate_one(r, obj, args, device, mixes)
        r.update(m, images_per_s=ips)
        if base is not None:
            add_mce(r, base, args.baseline)
        results.append(r)
    if args.teacher:
        add_agreement(results, mixes, args.split)
    for r, label in zip(results, run_labels(results)):
        r["label"] = label
        r.pop("_pred", None)
    return results


def outputs(args, results):
    """[(path, content, what)] of every file to write, rendered in memory: the plot, the JSON,
    RobustBench's files and the --calibrate sidecars (beside each checkpoint, never in it)."""
    fitted = [r for r in results if r.pop("_fitted", False)]
    out = []
    if args.plot:
        buf = io.BytesIO()
        plots.evaluation(results, buf)
        out.append((args.plot, buf.getvalue(), "plot"))
    if args.json:
        blob = _jsonable(results[0] if len(results) == 1 else results)
        out.append((args.json, json.dumps(blob, indent=1, allow_nan=False), "results JSON"))
    if args.robustbench:
        out += robustbench.files(results[0], args.robustbench)
    for r in fitted:
        path = model_lib.temperature_path(r["checkpoint"])
        out.append((path, json.dumps(r["temperatures"], indent=1), "temperatures"))
    return out


def main(argv=None):
    p = cli.Parser(prog="eval.py", description="Evaluate cdeit-kit checkpoints (thesis 3.5, 4.4).")
    a = p.add_argument
    a("checkpoints", nargs="*", help="student checkpoints (train.py's ckpt.pt / best.pt)")
    a("--split", choices=["test", "val"], default="test",
      help="which split of the checkpoint's mix")
    a("--json", help="write the results here (one dict, or a list for several checkpoints)")
    a("--baseline",
      help="an earlier eval.py --json of the baseline (the ViT): mCE vs ViT (thesis Eq. 10)")
    a("--plot", help="reliability diagram + per-type errors as a PNG (needs matplotlib)")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--batch-size", type=cli.positive_int, default=500, help="images per forward pass")
    a("--benchmark", choices=["cifar10c"], help="the standard CIFAR-10-C protocol (15 x 5)")
    a("--extra", action="store_true", help="with --benchmark: also the 4 extra corruptions")
    a("--teacher", help="a fitted teacher head file (teacher_head.pt), evaluated on the same split")
    a("--data-dir", help="data folder, if not where the checkpoint was trained")
    a("--calibrate", action="store_true",
      help="fit temperature scaling on val (global; CdeiT also per predicted corruption type), "
           "report NLL / ECE before and after, store it beside each checkpoint as "
           "CKPT.temperatures.json")
    a("--min-type-images", type=cli.positive_int, default=50,
      help="with --calibrate: fewest val images of a predicted type to fit its own temperature "
           "(else global)")
    a("--robustbench", metavar="FILE.json",
      help="with --benchmark cifar10c: write RobustBench's model-info JSON here and the per "
           "corruption x severity accuracies beside it (FILE_unaggregated_results.csv)")
    args = p.parse_args(argv)  # a bad value: one line from cli.Parser, exit 2
    try:
        check_options(args)
    except cli.FlagError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            results = evaluate(args)
        except torch.OutOfMemoryError:
            raise EvalError(f"out of GPU memory at --batch-size {args.batch_size} (images per "
                            "step): use a smaller --batch-size, e.g. --batch-size "
                            f"{max(1, args.batch_size // 2)}") from None
        if len(results) == 1:
            tables.print_one(results[0])
        else:
            tables.print_table(results)  # several: side by side
        if args.benchmark:
            print(f"\nreference: RobustBench CIFAR-10-C, {robustbench.STANDARD}, mean accuracy "
                  f"{robustbench.STANDARD_ACCURACY}%")
        for r in results:
            if r.get("calibration_scaling"):
                calibrate.print_report(r)
            if r.get("teacher_agreement"):
                tables.print_agreement(r)
        for path, content, what in outputs(args, results):  # only now that everything succeeded
            fileio.atomic_write(path, content, what)
            print(f"wrote {path}")
        return 0
    except (EvalError, download.DataError, model_lib.ModelFileError, OSError) as e:
        # OSError: fileio.WriteError
        print("eval.py: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
