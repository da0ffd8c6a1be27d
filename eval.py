"""Evaluate trained students (and the fitted teacher head) on the seed's mix or on CIFAR-10-C.

    python eval.py runs/cdeit/best.pt                      # test split of the mix it was trained on
    python eval.py vit.pt deit.pt cdeit.pt --baseline vit.json   # side by side, like seed Table 3
    python eval.py --teacher data/cache/teacher_head.pt    # the fitted teacher head (seed 4.1: 87.4%)
    python eval.py best.pt --benchmark cifar10c [--extra]  # the standard 15 x 5 CIFAR-10-C protocol
    python eval.py best.pt --calibrate                     # temperature scaling fitted on val, stored beside it
    python eval.py best.pt --benchmark cifar10c --robustbench Ours.json   # RobustBench's model-info layout

A checkpoint trained with --split standard (CIFAR-10 train images, corrupted on the fly) is
tested on that protocol by default: clean CIFAR-10 test + the real CIFAR-10-C files, with the errors
on the seed's 10 training corruptions (seen) and on the 5 others (unseen) reported separately.

The metric functions themselves live in metrics.py (seed 3.5; each tested on hand-computed values).
Top to bottom: 1. loading teacher heads and baseline JSONs (students: model.load_student; one clear
line on any bad file), 2. running a model over a split, batched on the device (bf16 autocast on
CUDA), 3. the metrics of one run, 4. the CIFAR-10-C benchmark, 5. tables, plot, 6. after training:
temperature scaling, student-teacher agreement, RobustBench files, then the command line.

ECE is Guo et al.'s standard definition over the whole split at once (seed Eq. 8-9). The seed's
ECEs (~0.0002) are far smaller because one public implementation sums per-batch ECEs and divides by
the number of samples; ours are not comparable to those numbers.

--json writes one dict for one checkpoint and a list of dicts (command-line order, the teacher last)
for several; outputs are written only after everything succeeded, atomically.
"""
import io
import json
import math
import os
import pickle
import re
import sys
import time

import numpy as np
import torch

import augment
import corruptions
import data
import download
import fileio
import model as model_lib
import teacher as teacher_lib
from cli import (FlagError, Parser, check_device, check_existing_dir, check_existing_file, check_writable_file, fail,
                 positive_int)
from metrics import (expected_calibration_error, fit_temperature, mce, nll, relative_mce, relative_mce_undefined,
                     run_student, scale_logits, summarize, type_temperatures)

EVAL_KIND = "cdeit-kit/eval"
EXTRA = download.CORRUPTION_FILES[15:]  # the release's 4 extra corruptions
ROBUSTBENCH_WRN28_10 = 73.46  # RobustBench CIFAR-10-C, Standard WRN-28-10, mean accuracy over 15 x 5
# the column order of RobustBench's model_info/cifar10/corruptions/unaggregated_results.csv
ROBUSTBENCH_ORDER = ["shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness",
                     "fog", "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression",
                     "elastic_transform"]


class EvalError(RuntimeError):
    """A bad input file or option; the message names the file and the problem."""


# ----------------------------------------------------------------------------- 1. input files

def load_head(path):
    ck = model_lib.load_checked(path, "teacher head", teacher_lib.HEAD_KIND, ("weight", "bias", "teacher_path", "data_args"),
                                {model_lib.STUDENT_KIND: "; pass a student checkpoint positionally"})
    w, b = ck["weight"], ck["bias"]
    if not (torch.is_tensor(w) and torch.is_tensor(b) and w.ndim == 2 and b.shape == (w.shape[0],)):
        raise EvalError(f"{path}: weight/bias must be (C, D) and (C,) tensors")
    ident = ck.get("identity")
    if not (isinstance(ident, dict) and isinstance(ident.get("mix"), dict) and "content" in ident["mix"]):
        raise EvalError(f"{path}: teacher head without a cache identity (an older teacher.py wrote it), so it "
                        "cannot be checked against the data; rerun train.py to rebuild its cache")
    return ck


def check_head_mix(head, data_args, split_name, split):
    """Refuse a teacher head whose cache was built on another mix: the mix identity (version, split,
    seed, counts, the files' content) and the evaluated split's digest (labels, types, severities,
    sources, sampled images) must equal what teacher.py stored."""
    folder = os.path.dirname(os.path.abspath(head["_path"]))
    stored, now = head["identity"]["mix"], data.mix_identity(**data_args)
    diff = [k for k in sorted(now) if k != "files" and now[k] != stored.get(k)]
    diff += [f for f in sorted(now["files"]) if now["files"][f] != (stored.get("files") or {}).get(f)]
    if not diff and data.mix_digest({split_name: split})[split_name] != stored["content"].get(split_name):
        diff = [f"the {split_name} split's labels, types, severities, sources or images"]
    if diff:
        raise EvalError(f"{folder}: this teacher cache was built for another mix (differs in {', '.join(diff)}); "
                        "rebuild it with train.py on this data, or pass the --data-dir it was built from")


def load_baseline(path):
    if not os.path.isfile(path):
        raise EvalError(f"{path}: baseline JSON not found")
    try:
        with open(path) as f:
            base = json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: not a readable JSON file ({model_lib.first_line(e)})") from None
    if isinstance(base, list):
        if len(base) != 1:
            raise EvalError(f"{path}: holds {len(base)} results; a baseline must be one eval (one checkpoint)")
        base = base[0]
    if not isinstance(base, dict) or base.get("kind") != EVAL_KIND:
        raise EvalError(f"{path}: not a JSON written by eval.py --json (kind != {EVAL_KIND!r})")
    if not isinstance(base.get("corruption_errors"), dict) or base.get("clean_error") is None:
        raise EvalError(f"{path}: baseline lacks corruption_errors / clean_error")
    return base


def check_baseline(base, res, path):
    """A run and its --baseline must have seen the same images (the file paths may differ)."""
    ident = lambda r: ({"benchmark": r["benchmark"]} if r.get("benchmark") else {"split": r.get("split"),
                       "data_args": {k: v for k, v in (r.get("data_args") or {}).items() if k != "root"}})
    a, b = ident(res), ident(base)
    if a != b:
        diff = {k: (b.get(k), a.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        what = "; ".join(f"{k}: baseline {u} vs this run {v}" for k, (u, v) in sorted(diff.items()))
        raise EvalError(f"{path}: baseline was evaluated on other images ({what})")


# ----------------------------------------------------------------------------- 2. running a model

def _autocast(device):
    # bf16 autocast on CUDA (as in training); fp32 on CPU, where bf16 matmuls are slow
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def run_teacher(head, split_name, split, device, batch_size):
    """The fitted teacher head (seed 4.1) on the split: from the cached class-token features beside
    the head when they match the split, else DeiT-III on augment.teacher_view of the images."""
    path = head["_path"]
    W, b = head["weight"].float(), head["bias"].float()
    folder = os.path.dirname(os.path.abspath(path))
    feats = os.path.join(folder, f"features_{split_name}.pt")
    if os.path.isfile(feats):
        try:  # checked like train.py's reads: identity, labels and sources row for row
            f = teacher_lib.read_features(folder, head["identity"], split_name, split)["features"]
            if f.shape[1] != W.shape[1]:
                raise teacher_lib.CacheError(f"{feats}: {f.shape[1]} features, the head takes {W.shape[1]}")
            t0 = time.perf_counter()
            logits = f.float() @ W.T + b
            return {"combined": logits}, len(logits) / max(time.perf_counter() - t0, 1e-9), feats
        except teacher_lib.CacheMismatch as e:
            raise EvalError(str(e)) from None
        except teacher_lib.CacheError as e:  # a damaged file is recomputed, never trusted
            print(f"eval.py: ignoring {feats} ({e}); running the teacher", file=sys.stderr)
    try:
        net = model_lib.load_teacher(head["teacher_path"], num_classes=W.shape[0], **head.get("teacher_args", {}))
    except model_lib.ModelFileError as e:
        raise EvalError(f"{path}: {e}") from None
    net.head.weight.copy_(W)
    net.head.bias.copy_(b)
    net = net.to(device).eval()
    images, out = split["images"].to(device), []
    t0 = _now(device)
    for i in range(0, len(images), batch_size):
        x = augment.teacher_view(images[i:i + batch_size], size=net.cfg.img_size, mode=head["resize"])
        with _autocast(device):
            out.append(net(x).float().cpu())
    return {"combined": torch.cat(out)}, len(images) / max(_now(device) - t0, 1e-9), head["teacher_path"]


# ----------------------------------------------------------------------------- 3. metrics of one run

def add_mce(res, base, base_path):
    """Seed Eq. 10 against --baseline ("mCE vs ViT" when the baseline is the ViT), beside the headline mCE."""
    try:
        res["mce_vs_baseline"] = mce(res["corruption_errors"], base["corruption_errors"])
        why = relative_mce_undefined(base["corruption_errors"], base["clean_error"])
        res["relative_mce"] = None if why else relative_mce(res["corruption_errors"], res["clean_error"],
                                                            base["corruption_errors"], base["clean_error"])
        res["relative_mce_undefined"] = why  # printed as "undefined" with this reason, never a number
    except ValueError as e:
        raise EvalError(f"{base_path}: {e}") from None
    res["baseline"] = base_path
    res["baseline_run"] = f"{base.get('label') or base.get('model_name')} ({base.get('checkpoint')})"
    res["baseline_model"] = base.get("model_name")


# ----------------------------------------------------------------------------- 4. CIFAR-10-C benchmark

def run_benchmark(net, root, device, batch_size, extra=False, temps=None):
    """Hendrycks & Dietterich's protocol: clean CIFAR-10 test + every row of the real files (5
    severities x the test set) of the 15 benchmark corruptions, through run_student file by file,
    then summarize() over clean + 15 x 5 pooled. The 4 extra corruptions are reported on their own.
    accuracy = robustbench_accuracy = the mean over the 15 x 5 cells (RobustBench's number)."""
    cifar = data.read_cifar10(root)
    y = torch.from_numpy(cifar["test_labels"])
    n, names = len(y), ["clean"] + corruptions.CORRUPTIONS
    outs, book, per, done, t0 = {}, {"labels": [], "types": [], "severities": []}, {}, 0, time.perf_counter()
    for name in names + (EXTRA if extra else []):
        x = cifar["test_images"] if name == "clean" else data.read_cifar10c(root, name, cifar["test_labels"])[0]
        o, _ = run_student(net, torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(), device, batch_size)
        done, labels = done + len(x), y.repeat(len(x) // n)
        if name != "clean":  # rows (s-1)*n .. s*n are severity s
            per[name] = (o["combined"].argmax(-1) == labels).view(5, n).double().mean(1).tolist()
            print(f"  {name:<18} " + " ".join(f"{100 * a:6.2f}" for a in per[name]) +
                  f"   ({done / (time.perf_counter() - t0):,.0f} img/s)", flush=True)
        if name in names:
            for k, v in o.items():
                outs.setdefault(k, []).append(v)
            book["labels"].append(labels)
            book["types"].append(torch.full((len(x),), names.index(name)))
            book["severities"].append(torch.arange(len(x)) // n + (name != "clean"))
    ips = done / max(time.perf_counter() - t0, 1e-9)
    r = summarize({k: torch.cat(v) for k, v in outs.items()}, {k: torch.cat(v) for k, v in book.items()}, names)
    cells = lambda cs: float(np.mean([per[c] for c in cs]))  # equal-sized cells: the pooled accuracy too
    mean15 = cells(corruptions.CORRUPTIONS)
    r.update(n=n, clean_accuracy=r["per_type"]["clean"], accuracy=mean15, robustbench_accuracy=mean15,
             per_corruption=per, mean_accuracy_seen=cells(corruptions.SEEN),
             mean_accuracy_unseen=cells(corruptions.UNSEEN), robustbench_reference=ROBUSTBENCH_WRN28_10)
    if extra:
        r["mean_accuracy_extra"] = cells(EXTRA)
    if temps:  # calibration under the benchmark's shift, unseen corruptions included
        r["calibration_scaling"] = calibration_report({k: torch.cat(v) for k, v in outs.items()},
                                                      {k: torch.cat(v) for k, v in book.items()}, names, temps)
    return r, ips


def cosine_history(ck):
    """The val token cosines train.py logged per epoch (epoch 0 = the untrained model), so the
    seed's 4.4 start -> end values can be read from a checkpoint: [{epoch, cls_dist, cls_corr}]."""
    rows = ck.get("history") if isinstance(ck.get("history"), list) else []
    out = [{"epoch": h.get("epoch"), "cls_dist": h.get("val_cos_cls_dist"), "cls_corr": h.get("val_cos_cls_corr")}
           for h in rows if isinstance(h, dict)]
    return [h for h in out if h["cls_dist"] is not None or h["cls_corr"] is not None]


# ----------------------------------------------------------------------------- 5. output

def _num(v, digits=4, scale=1):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{scale * v:.{digits}f}"


def _pct(v, digits=2):
    return _num(v, digits, 100)


def _err(acc):
    return None if acc is None else 1.0 - acc


def _rel_mce(r, unit="%", why=True):
    """Relative mCE as printed: a percentage, or "undefined" with the reason (metrics.relative_mce_undefined)."""
    if r.get("relative_mce_undefined"):
        return "undefined" + (f" ({r['relative_mce_undefined']})" if why else "")
    return _pct(r["relative_mce"]) + (unit if r["relative_mce"] is not None else "")


# train.py flags that say how a run executed, not what it trained: never what tells two runs apart
NOT_RECIPE = {"out_dir", "resume", "environment", "device", "data_dir", "mirror", "log_interval", "compile", "fused",
              "amp", "teacher"}


def run_labels(results):
    """A label per result that tells runs apart: model/distillation, and where several results share
    that, the train.py flags in which they differ (up to 3), else their out-dir names; results that
    still tie (best.pt and ckpt.pt of one run) get their checkpoint path."""
    base = [f"{r['model_name']}/{r['distill'] or '-'}" if r["model_name"] != "deit3_small" else "teacher head"
            for r in results]
    out = list(base)
    for b in dict.fromkeys(base):
        idx = [i for i, x in enumerate(base) if x == b]
        if len(idx) < 2:
            continue
        cfgs = [results[i].get("train_config") or {} for i in idx]
        keys = sorted(k for k in set().union(*cfgs) if k not in NOT_RECIPE
                      and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in cfgs}) > 1)
        for i, c in zip(idx, cfgs):
            out[i] += " " + (" ".join(f"--{k.replace('_', '-')} {c.get(k)}" for k in keys) if 0 < len(keys) <= 3 else
                             os.path.basename(os.path.dirname(os.path.abspath(results[i]["checkpoint"]))))
    tied = {x for x in out if out.count(x) > 1}
    return [f"{x} ({r['checkpoint']})" if x in tied else x for x, r in zip(out, results)]


def _mce_vs(r):
    """The column name of Eq. 10's mCE: against the ViT (the thesis's baseline) or another model."""
    m = r.get("baseline_model")
    return "mCE vs ViT" if m == "vit" else f"mCE vs {m}" if m else "mCE vs base"


def _cosine_line(hist):
    """First and last epoch of the logged val cosines; the seed's 4.4 reports DeiT 0.10 -> 0.54 and
    CdeiT 0.13 -> 0.84 for (cls, dist), and 0.21 for CdeiT's (cls, corr) at the end."""
    keys = [k for k in ("cls_dist", "cls_corr") if any(h[k] is not None for h in hist)]
    at = lambda h: f"epoch {h['epoch']} " + "  ".join(f"cos(cls, {k[4:]}) {_num(h[k], 3)}" for k in keys)  # noqa: E731
    return "val token cosines in training (checkpoint history): " + at(hist[0]) + \
        (f"  ->  {at(hist[-1])}" if len(hist) > 1 else "")


def print_one(r):
    print(f"\n{r['checkpoint']}: {r['model_name']} (distill {r['distill'] or 'none'}), "
          f"{r['split']} split of data split {r['data_args'].get('split')!r}, {r['n']:,} images, "
          f"{r['images_per_s']:,.0f} img/s on {r['device']}")
    if r.get("benchmark"):
        print(f"  clean {_pct(r['clean_accuracy'])}%  CIFAR-10-C mean over 15 x 5: {_pct(r['accuracy'])}% "
              f"(RobustBench Standard WRN-28-10: {ROBUSTBENCH_WRN28_10}%)  error on the seen types "
              f"{_pct(r['seen_corruption_error'])}%  on the unseen types {_pct(r['unseen_corruption_error'])}%" +
              (f"  4 extra corruptions {_pct(r['mean_accuracy_extra'])}%" if "mean_accuracy_extra" in r else ""))
    print(f"  {'pooled ' if r.get('benchmark') else ''}accuracy {_pct(r['head_accuracy']['combined'])}%  "
          f"top-5 {_pct(r['top5'])}%  NLL {_num(r['nll'])} nats  ECE {_pct(r['ece'])}%  "
          f"clean error {_pct(r['clean_error'])}%")
    print(f"  mCE {_pct(r['mce'])}% (mean corruption error over {len(r['corruption_errors'])} corruptions x "
          "severities, the CIFAR-10-C convention)" + (
              f"  {_mce_vs(r)} {_pct(r['mce_vs_baseline'])}%  relative {_mce_vs(r)} {_rel_mce(r)} "
              f"(seed Eq. 10, baseline {r['baseline_run']})" if r["baseline"] else ""))
    extra = [f"final-layer cos(cls, {k[4:]}) {v:.3f}" for k, v in r["token_similarity"].items() if v is not None]
    if r["corruption_accuracy"] is not None:
        extra.append(f"corruption-token type accuracy {_pct(r['corruption_accuracy'])}%")
    print("  accuracy of each head alone: " + "  ".join(f"{k} {_pct(v)}%" for k, v in r["head_accuracy"].items()) +
          "".join(f"  | {e}" for e in extra))
    if r.get("token_similarity_history"):
        print("  " + _cosine_line(r["token_similarity_history"]))
    print(f"  {'type':<18}{'acc %':>7}{'err %':>7}   error % at severity 1..5")
    for t, a in r["per_type"].items():
        sev = "" if t == "clean" else " ".join(f"{_pct(e, 1):>5}" for e in r["corruption_errors"][t])
        print(f"  {t:<18}{_pct(a, 1):>7}{_pct(_err(a), 1):>7}   {sev}")
    print(f"  {'all corrupted':<32}" + " ".join(f"{_pct(_err(a), 1):>5}" for a in r["per_severity"].values()))
    if r["confusion_matrix"] is not None:
        short = [t.split("_")[0][:7] for t in data.TYPES]  # brightness -> brightn, gaussian_noise -> gaussia
        print("  corruption-token confusion (images): rows = true type, columns = predicted type")
        print(f"  {'':<18}" + " ".join(f"{c:>7}" for c in short))
        for t, row in zip(data.TYPES, r["confusion_matrix"]):
            print(f"  {t:<18}" + " ".join(f"{v:>7}" for v in row))


def print_table(results):
    """One side-by-side table, like the seed's Table 3 (model, distillation, accuracy, ECE, mCE).
    A column shows when some result has a value for it: clean % and C10-C % (mean over 15 x 5) for
    CIFAR-10-C results (--benchmark, standard split), acc % for the mix, seen / unseen corruption
    errors whenever a CIFAR-10-C result is in the table."""
    bench = any(r.get("benchmark") for r in results)
    labels = run_labels(results)
    vs = _mce_vs(next((r for r in results if r.get("baseline")), {}))
    mix = lambda k: (lambda r: None if r.get("benchmark") else r[k])  # noqa: E731
    spec = [("acc %", mix("accuracy"), _pct), ("clean %", "clean_accuracy", _pct),
            ("C10-C %", "robustbench_accuracy", _pct), ("top5 %", "top5", _pct), ("NLL", "nll", _num),
            ("ECE %", "ece", _pct), ("clean err %", "clean_error", _pct)]
    if bench:
        spec += [("seen err %", "seen_corruption_error", _pct), ("unseen err %", "unseen_corruption_error", _pct)]
    spec += [("mCE %", "mce", _pct), (f"{vs} %", "mce_vs_baseline", _pct),
             (f"rel {vs} %", lambda r: r, lambda r: _rel_mce(r, "", False)),
             ("type acc %", "corruption_accuracy", _pct),
             ("cos(cls,dist)", lambda r: r["token_similarity"]["cls_dist"], lambda v: _num(v, 3)),
             ("cos(cls,corr)", lambda r: r["token_similarity"]["cls_corr"], lambda v: _num(v, 3)),
             ("img/s", "images_per_s", lambda v: f"{v:,.0f}")]
    cols = [(c, [fmt(k(r) if callable(k) else r.get(k)) for r in results]) for c, k, fmt in spec]
    cols = [(c, v) for c, v in cols if c in ("mCE %", "img/s") or any(x != "-" for x in v)]
    cols = [("run", labels)] + cols
    w = [max(len(c), *map(len, v)) for c, v in cols]
    print(f"\n{'/'.join(sorted({r['split'] for r in results}))} split, {results[0]['device']}\n" +
          "  ".join(c.ljust(wi) if j == 0 else c.rjust(wi) for j, ((c, _), wi) in enumerate(zip(cols, w))))
    for i, r in enumerate(results):
        print("  ".join(v[i].ljust(wi) if j == 0 else v[i].rjust(wi) for j, ((_, v), wi) in enumerate(zip(cols, w)))
              + f"  {r['checkpoint']}")
    print("mCE: mean corruption error over the corruptions x severities (the CIFAR-10-C convention); "
          + (f"{vs}: seed Eq. 10 against {next(r['baseline_run'] for r in results if r.get('baseline'))}"
             if any(r.get("baseline") for r in results) else f"{vs}: needs --baseline (an eval.py --json of the ViT)"))
    for why in dict.fromkeys(r.get("relative_mce_undefined") for r in results if r.get("relative_mce_undefined")):
        print(f"relative mCE undefined: {why}")
    lw = max(14, *map(len, labels))
    print("\nerror % per type   " + "  ".join(f"{x:>{lw}}" for x in labels))  # seed 4.4
    for t in dict.fromkeys(t for r in results for t in r["per_type"]):
        print(f"{t:<18} " + "  ".join(f"{_pct(_err(r['per_type'].get(t))):>{lw}}" for r in results))
    print("accuracy % of each head alone")
    for h in ("cls", "dist", "cls_corr", "combined"):
        print(f"{h:<18} " + "  ".join(f"{_pct(r['head_accuracy'].get(h)):>{lw}}" for r in results))


def render_plot(results, f):
    """Reliability diagram + per-type error bars (every type of any result), one colour per result."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 2]})
    ax1.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    names = list(dict.fromkeys(t for r in results for t in r["per_type"]))
    width = 0.8 / len(results)
    labels = run_labels(results)
    for j, r in enumerate(results):
        cal = r["calibration"]
        ax1.plot(*zip(*[(c, a) for n, c, a in zip(cal["count"], cal["confidence"], cal["accuracy"]) if n > 0]),
                 "o-", label=f"{labels[j]} (ECE {100 * r['ece']:.2f}%)")
        errs = [math.nan if r["per_type"].get(t) is None else 1 - r["per_type"][t] for t in names]
        ax2.bar(np.arange(len(names)) + (j - (len(results) - 1) / 2) * width, errs, width, label=labels[j])
    ax1.set(xlabel="confidence (top-1 softmax)", ylabel="accuracy", title="reliability (15 bins)", xlim=(0, 1), ylim=(0, 1))
    ax2.set(ylabel="error", title=f"error per image type ({'/'.join(sorted({r['split'] for r in results}))})")
    ax2.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax1.legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _jsonable(v):
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ----------------------------------------------------------------------------- 6. after training

# Temperature scaling (Guo et al. 2017; metrics.fit_temperature): fitted on the val split by NLL,
# one global T for every student, and for CdeiT one per *predicted* corruption type (the token's
# argmax, so no label is needed at test time) with the global T for types the token assigns fewer
# than --min-type-images val images. Stored beside the checkpoint (model.temperature_path).

def fit_temperatures(net, r, args, device, mixes):
    """-> the temperatures sidecar dict for r's checkpoint, fitted on its mix's val split."""
    val = split_of(r, "val", args, mixes)
    outs, _ = run_student(net, val["images"], device, args.batch_size)
    z, y = outs["combined"].double(), val["labels"]
    T = fit_temperature(z, y)
    t = {"kind": model_lib.TEMPERATURE_KIND, "version": 1, "checkpoint": os.path.basename(r["checkpoint"]),
         "checkpoint_sha256": fileio.sha256_file(r["checkpoint"]), "fitted_on": "val", "n": len(y),
         "global": T, "per_type": None, "val_nll": {"none": nll(z, y), "global": nll(scale_logits(z, T), y)}}
    if "corr" in outs:
        pred_t = outs["corr"].argmax(-1)
        temps, counts, fitted = type_temperatures(z, y, pred_t, outs["corr"].shape[1], T, args.min_type_images)
        t.update(per_type=temps.tolist(), types=list(data.TYPES), val_counts=counts.tolist(), fitted=fitted.tolist(),
                 min_type_images=args.min_type_images)
        t["val_nll"]["per_type"] = nll(scale_logits(z, temps, pred_t), y)
    return t


def calibration_report(outs, split, names, temps):
    """NLL and ECE of the class logits unscaled, with the global T and (CdeiT) the per-type T:
    overall, on the corrupted images (type > 0), per true type and per (type, severity) cell.
    -> {"overall", "corrupted", "per_type", "cells"}."""
    z, y = outs["combined"].double(), split["labels"]
    variants = {"none": z, "global": scale_logits(z, temps["global"])}
    if temps.get("per_type") and "corr" in outs:
        variants["per_type"] = scale_logits(z, temps["per_type"], outs["corr"].argmax(-1))
    score = lambda m: {v: {"nll": nll(x[m], y[m]), "ece": expected_calibration_error(x[m], y[m])}  # noqa: E731
                       for v, x in variants.items()}
    types, sev = split["types"], split["severities"]
    rep = {"overall": score(torch.ones_like(y, dtype=torch.bool)), "corrupted": score(types > 0),
           "per_type": {}, "cells": []}
    for t, name in enumerate(names):
        if (types == t).any():
            rep["per_type"][name] = score(types == t)
        for s in sorted(set(sev[types == t].tolist())):
            m = (types == t) & (sev == s)
            rep["cells"].append({"type": name, "severity": s, "n": int(m.sum()), **score(m)})
    return rep


def print_calibration(r):
    rep, t = r["calibration_scaling"], r["temperatures"]
    vs = list(rep["overall"])
    per = "" if t.get("per_type") is None else "; per predicted type " + " ".join(
        f"{n} {v:.2f}{'' if f else '*'}" for n, v, f in zip(t["types"], t["per_type"], t["fitted"]))
    print(f"\n{r['checkpoint']}: temperature scaling fitted on val ({t['n']:,} images): global T {t['global']:.3f}{per}"
          + (" (* = global T: too few val images of that type, or a fit at the range's edge)" if t.get("per_type") else ""))
    print(f"  {'type':<18}{'sev':>4}{'n':>7}  " + "".join(f"{'NLL ' + v:>15}" for v in vs) +
          "".join(f"{'ECE ' + v:>15}" for v in vs))
    n = {k: sum(c["n"] for c in rep["cells"] if k == "all" or c["severity"]) for k in ("all", "corrupted")}
    rows = [("all", "", n["all"], rep["overall"]), ("all corrupted", "", n["corrupted"], rep["corrupted"])]
    for c in rep["cells"]:
        rows.append((c["type"], c["severity"] or "", c["n"], c))
    for name, s, n, sc in rows:
        print(f"  {name:<18}{s:>4}{n:>7}  " + "".join(f"{sc[v]['nll']:>15.4f}" for v in vs) +
              "".join(f"{sc[v]['ece']:>15.4f}" for v in vs))


def add_agreement(results, mixes, split_name):
    """Student vs teacher head on the same images (the teacher result is last): how often their
    predictions agree, per type and per (type, severity), and how the errors split: both right,
    only the student right, only the teacher right, both wrong with the same class (an error the
    student shares with its teacher), both wrong differently."""
    teacher = results[-1]
    same = lambda r: {k: v for k, v in r["data_args"].items() if k != "root"}  # noqa: E731
    for r in results[:-1]:
        if "_pred" not in r or same(r) != same(teacher):
            continue
        split = mixes[(json.dumps(r["data_args"], sort_keys=True), split_name)]
        s, t, y = r["_pred"], teacher["_pred"], split["labels"]
        types, sev = split["types"], split["severities"]

        def cell(m):
            n = int(m.sum())
            f = lambda c: float(c[m].double().mean()) if n else None  # noqa: E731
            return {"n": n, "agreement": f(s == t), "both_right": f((s == y) & (t == y)),
                    "student_only": f((s == y) & (t != y)), "teacher_only": f((s != y) & (t == y)),
                    "same_error": f((s != y) & (s == t)), "different_errors": f((s != y) & (t != y) & (s != t))}
        rep = {"teacher": teacher["checkpoint"], "overall": cell(torch.ones_like(y, dtype=torch.bool)),
               "per_type": {}, "cells": []}
        for k, name in enumerate(data.TYPES):
            if (types == k).any():
                rep["per_type"][name] = cell(types == k)
            for v in sorted(set(sev[types == k].tolist())):
                rep["cells"].append({"type": name, "severity": v, **cell((types == k) & (sev == v))})
        r["teacher_agreement"] = rep


def print_agreement(r):
    rep = r["teacher_agreement"]
    keys = ("agreement", "both_right", "student_only", "teacher_only", "same_error", "different_errors")
    print(f"\n{r['checkpoint']} vs the teacher head {rep['teacher']}: % of images (same_error: both wrong with "
          "the same class, an error the student shares)")
    print(f"  {'type':<18}{'sev':>4}{'n':>7}" + "".join(f"{k:>17}" for k in keys))
    for name, s, c in [("all", "", rep["overall"])] + [(c["type"], c["severity"] or "", c) for c in rep["cells"]]:
        print(f"  {name:<18}{s:>4}{c['n']:>7}" + "".join(f"{_pct(c[k]):>17}" for k in keys))


def robustbench_files(r, path):
    """RobustBench's model-info layout (their model_info/cifar10/corruptions/<name>.json: accuracies
    as percent strings with 2 decimals) at path, and the per corruption x severity accuracies in their
    unaggregated_results.csv layout (a header row of corruption names, one of severities 1..5, then
    one row: the model name and fractions) beside it. -> [(path, text, what)]."""
    name = os.path.splitext(os.path.basename(path))[0]
    info = {"link": None, "name": None, "authors": None,
            "additional_data": bool(r["distill"]),  # the distilled students learn from an ImageNet-22k teacher
            "number_forward_passes": 1, "dataset": "cifar10", "venue": None,
            "architecture": f"{r['model_name']} (DeiT-Tiny sizes, patch 4; cdeit-kit)", "eps": None,
            "clean_acc": f"{100 * r['clean_accuracy']:.2f}", "reported": None,
            "corruptions_acc": f"{100 * r['robustbench_accuracy']:.2f}"}
    cs = [c for c in ROBUSTBENCH_ORDER if c in r["per_corruption"]]
    rows = ["," + ",".join(c for c in cs for _ in range(5)), "," + ",".join(str(s) for _ in cs for s in range(1, 6)),
            name + "," + ",".join(f"{a:.4f}" for c in cs for a in r["per_corruption"][c])]
    csv_path = os.path.join(os.path.dirname(path), f"{name}_unaggregated_results.csv")
    return [(path, json.dumps(info, indent=2) + "\n", "RobustBench model info"),
            (csv_path, "\n".join(rows) + "\n", "RobustBench per corruption x severity accuracies")]


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
        fail("checkpoints", "(none)", "give at least one checkpoint (or --teacher HEAD.pt)")
    if args.extra and not args.benchmark:
        fail("--extra", "", "applies only with --benchmark cifar10c")
    if args.benchmark and args.teacher:
        fail("--teacher", args.teacher, "--benchmark evaluates students; the teacher head is evaluated on the mix only")
    if args.benchmark and args.split != "test":
        fail("--split", args.split, "--benchmark cifar10c is a test set; leave --split at test")
    if args.calibrate and args.split == "val":
        fail("--calibrate", "", "fits the temperatures on val; evaluate them on --split test (the default)")
    if args.calibrate and not args.checkpoints:
        fail("--calibrate", "", "needs a student checkpoint (the teacher head is not calibrated)")
    if args.robustbench and (not args.benchmark or len(args.checkpoints) != 1):
        fail("--robustbench", args.robustbench, "needs --benchmark cifar10c and exactly one checkpoint")
    if args.robustbench and not args.robustbench.endswith(".json"):
        fail("--robustbench", args.robustbench, "give a .json path (RobustBench's model-info file)")
    check_device("--device", args.device)
    check_existing_dir("--data-dir", args.data_dir)
    check_existing_file("--baseline", args.baseline)
    check_existing_file("--teacher", args.teacher)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (optional dependency, checked before any work)
        except ImportError:
            fail("--plot", args.plot, "needs matplotlib, not installed (pip install -r requirements-plot.txt)")
    for flag, out in (("--json", args.json), ("--plot", args.plot), ("--robustbench", args.robustbench)):
        if out:  # fail before the work, not after it
            check_writable_file(flag, out)


def load_jobs(args, device):
    """Every checkpoint, the teacher head and the baseline, loaded and checked before any work.
    Returns ([(result skeleton, model or head)] in command-line order, the teacher last; baseline)."""
    jobs = []
    for path in args.checkpoints:
        net, ck = model_lib.load_student(path, {teacher_lib.HEAD_KIND: "; pass a teacher head with --teacher"})
        cfg = ck.get("config") if isinstance(ck.get("config"), dict) else {}
        jobs.append(({"checkpoint": path, "model_name": ck["model_name"], "model_args": ck["model_args"],
                      "distill": cfg.get("distill"), "dataset": ck.get("dataset"), "epoch": ck.get("epoch"),
                      "data_args": dict(ck["data_args"]), "token_similarity_history": cosine_history(ck),
                      "train_config": {k: v for k, v in cfg.items() if k != "environment"}}, net))
    if args.teacher:
        head = load_head(args.teacher)
        head["_path"] = args.teacher
        jobs.append(({"checkpoint": args.teacher, "model_name": "deit3_small", "model_args": head.get("teacher_args", {}),
                      "distill": None, "dataset": None, "epoch": None, "data_args": dict(head["data_args"])}, head))
    base = load_baseline(args.baseline) if args.baseline else None
    for r, obj in jobs:
        if not isinstance(obj, dict) and not args.calibrate:  # temperatures stored by an earlier --calibrate
            types = obj.cfg.num_types if obj.head_corr is not None else None
            r["temperatures"] = model_lib.load_temperatures(r["checkpoint"], types)
        if args.data_dir:
            r["data_args"]["root"] = args.data_dir
        root = r["data_args"].get("root")
        if root is not None and not os.path.isdir(root):  # a moved data folder: say where we looked
            raise EvalError(f"{r['checkpoint']}: its data folder {root} " + (
                "(--data-dir) does not exist" if args.data_dir else
                "(recorded by train.py) does not exist; moved? pass --data-dir with the folder it was trained on"))
        # a standard-split student's test set is CIFAR-10-C itself: the benchmark's images and code
        standard = r["data_args"].get("split") == "standard" and args.split == "test" and not isinstance(obj, dict)
        r.update(kind=EVAL_KIND, version=1, split="cifar10c" if args.benchmark else args.split,
                 benchmark=args.benchmark or ("cifar10c" if standard else None), device=str(device), baseline=None)
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
            where = "--data-dir" if args.data_dir else "the one train.py recorded; --data-dir sets another"
            raise EvalError(f"{e} (eval.py read the data folder {r['data_args']['root']}: {where})") from None
        except (TypeError, ValueError) as e:
            raise EvalError(f"{r['checkpoint']}: data_args {r['data_args']} do not build a mix ({e})") from None
        for kept in {name, args.split} | ({"val"} if args.calibrate else set()):
            mixes[(key, kept)] = mix[kept]
    return mixes[(key, name)]


def evaluate_one(r, obj, args, device, mixes):
    """The metrics of one student (or the teacher head) and its images/s; the split evaluated
    comes from mixes (split_of)."""
    if r["benchmark"]:
        if r["data_args"].get("split") in ("paper", "grouped"):  # "standard" trains on CIFAR-10 train only
            print(f"eval.py: warning: {r['checkpoint']} was trained on the {r['data_args']['split']!r} mix, whose "
                  "corrupted images come from CIFAR-10-C itself: these benchmark images are NOT held out",
                  file=sys.stderr)
        print(f"{r['checkpoint']}: CIFAR-10-C accuracy % per severity 1..5")
        return run_benchmark(obj, r["data_args"]["root"], device, args.batch_size, args.extra, r.get("temperatures"))
    split = split_of(r, args.split, args, mixes)
    if isinstance(obj, dict):
        check_head_mix(obj, r["data_args"], args.split, split)
        outs, ips, src = run_teacher(obj, args.split, split, device, args.batch_size)
        r["teacher_source"] = src
    else:
        outs, ips = run_student(obj, split["images"], device, args.batch_size)
    m = summarize(outs, split)
    if r.get("temperatures"):
        m["calibration_scaling"] = calibration_report(outs, split, data.TYPES, r["temperatures"])
    r["_pred"] = outs["combined"].argmax(-1)  # for add_agreement, dropped before output
    return m, ips


def evaluate(args):
    device = _device(args.device)
    jobs, base = load_jobs(args, device)
    results, mixes = [], {}
    for r, obj in jobs:
        if args.calibrate and not isinstance(obj, dict):
            r["temperatures"], r["_fitted"] = fit_temperatures(obj, r, args, device, mixes), True
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


def main(argv=None):
    p = Parser(prog="eval.py", description="Evaluate cdeit-kit checkpoints (seed 3.5, 4.4).")
    p.add_argument("checkpoints", nargs="*", help="student checkpoints (train.py's ckpt.pt / best.pt)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="which split of the checkpoint's mix")
    p.add_argument("--json", help="write the results here (one dict, or a list for several checkpoints)")
    p.add_argument("--baseline", help="an earlier eval.py --json of the baseline (the ViT): mCE vs ViT (seed Eq. 10)")
    p.add_argument("--plot", help="reliability diagram + per-type errors as a PNG (needs matplotlib)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="images per forward pass")
    p.add_argument("--benchmark", choices=["cifar10c"], help="the standard CIFAR-10-C protocol (15 x 5)")
    p.add_argument("--extra", action="store_true", help="with --benchmark: also the 4 extra corruptions")
    p.add_argument("--teacher", help="a fitted teacher head file (teacher_head.pt), evaluated on the same split")
    p.add_argument("--data-dir", help="data folder, if not where the checkpoint was trained")
    p.add_argument("--calibrate", action="store_true",
                   help="fit temperature scaling on val (global; CdeiT also per predicted corruption type), report "
                        "NLL / ECE before and after, store it beside each checkpoint as CKPT.temperatures.json")
    p.add_argument("--min-type-images", type=positive_int, default=50,
                   help="with --calibrate: fewest val images of a predicted type to fit its own temperature (else global)")
    p.add_argument("--robustbench", metavar="FILE.json",
                   help="with --benchmark cifar10c: write RobustBench's model-info JSON here and the per corruption x "
                        "severity accuracies beside it (FILE_unaggregated_results.csv)")
    args = p.parse_args(argv)  # a bad value: one line from cli.Parser, exit 2
    try:
        check_options(args)
    except FlagError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            results = evaluate(args)
        except torch.OutOfMemoryError:
            raise EvalError(f"out of GPU memory at --batch-size {args.batch_size} (images per step): use a smaller "
                            f"--batch-size, e.g. --batch-size {max(1, args.batch_size // 2)}") from None
        fitted = [r for r in results if r.pop("_fitted", False)]  # --calibrate: sidecars to write
        print_one(results[0]) if len(results) == 1 else print_table(results)  # several: side by side
        if args.benchmark:
            print(f"\nreference: RobustBench CIFAR-10-C, Standard WRN-28-10, mean accuracy {ROBUSTBENCH_WRN28_10}%")
        for r in results:
            print_calibration(r) if r.get("calibration_scaling") else None
            print_agreement(r) if r.get("teacher_agreement") else None
        # outputs only now that everything succeeded: both rendered in memory first, then each written atomically
        outputs = []
        if args.plot:
            buf = io.BytesIO()
            render_plot(results, buf)
            outputs.append((args.plot, buf.getvalue(), "plot"))
        if args.json:
            blob = _jsonable(results[0] if len(results) == 1 else results)
            outputs.append((args.json, json.dumps(blob, indent=1, allow_nan=False), "results JSON"))
        if args.robustbench:
            outputs += robustbench_files(results[0], args.robustbench)
        for r in fitted:  # beside the checkpoint; the weights file itself is never rewritten
            outputs.append((model_lib.temperature_path(r["checkpoint"]), json.dumps(r["temperatures"], indent=1),
                            "temperatures"))
        for path, content, what in outputs:
            fileio.atomic_write(path, content, what)
            print(f"wrote {path}")
        return 0
    except (EvalError, download.DataError, model_lib.ModelFileError, OSError) as e:  # OSError: fileio.WriteError
        print("eval.py: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
