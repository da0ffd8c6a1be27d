"""Reproduce the seed thesis's tables and figures with one command: several seeds, mean +- std
beside the published numbers.

    python reproduce.py table3 --seeds 0 1 2                     # this machine, one run at a time
    python reproduce.py all --seeds 0 1 2 --gpus 0,1,2,3         # one run per GPU at once
    python reproduce.py table3 --nproc-per-node 8                # each run under torchrun
    python reproduce.py table3 --slurm table3.sbatch             # write a job array, run nothing
    python reproduce.py table3 --dry-run                         # print the exact commands
    python reproduce.py table3 --dataset synthetic --device cpu -- --epochs 2   # after --: to every train.py

A driver: each (configuration, seed) is one `train.py` run in its own folder
<out>/runs/<split>[-synthetic]/<config>-s<seed> (its output in train.log there), then `eval.py --json`
on its best.pt (eval.json, eval.log). It reads only their files: config.json, ckpt.pt's epoch,
summary.csv, the eval JSONs. A finished run (ckpt.pt at its last epoch) is skipped, an interrupted
one continued with --resume, an evaluation redone only when older than its checkpoint: after a
crash or a preemption, run the same command again. A configuration shared by two experiments
(Table 4's best row is Table 3's DeiT hard) is one set of runs.

Results: <out>/<experiment>.md and .json (e.g. results/table3.md), one row per configuration with
mean +- std over seeds (the sample std, n - 1) and n, the thesis's value beside it with the
difference, the per-run numbers and what each run ran on; runs of one configuration whose config.json differ in anything but the seed
are refused. mCE is the CIFAR-10-C papers' mean corruption error over corruptions x severities
(eval.py's, no baseline model), the thesis's mCE values beside it; "mCE vs ViT" (seed Eq. 10) is
computed here from the eval JSONs with metrics.py, against the ViT run of the same seed and split.
Plots need matplotlib (requirements-plot.txt).
"""
import argparse
import csv
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

from cli import (FlagError, Parser, check_device, check_writable_dir, check_writable_file, fail, gpu_list, positive_int,
                 seed_int)
from fileio import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN, EVAL = os.path.join(HERE, "train.py"), os.path.join(HERE, "eval.py")

# Every configuration as flags changed from train.py's defaults (the thesis's Table 1 / Table 4 best row).
# CutMix: the thesis gives no probability, only that CutMix hurts "even at low application
# probabilities" (4.2); we use the Mixup probability of its Table 1 (0.3).
CUTMIX_PROB = 0.3
CONFIGS = {
    "vit-none": ["--model", "vit", "--distill", "none"],
    "deit-hard": ["--model", "deit", "--distill", "hard"],
    "deit-soft": ["--model", "deit", "--distill", "soft"],
    "cdeit-hard": ["--model", "cdeit", "--distill", "hard"],  # strategy 2, the thesis's choice (4.3)
    "cdeit-soft": ["--model", "cdeit", "--distill", "soft"],
    "cdeit-hard-strategy1": ["--model", "cdeit", "--distill", "hard", "--strategy", "1"],
    "cdeit-hard-strategy3": ["--model", "cdeit", "--distill", "hard", "--strategy", "3"],
    "deit-hard-wd0.01": ["--model", "deit", "--distill", "hard", "--weight-decay", "0.01"],
    "deit-hard-lr3e-4": ["--model", "deit", "--distill", "hard", "--lr", "3e-4"],
    "deit-hard-lr3e-4-wd0.01": ["--model", "deit", "--distill", "hard", "--lr", "3e-4", "--weight-decay", "0.01"],
    "deit-hard-sgd": ["--model", "deit", "--distill", "hard", "--opt", "sgd"],
    "deit-hard-randaug": ["--model", "deit", "--distill", "hard", "--randaug", "9"],
    "deit-hard-no-mixup": ["--model", "deit", "--distill", "hard", "--mixup-prob", "0"],
    "deit-hard-cutmix": ["--model", "deit", "--distill", "hard", "--cutmix-prob", str(CUTMIX_PROB)],
    "deit-hard-no-erasing": ["--model", "deit", "--distill", "hard", "--erase-prob", "0"],
    "deit-hard-dropout": ["--model", "deit", "--distill", "hard", "--drop", "0.1"],
    "deit-hard-no-drop-path": ["--model", "deit", "--distill", "hard", "--drop-path", "0"],
}
TABLE3 = ["vit-none", "deit-hard", "deit-soft", "cdeit-hard", "cdeit-soft"]
# configs, forced split (None: --split), metrics of the results table, mCE baseline config
EXPERIMENTS = {
    "teacher": dict(title="the teacher's refitted head (thesis 4.1)", configs=["deit-hard"], split=None,
                    metrics=["teacher_val_accuracy", "teacher_test_accuracy"], baseline=None),
    "table2": dict(title="learning rate x weight decay for DeiT (thesis Table 2)",
                   configs=["deit-hard", "deit-hard-wd0.01", "deit-hard-lr3e-4", "deit-hard-lr3e-4-wd0.01"],
                   split=None, metrics=["accuracy", "ece"], baseline=None),
    "table3": dict(title="ViT, DeiT and CdeiT with hard and soft distillation (thesis Table 3)", configs=TABLE3,
                   split=None, metrics=["accuracy", "ece", "nll", "clean_error", "mce", "mce_vs_baseline",
                                        "relative_mce"], baseline="vit-none"),
    "table4": dict(title="augmentation and regularisation ablations, each a change from DeiT's best row "
                         "(thesis Table 4)",
                   configs=["deit-hard", "deit-hard-sgd", "deit-hard-randaug", "deit-hard-no-mixup", "deit-hard-cutmix",
                            "deit-hard-no-erasing", "deit-hard-dropout", "deit-hard-no-drop-path"],
                   split=None, metrics=["accuracy", "ece"], baseline=None),
    "fig5": dict(title="CdeiT's inference strategies 1 / 2 / 3 (thesis Fig. 5)",
                 configs=["vit-none", "cdeit-hard-strategy1", "cdeit-hard", "cdeit-hard-strategy3"],
                 split=None, metrics=["accuracy", "mce", "mce_vs_baseline"], baseline="vit-none"),
    "robustness": dict(title="the standard protocol: CIFAR-10 train, tested on CIFAR-10-C 15 x 5", configs=TABLE3,
                       split="standard", metrics=["clean_accuracy", "robustbench_accuracy", "seen_corruption_error",
                                                  "unseen_corruption_error", "mce", "mce_vs_baseline"],
                       baseline="vit-none"),
}
# metric -> (column, scale to the printed unit). mce: the CIFAR-10-C convention, the unnormalised mean
# corruption error (eval.py's mean_corruption_error); mce_vs_baseline: seed Eq. 10 against the ViT.
METRICS = {"accuracy": ("acc %", 100), "ece": ("ECE (0-1)", 1), "nll": ("NLL (nats)", 1),
           "clean_error": ("clean err %", 100), "mean_corruption_error": ("corr err %", 100), "mce": ("mCE %", 100),
           "mce_vs_baseline": ("mCE vs ViT %", 100), "relative_mce": ("rel mCE vs ViT %", 100),
           "clean_accuracy": ("clean acc %", 100), "robustbench_accuracy": ("C10-C acc %", 100),
           "seen_corruption_error": ("seen err %", 100), "unseen_corruption_error": ("unseen err %", 100),
           "teacher_val_accuracy": ("val acc %", 100), "teacher_test_accuracy": ("test acc %", 100)}

# The published numbers, in the unit the source prints, and where each comes from. Nothing else here
# is a thesis number. Table 4's data-augmentation rows are garbled in the text we have: we read them
# as RandAugment 96.7, no Mixup 96.3, CutMix 95.5; its fourth row (95.7) cannot be attributed.
THESIS = [
    # (experiment, config, metric, value, std or None, source)
    ("teacher", "deit-hard", "teacher_test_accuracy", 87.4, None, "thesis 4.1"),
    ("table2", "deit-hard", "accuracy", 96.7, None, "thesis Table 2"),
    ("table2", "deit-hard-wd0.01", "accuracy", 96.4, None, "thesis Table 2"),
    ("table2", "deit-hard-lr3e-4", "accuracy", 96.2, None, "thesis Table 2"),
    ("table2", "deit-hard-lr3e-4-wd0.01", "accuracy", 96.3, None, "thesis Table 2"),
    ("table3", "vit-none", "accuracy", 96.4, 0.1, "thesis 4 (baseline)"),
    ("table3", "vit-none", "ece", 0.0002, None, "thesis 4 (baseline; its per-batch ECE)"),
    ("table3", "vit-none", "nll", 0.36, None, "thesis 4 (baseline)"),
    ("table3", "deit-hard", "accuracy", 96.7, None, "thesis Table 3"),
    ("table3", "deit-hard", "mce", 1.93, None, "thesis Table 3"),
    ("table3", "deit-soft", "accuracy", 97.0, None, "thesis Table 3"),
    ("table3", "deit-soft", "mce", 0.46, None, "thesis Table 3"),
    ("table3", "cdeit-hard", "accuracy", 97.5, None, "thesis Table 3"),
    ("table3", "cdeit-hard", "mce", 2.10, None, "thesis Table 3"),
    ("table3", "cdeit-soft", "accuracy", 96.7, None, "thesis Table 3"),
    ("table3", "cdeit-soft", "mce", 2.94, None, "thesis Table 3"),
    ("table4", "deit-hard", "accuracy", 96.7, 0.2, "thesis Table 4"),
    ("table4", "deit-hard-sgd", "accuracy", 23.0, None, "thesis Table 4"),
    ("table4", "deit-hard-randaug", "accuracy", 96.7, None, "thesis Table 4 (row read from garbled text)"),
    ("table4", "deit-hard-no-mixup", "accuracy", 96.3, None, "thesis Table 4 (row read from garbled text)"),
    ("table4", "deit-hard-cutmix", "accuracy", 95.5, None, "thesis Table 4 (row read from garbled text)"),
    ("table4", "deit-hard-no-erasing", "accuracy", 95.2, None, "thesis Table 4"),
    ("table4", "deit-hard-dropout", "accuracy", 96.5, None, "thesis Table 4"),
    ("table4", "deit-hard-no-drop-path", "accuracy", 96.2, None, "thesis Table 4"),
    ("fig5", "cdeit-hard", "accuracy", 97.5, 0.3, "thesis 4.3 (Fig. 5's strategy 2)"),
]
# RobustBench's CIFAR-10-C leaderboard (mean accuracy over 15 x 5), the rows the robustness table cites,
# each with its architecture (AugMix has two entries)
ROBUSTBENCH = [("Standard, WideResNet-28-10", 73.46), ("AugMix, WideResNet-40-2", 88.82),
               ("AugMix, ResNeXt29_32x4d", 89.09), ("PRIME, ResNet-18", 89.05)]
# config.json keys that may differ between the seeds of one configuration
NOT_CONFIG = {"seed", "out_dir", "resume", "environment", "device", "data_dir", "mirror", "log_interval"}


class ReproduceError(RuntimeError):
    """A bad option or an unusable run folder; printed as one line."""


def say(msg):
    print(f"[reproduce] {msg}", flush=True)


# ----------------------------------------------------------------------------- runs and their files

def plan(args):
    """-> list of runs (dicts), each (configuration, split, seed) once, in experiment order."""
    runs, seen = [], {}
    for exp in (list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]):
        e = EXPERIMENTS[exp]
        split = e["split"] or args.split
        for name in e["configs"]:
            for seed in args.seeds:
                key = (name, split, seed)
                if key not in seen:
                    tag = f"{split}-synthetic" if args.dataset == "synthetic" else split
                    flags = CONFIGS[name] + ["--split", split, "--seed", str(seed)] + \
                        (["--dataset", args.dataset] if args.dataset else []) + args.extra
                    label = f"{name} s{seed}" + ("" if split == args.split else f" [{split}]")
                    seen[key] = dict(config=name, split=split, seed=seed, flags=flags, teacher=False, label=label,
                                     dir=os.path.join(args.out, "runs", tag, f"{name}-s{seed}"))
                    runs.append(seen[key])
                seen[key]["teacher"] |= exp == "teacher"
    return runs


def train_cmd(run, args, resume=False):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={args.nproc_per_node}"] if args.nproc_per_node else [sys.executable]
    common = (["--device", args.device] if args.device else []) + (["--data-dir", args.data_dir] if args.data_dir else [])
    return launch + [TRAIN] + run["flags"] + ["--out-dir", run["dir"]] + common + (["--resume"] if resume else [])


def eval_cmds(run, args, head=None):
    """eval.py on best.pt; for the teacher experiment also the fitted head on val and test."""
    # no --data-dir: the checkpoint records the absolute data root train.py used
    dev = ["--device", args.device] if args.device else []
    cmds = [[sys.executable, EVAL, os.path.join(run["dir"], "best.pt"), "--json",
             os.path.join(run["dir"], "eval.json")] + dev]
    if run["teacher"]:
        head = head or "TEACHER_HEAD_RECORDED_IN_BEST_PT"
        cmds += [[sys.executable, EVAL, "--teacher", head, "--split", s, "--json",
                  os.path.join(run["dir"], f"teacher-{s}.json")] + dev for s in ("val", "test")]
    return cmds


def _mtime(path):
    return os.path.getmtime(path) if os.path.exists(path) else None


def _eval_outputs(run):
    return ["eval.json"] + (["teacher-val.json", "teacher-test.json"] if run["teacher"] else [])


def state(run):
    """-> "done" (trained and evaluated), "trained" (to evaluate), "partial" (to resume), "new"."""
    ck = os.path.join(run["dir"], "ckpt.pt")
    cmd_file = os.path.join(run["dir"], "command.json")
    if os.path.exists(cmd_file):
        with open(cmd_file) as f:
            old = json.load(f)["flags"]
        if old != run["flags"]:
            raise ReproduceError(f"{run['dir']} holds a run of other train.py flags ({shlex.join(old)}); "
                                 "use another --out or delete it")
    t_ck = _mtime(ck)
    if t_ck is None:
        return "new"
    t_best = _mtime(os.path.join(run["dir"], "best.pt")) or t_ck
    evals = [_mtime(os.path.join(run["dir"], n)) for n in _eval_outputs(run)]
    if all(t is not None and t >= max(t_ck, t_best) for t in evals):
        return "done"  # an evaluation only follows a finished training, so no need to open the checkpoint
    epoch, epochs = checkpoint_epoch(ck)
    return "trained" if epoch >= epochs else "partial"


def checkpoint_epoch(path):
    import torch
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        return ck["epoch"], ck["config"]["epochs"]
    except Exception as e:  # a damaged checkpoint: train.py --resume will say what is wrong with it
        say(f"warning: cannot read {path} ({type(e).__name__}); trying --resume")
        return 0, 1


def teacher_head(run):
    import torch
    ck = torch.load(os.path.join(run["dir"], "best.pt"), map_location="cpu", weights_only=True)
    return ck["teacher"]["head"]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ReproduceError(f"{path}: unreadable ({e})") from None


# ----------------------------------------------------------------------------- running

STOP = {"sig": None}


def _on_signal(signum, frame):
    STOP["sig"] = signum


class Job:
    """One run's remaining commands (train and/or evals), run one after another in one slot."""

    def __init__(self, run, st, args, index):
        self.run, self.st, self.args, self.index = run, st, args, index
        self.proc, self.log, self.phase, self.t0 = None, None, None, None
        self.cmds = []
        if st in ("new", "partial"):
            self.cmds.append(("train", train_cmd(run, args, resume=st == "partial")))
        self.cmds.append(("eval", None))  # built after training: the teacher head is in best.pt

    def start_next(self, env):
        phase, cmd = self.cmds.pop(0)
        if phase == "train":
            atomic_write(os.path.join(self.run["dir"], "command.json"),
                         json.dumps({"flags": self.run["flags"], "command": cmd}, indent=1) + "\n", what="run command")
            seq = [cmd]
        else:
            seq = eval_cmds(self.run, self.args, teacher_head(self.run) if self.run["teacher"] else None)
        self.phase, self.queue, self.env = phase, seq, env
        self._spawn()

    def _spawn(self):
        cmd = self.queue.pop(0)
        if self.log:
            self.log.close()
        self.log = open(os.path.join(self.run["dir"], f"{self.phase}.log"), "a")
        self.log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)

    def poll(self):
        """-> None while running, else (finished: bool, message)."""
        rc = self.proc.poll()
        if rc is None:
            return None
        if rc == 0 and self.queue:
            self._spawn()
            return None
        log = os.path.join(self.run["dir"], f"{self.phase}.log")
        if rc != 0:
            return False, f"{self.phase} failed (exit {rc}): {_last_line(log)} (log: {log})"
        if self.phase == "train":
            epoch, epochs = checkpoint_epoch(os.path.join(self.run["dir"], "ckpt.pt"))
            if epoch < epochs:
                return False, f"training stopped at epoch {epoch} of {epochs}: {_last_line(log)}"
        if self.cmds:
            self.start_next(self.env)
            return None
        self.log.close()
        return True, ""


def _last_line(path):
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def key_numbers(run):
    r = os.path.join(run["dir"], "eval.json")
    if not os.path.exists(r):
        return ""
    e = read_json(r)
    acc = e.get("robustbench_accuracy") or e.get("accuracy")
    val = None
    hist = read_summary(run)
    trained = [float(h["val_accuracy"]) for h in hist if int(h["epoch"]) > 0 and h.get("val_accuracy")]
    if trained:  # row 0 is the untrained model; best.pt is chosen from epoch 1 on
        val = max(trained)
    return (f"val {100 * val:.2f}%, " if val is not None else "") + \
        f"test {100 * acc:.2f}%, ECE {100 * e.get('ece', math.nan):.2f}%"


def execute(runs, args, only=None):
    """Run what is missing (of run `only`, if given): one at a time, or one per GPU at once.
    -> list of failure messages."""
    todo = []
    for i, run in enumerate(runs):
        if only is not None and i != only:
            continue
        st = state(run)
        if st == "done":
            say(f"{i + 1}/{len(runs)} skip {run['label']}: finished and evaluated ({run['dir']})")
        else:
            todo.append((i, run, st))
    if not todo:
        say("nothing to run")
        return []
    slots = [g.strip() for g in args.gpus.split(",")] if args.gpus else [None]
    free, jobs, failed, durations = list(slots), {}, [], []
    # seeds whose teacher cache exists (a distilled run got as far as a checkpoint): until then the
    # first run that builds it runs alone, so parallel runs never build one cache twice at once
    warm = {r["seed"] for r in runs if not r["config"].startswith("vit")
            and os.path.exists(os.path.join(r["dir"], "ckpt.pt"))}
    # nothing on disk yet: the first run fetches or writes the data alone
    data_ready = any(os.path.exists(os.path.join(r["dir"], "ckpt.pt")) for r in runs)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    pending, left = list(todo), len(todo)
    try:
        while pending or jobs:
            if STOP["sig"]:
                break
            while free and pending and (data_ready or not jobs):
                building = {j.run["seed"] for j in jobs.values() if j.phase == "train"
                            and not j.run["config"].startswith("vit")}
                pick = next((p for p in pending if p[1]["config"].startswith("vit") or p[1]["seed"] in warm
                             or p[1]["seed"] not in building), None)
                if pick is None:
                    break
                pending.remove(pick)
                i, run, st = pick
                slot = free.pop(0)
                env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
                job = Job(run, st, args, i)
                job.t0 = time.time()
                job.start_next(env)
                what = {"new": "train + eval", "partial": "resume with --resume + eval", "trained": "eval"}[st]
                say(f"{i + 1}/{len(runs)} started {run['label']} ({what})"
                    + (f" on GPU {slot}" if slot is not None else "") + f" -> {run['dir']}")
                job.slot, jobs[i] = slot, job  # keyed by run: --gpus 0,0 gives GPU 0 two runs at once
            time.sleep(0.1)
            for key, job in list(jobs.items()):
                res = job.poll()
                if res is None:
                    continue
                ok, msg = res
                del jobs[key]
                free.append(job.slot)
                left -= 1
                run = job.run
                if ok:
                    data_ready = True
                    durations.append(time.time() - job.t0)
                    if not run["config"].startswith("vit"):
                        warm.add(run["seed"])
                    eta = statistics.mean(durations) * left / len(slots)
                    say(f"{job.index + 1}/{len(runs)} finished {run['label']} in "
                        f"{time.time() - job.t0:.1f}s: {key_numbers(run)} | {left} remain, ETA {eta / 60:.1f} min")
                elif not STOP["sig"]:
                    failed.append(f"{run['label']}: {msg}")
                    say(f"{job.index + 1}/{len(runs)} FAILED {run['label']}: {msg} | {left} remain")
        if STOP["sig"]:
            for job in jobs.values():  # train.py saves where it is on SIGTERM; eval.py just stops
                if job.proc.poll() is None:
                    job.proc.send_signal(signal.SIGTERM)
            for job in jobs.values():
                job.proc.wait()
            say(f"stopped by {signal.Signals(STOP['sig']).name}: run the same command again to continue")
            raise SystemExit(128 + STOP["sig"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return failed


# ----------------------------------------------------------------------------- results

def read_summary(run):
    path = os.path.join(run["dir"], "summary.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def config_of(run):
    path = os.path.join(run["dir"], "config.json")
    return read_json(path) if os.path.exists(path) else {}


def mce_against(res, base, base_dir):
    """seed Eq. 10 from two eval JSONs (metrics.py), refused when they saw other images."""
    from metrics import mce, relative_mce, relative_mce_undefined
    ident = lambda r: (r.get("benchmark"), r.get("split"), {k: v for k, v in (r.get("data_args") or {}).items()
                                                            if k != "root"})
    a, b = ident(res), ident(base)
    if (a[0], a[1]) != (b[0], b[1]) or (not a[0] and a[2] != b[2]):
        raise ReproduceError(f"{base_dir}: the mCE baseline was evaluated on other images than {res.get('checkpoint')}")
    why = relative_mce_undefined(base["corruption_errors"], base["clean_error"])
    rel = None if why else relative_mce(res["corruption_errors"], res["clean_error"], base["corruption_errors"],
                                        base["clean_error"])
    return mce(res["corruption_errors"], base["corruption_errors"]), rel, why


def collect(exp, runs, split):
    """Per-run numbers of one experiment from the runs' files (only runs that finished evaluation)."""
    e = EXPERIMENTS[exp]
    out = []
    for run in (r for r in runs if r["config"] in e["configs"] and r["split"] == (e["split"] or split)):
        path = os.path.join(run["dir"], "eval.json")
        if not os.path.exists(path):
            continue
        res = read_json(path)
        vals = {m: res.get(m) for m in e["metrics"] if m in res}
        if "mce" in e["metrics"]:  # the headline mCE is the mean corruption error, in every eval.json
            vals["mce"] = res.get("mean_corruption_error")
        rec = dict(config=run["config"], seed=run["seed"], dir=run["dir"], eval=path, values=vals,
                   environment=config_of(run).get("environment"), mce_baseline=None, relative_mce_undefined=None)
        if exp == "teacher":
            for s in ("val", "test"):
                p = os.path.join(run["dir"], f"teacher-{s}.json")
                if os.path.exists(p):
                    vals[f"teacher_{s}_accuracy"] = read_json(p).get("accuracy")
        if e["baseline"] and ("mce_vs_baseline" in e["metrics"] or "relative_mce" in e["metrics"]):
            base = next((r for r in runs if r["config"] == e["baseline"] and r["seed"] == run["seed"]
                         and r["split"] == run["split"]), None)
            bpath = base and os.path.join(base["dir"], "eval.json")
            if bpath and os.path.exists(bpath):
                m, rel, why = mce_against(res, read_json(bpath), base["dir"])
                vals["mce_vs_baseline"] = m
                if "relative_mce" in e["metrics"]:
                    vals["relative_mce"] = rel
                rec["mce_baseline"], rec["relative_mce_undefined"] = bpath, why
        rec["summary"] = read_summary(run)
        out.append(rec)
    return out


def check_same_config(recs, runs):
    """Refuse to average runs whose train.py configuration differs in anything but the seed."""
    by_dir = {r["dir"]: r for r in runs}
    ref = {}
    for rec in recs:
        cfg = {k: v for k, v in config_of(by_dir[rec["dir"]]).items() if k not in NOT_CONFIG}
        if rec["config"] not in ref:
            ref[rec["config"]] = (rec["dir"], cfg)
            continue
        d0, c0 = ref[rec["config"]]
        diff = sorted(k for k in set(c0) | set(cfg) if c0.get(k) != cfg.get(k))
        if diff:
            what = ", ".join(f"{k}: {c0.get(k)!r} vs {cfg.get(k)!r}" for k in diff[:4])
            raise ReproduceError(f"{d0} and {rec['dir']} differ in more than the seed ({what}); "
                                 "refusing to average them")


def mean_std(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None, 0
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def aggregate(exp, runs, args):
    """-> the results dict of one experiment (also written as <out>/EXP.json and .md)."""
    e = EXPERIMENTS[exp]
    recs = collect(exp, runs, args.split)
    check_same_config(recs, runs)
    rows = []
    for name in e["configs"]:
        mine = [r for r in recs if r["config"] == name]
        row = dict(config=name, flags=CONFIGS[name], n=len(mine), seeds=[r["seed"] for r in mine], metrics={})
        for m in e["metrics"]:
            scale = METRICS[m][1]
            vals = [r["values"].get(m) for r in mine]
            mean, std, n = mean_std([None if v is None else scale * v for v in vals])
            cell = dict(mean=mean, std=std, n=n, unit=METRICS[m][0], values=vals, scale=scale)
            if m == "relative_mce":
                why = next((r["relative_mce_undefined"] for r in mine if r["relative_mce_undefined"]), None)
                if why:
                    cell.update(mean=None, std=None, n=0, undefined=why)
            pub = next((t for t in THESIS if t[:3] == (exp, name, m)), None)
            if pub:
                cell["thesis"] = dict(value=pub[3], std=pub[4], source=pub[5],
                                      diff=None if mean is None else mean - pub[3])
            row["metrics"][m] = cell
        rows.append(row)
    cfg = config_of(runs[0]) if runs else {}
    return dict(experiment=exp, title=e["title"], split=e["split"] or args.split, dataset=args.dataset or "cifar",
                seeds=args.seeds, extra_train_flags=args.extra, rows=rows,
                mce_baseline=(f"{e['baseline']} run of the same seed and split (its eval.json), Eq. 10 without "
                              "clean-error subtraction" if e["baseline"] and "mce_vs_baseline" in e["metrics"]
                              else None),
                std="sample standard deviation over seeds (n - 1); n = runs with a value",
                robustbench=ROBUSTBENCH if exp == "robustness" else None,
                runs=[{k: v for k, v in r.items() if k != "summary"} for r in recs],
                synthetic_warning=cfg.get("dataset") == "synthetic" or args.dataset == "synthetic")


def _fmt(v, d):
    return "-" if v is None else f"{v:.{d}f}"


def render_md(res):
    digits = lambda m: 4 if METRICS[m][1] == 1 else 2
    lines = [f"# {res['experiment']}: {res['title']}", ""]
    if res["synthetic_warning"]:
        lines += ["**SYNTHETIC DATA (--dataset synthetic): these numbers say nothing about CIFAR-10.**", ""]
    lines += [f"split `{res['split']}`, dataset `{res['dataset']}`, seeds {' '.join(map(str, res['seeds']))}"
              + (f", extra train.py flags `{shlex.join(res['extra_train_flags'])}`" if res["extra_train_flags"] else ""),
              f"Cells: mean ± std (n), {res['std']}. Thesis values in the unit it prints; diff = ours - thesis.", ""]
    if any(m in (res["rows"][0]["metrics"] if res["rows"] else {}) for m in ("mce", "mce_vs_baseline")):
        lines += ["mCE: the mean corruption error over the corruptions x severities, as CIFAR-10-C papers report it "
                  "(no baseline model); the thesis's mCE values are on this scale and sit beside it."
                  + (f" mCE vs ViT: seed Eq. 10 against the {res['mce_baseline']}. The thesis names no baseline; "
                     "see the README." if res["mce_baseline"] else ""), ""]
    metrics = list(res["rows"][0]["metrics"]) if res["rows"] else []
    pubs = [m for m in metrics if any("thesis" in r["metrics"][m] for r in res["rows"])]
    head = ["config", "n"] + [c for m in metrics for c in ([METRICS[m][0]] + (["thesis (diff)"] if m in pubs else []))]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in res["rows"]:
        cells = [row["config"], str(row["n"])]
        for m in metrics:
            c, d = row["metrics"][m], digits(m)
            if c.get("undefined"):
                cells.append("undefined")
                notes.append(f"relative mCE undefined: {c['undefined']}")
            else:
                cells.append("-" if c["mean"] is None else f"{c['mean']:.{d}f} ± {_fmt(c['std'], d)} ({c['n']})")
            if m in pubs:
                t = c.get("thesis")
                diff = "-" if not t or t["diff"] is None else f"{t['diff']:+.{d}f}"
                cells.append("" if not t else f"{t['value']}" + (f" ± {t['std']}" if t["std"] else "") + f" ({diff})")
        lines.append("| " + " | ".join(cells) + " |")
    srcs = sorted({c["thesis"]["source"] for r in res["rows"] for c in r["metrics"].values() if "thesis" in c})
    lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)] + ([f"Thesis sources: {'; '.join(srcs)}."] if srcs else [])
    if res["robustbench"]:
        lines += ["", "RobustBench CIFAR-10-C (mean accuracy over 15 x 5): "
                  + "; ".join(f"{n} {v}%" for n, v in res["robustbench"])]
    per_type = _per_type(res)
    if per_type:
        types = list(per_type[0][1])
        lines += ["", "Error % per image type (mean ± std over seeds)", "",
                  "| type | " + " | ".join(c for c, _ in per_type) + " |", "|" + "---|" * (len(per_type) + 1)]
        for t in types:
            lines.append(f"| {t} | " + " | ".join(
                "-" if p[t][0] is None else f"{p[t][0]:.2f} ± {_fmt(p[t][1], 2)}" for _, p in per_type) + " |")
    lines += ["", "Runs", "", "| config | seed | folder | " + " | ".join(METRICS[m][0] for m in metrics)
              + " | commit | torch | triton | CUDA | GPU |", "|" + "---|" * (len(metrics) + 8)]
    for r in res["runs"]:
        env = r.get("environment") or {}
        commit = (env.get("git_commit") or "?")[:10] + (" (dirty)" if env.get("git_dirty") else "")
        gpu = f"{env.get('gpu')} x {env.get('gpu_count')}" if env.get("gpu") else "none"
        vals = [_fmt(None if r["values"].get(m) is None else METRICS[m][1] * r["values"][m], digits(m))
                for m in metrics]
        lines.append(f"| {r['config']} | {r['seed']} | {r['dir']} | " + " | ".join(vals)
                     + f" | {commit} | {env.get('torch', '?')} | {env.get('triton', '?')} | {env.get('cuda', '?')} | {gpu} |")
    return "\n".join(lines) + "\n"


def _per_type(res):
    """[(config, {type: (mean err %, std)})] for table3 and robustness."""
    if res["experiment"] not in ("table3", "robustness"):
        return []
    out = []
    for row in res["rows"]:
        types = {}
        for r in (r for r in res["runs"] if r["config"] == row["config"]):
            for t, a in read_json(r["eval"]).get("per_type", {}).items():
                types.setdefault(t, []).append(None if a is None else 100 * (1 - a))
        if types:
            out.append((row["config"], {t: mean_std(v)[:2] for t, v in types.items()}))
    return out


def write_results(exp, runs, args):
    res = aggregate(exp, runs, args)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, exp)
    atomic_write(base + ".json", json.dumps(res, indent=1, default=str) + "\n", what="results")
    atomic_write(base + ".md", render_md(res), what="results")
    say(f"wrote {base}.md and {base}.json")
    if not args.no_plots:
        plots(exp, res, runs, base, args.split)
    return res


# ----------------------------------------------------------------------------- plots

def plots(exp, res, runs, base, split):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        say("plots skipped: matplotlib is not installed (pip install -r requirements-plot.txt)")
        return
    recs = collect(exp, runs, split)
    if not recs:
        return
    written = []

    def save(fig, name):
        top = 1.0
        if res["synthetic_warning"]:  # on every figure, not only the markdown
            fig.text(0.5, 0.995, "SYNTHETIC DATA (--dataset synthetic): these numbers say nothing about CIFAR-10",
                     ha="center", va="top", color="red", fontweight="bold", fontsize=9)
            top = 0.93
        for ax in fig.axes:
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")  # 2.2985, never 1e-5+2.298
        fig.tight_layout(rect=(0, 0, 1, top))
        fig.savefig(f"{base}-{name}.png", dpi=100)
        plt.close(fig)
        written.append(f"{base}-{name}.png")

    def epochs(ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    def legend_beside(ax, **kw):  # outside the axes: never over the bars or curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, **kw)
    if exp == "fig5":
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        rows = [r for r in res["rows"] if r["config"] != "vit-none"]
        names = [f"strategy {CONFIGS[r['config']][CONFIGS[r['config']].index('--strategy') + 1]}"
                 if "--strategy" in CONFIGS[r["config"]] else "strategy 2" for r in rows]  # train.py's default: 2
        for ax, m in zip(axes, ("mce", "accuracy")):
            ax.bar(range(len(rows)), [r["metrics"][m]["mean"] or 0 for r in rows],
                   yerr=[r["metrics"][m]["std"] or 0 for r in rows], capsize=4)
            ax.set_xticks(range(len(rows)), names)
            ax.set_title(METRICS[m][0])
        save(fig, "fig5")
    if exp == "table3":
        by_cfg = {}
        for r in recs:
            by_cfg.setdefault(r["config"], []).append(r["summary"])
        # Fig. 6: the hard-label loss per epoch; Fig. 7: every per-token loss column summary.csv holds
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for cfg, hists in by_cfg.items():  # the label term: class + corruption projection where CdeiT has it
            col = "train_cls_corr" if any(h and h[-1].get("train_cls_corr") for h in hists) else "train_cls"
            _curve(ax, hists, col, cfg)
        ax.set(xlabel="epoch", ylabel="label loss", title="hard-label loss (thesis Fig. 6)")
        epochs(ax)
        legend_beside(ax, fontsize=7)
        save(fig, "fig6")
        cols = [c for c in dict.fromkeys(k for hs in by_cfg.values() for h in hs for k in (h[0] if h else {}))
                if c.startswith("train_") and c != "train_loss"]
        fig, axes = plt.subplots(1, len(by_cfg), figsize=(3.2 * len(by_cfg), 3), squeeze=False)
        for ax, (cfg, hists) in zip(axes[0], by_cfg.items()):
            for c in cols:
                _curve(ax, hists, c, c[6:])
            ax.set(title=cfg, xlabel="epoch")
            epochs(ax)
            ax.legend(fontsize=6)
        save(fig, "fig7")
    if exp in ("table3", "robustness"):
        per_type = _per_type(res)
        if per_type:
            types = list(per_type[0][1])
            fig, ax = plt.subplots(figsize=(11.5, 3.5))
            w = 0.8 / len(per_type)
            for j, (cfg, p) in enumerate(per_type):
                ax.bar([i + j * w for i in range(len(types))], [p[t][0] or 0 for t in types], w,
                       yerr=[p[t][1] or 0 for t in types], capsize=2, label=cfg)
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(types))], types, rotation=45, ha="right", fontsize=7)
            ax.set(ylabel="error %", title="error per type, bars = seed std")
            legend_beside(ax, fontsize=7)
            save(fig, "per-type")
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for cfg in dict.fromkeys(r["config"] for r in recs):
            cal = [read_json(r["eval"])["calibration"] for r in recs if r["config"] == cfg]
            pts = [(sum(c["confidence"][b] * c["count"][b] for c in cal), sum(c["accuracy"][b] * c["count"][b] for c in cal),
                    sum(c["count"][b] for c in cal)) for b in range(len(cal[0]["count"]))]
            xy = [(cx / n, ay / n) for cx, ay, n in pts if n]
            ax.plot(*zip(*xy), "o-", ms=3, label=cfg) if xy else None
        ax.set(xlabel="confidence", ylabel="accuracy", title="reliability, seeds pooled")
        ax.legend(fontsize=7, loc="upper left")  # above the diagonal's empty corner
        save(fig, "reliability")
    if written:
        say("plots: " + ", ".join(written))


def _curve(ax, hists, col, label):
    """Mean over seeds per epoch, shaded min..max."""
    series = [[float(h[col]) for h in hist if h.get(col) not in (None, "")] for hist in hists]
    series = [s for s in series if s and any(s)]  # train.py writes 0 for a token the model lacks
    if not series:
        return
    n = min(map(len, series))
    xs = range(1, n + 1)
    ax.plot(xs, [statistics.mean(s[i] for s in series) for i in range(n)], "o-", ms=3, label=label)
    ax.fill_between(xs, [min(s[i] for s in series) for i in range(n)], [max(s[i] for s in series) for i in range(n)],
                    alpha=0.2)


# ----------------------------------------------------------------------------- slurm

def write_slurm(path, runs, args, argv):
    """A job-array script: task i trains and evaluates run i; TASK=aggregate (or running the script
    without SLURM_ARRAY_TASK_ID, which runs every task in turn) writes the results."""
    own = argv[:argv.index("--")] if "--" in argv else argv
    # each task runs one run on the GPU(s) Slurm gives it: --slurm and --gpus do not carry over
    drop = {j for i, a in enumerate(own) if a in ("--slurm", "--gpus") for j in (i, i + 1)} \
        | {i for i, a in enumerate(own) if a.startswith(("--slurm=", "--gpus="))}
    base = [sys.executable, os.path.abspath(__file__)] + [a for i, a in enumerate(argv) if i not in drop]
    if "--" in base:
        k = base.index("--")
        task = lambda s: base[:k] + ["--task", s] + base[k:]
    else:
        task = lambda s: base + ["--task", s]
    n = len(runs)
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=cdeit-{args.experiment}",
             f"#SBATCH --array=0-{n - 1}",
             f"#SBATCH --gres=gpu:{args.nproc_per_node or 1}" if args.device != "cpu" else "#SBATCH --cpus-per-task=4",
             f"#SBATCH --output={os.path.abspath(os.path.join(args.out, 'slurm'))}/%x-%A_%a.out",
             "# written by reproduce.py; submit the tasks, then the aggregation once they all succeeded:",
             f"#   jid=$(sbatch --parsable {path}) && sbatch --dependency=afterok:$jid --array=0 "
             f"--export=ALL,TASK=aggregate {path}",
             "# run as a plain script (bash " + path + ") it runs every task in turn, then the aggregation",
             "set -euo pipefail",
             f"cd {shlex.quote(os.getcwd())}",
             f"mkdir -p {shlex.quote(os.path.join(args.out, 'slurm'))}",
             "runs=("] + [f"  {shlex.quote(r['label'])}" for r in runs] + [")",
             f'task() {{ echo "task $1: ${{runs[$1]}}"; {shlex.join(task("__I__")).replace("__I__", chr(34) + "$1" + chr(34))}; }}',
             f'aggregate() {{ {shlex.join(task("aggregate"))}; }}',
             'if [ "${TASK:-}" = aggregate ]; then aggregate',
             'elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then task "$SLURM_ARRAY_TASK_ID"',
             f"else for i in $(seq 0 {n - 1}); do task \"$i\"; done; aggregate",
             "fi"]
    os.makedirs(os.path.join(args.out, "slurm"), exist_ok=True)  # Slurm opens --output before the script runs
    atomic_write(path, "\n".join(lines) + "\n", what="slurm script")
    os.chmod(path, 0o755)
    say(f"wrote {path}: {n} array tasks + aggregation; submit with")
    say(f"  jid=$(sbatch --parsable {path}) && sbatch --dependency=afterok:$jid --array=0 --export=ALL,TASK=aggregate {path}")


# ----------------------------------------------------------------------------- command line

def _experiments_help():
    lines = ["experiments (each configuration is train.py's defaults plus the flags shown):"]
    for name, e in EXPERIMENTS.items():
        lines.append(f"  {name:<11} {e['title']}" + (f"; split {e['split']}" if e["split"] else ""))
        lines += [f"{'':14}{c}: {' '.join(CONFIGS[c]) or '(defaults)'}" for c in e["configs"]]
    lines += ["  all         every experiment above; a configuration shared by two is trained once",
              "",
              "after --: flags for every train.py run, e.g. -- --epochs 2 --depth 1 (checked before anything",
              "runs; the flags reproduce.py sets itself, and those an experiment's configurations vary, are refused)"]
    return "\n".join(lines)


# train.py flags reproduce.py sets itself -> the reproduce.py flag that sets them
OWN_FLAGS = {"--seed": "--seeds", "--split": "--split", "--dataset": "--dataset", "--device": "--device",
             "--data-dir": "--data-dir", "--out-dir": "--out", "--resume": "(automatic: rerun the command)"}


def get_args(argv):
    p = Parser(prog="reproduce.py", description=__doc__.split("\n\n")[0], epilog=_experiments_help(),
               usage="%(prog)s EXPERIMENT [options] [-- train.py flags]")
    p.add_argument("experiment", choices=list(EXPERIMENTS) + ["all"], help="what to reproduce (see below)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2],
                   help="one train.py run per configuration and seed; tables show mean ± std over them")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpus", type=gpu_list, help="comma-separated GPU ids: one run per GPU at once "
                   "(CUDA_VISIBLE_DEVICES; an id twice runs two there); default: one run at a time")
    g.add_argument("--nproc-per-node", type=positive_int, help="each run under torchrun with N processes, in turn")
    p.add_argument("--split", default="paper", choices=["paper", "grouped", "standard"],
                   help="train.py's --split for every experiment but robustness (always standard)")
    p.add_argument("--data-dir", help="passed to every train.py / eval.py (default: train.py's ./data)")
    p.add_argument("--dataset", choices=["cifar", "synthetic"], help="passed to every train.py (default: cifar)")
    p.add_argument("--device", help="cpu, cuda or cuda:N for every train.py / eval.py (default: cuda when available)")
    p.add_argument("--out", default="results", help="results (<out>/<experiment>.md) and run folders (<out>/runs/)")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    p.add_argument("--slurm", metavar="SCRIPT", help="write a Slurm job-array script instead of running")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument("--task", help=argparse.SUPPRESS)  # the slurm script's: a run index, or "aggregate"
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(own)  # a bad value: one line from cli.Parser, exit 2
    args.extra = extra
    return args


def check_args(args):
    """Every option and the flags after --, before any file is read or written: raises FlagError."""
    if len(set(args.seeds)) != len(args.seeds):
        fail("--seeds", " ".join(map(str, args.seeds)), "has duplicates")
    running = not (args.dry_run or args.slurm)  # a script or a listing may be written on a machine without GPUs
    if running:
        check_device("--device", args.device)
    if args.gpus and running and args.device != "cpu":  # with --device cpu the ids are only parallel slots
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if max(int(g) for g in args.gpus.split(",")) >= n:
            fail("--gpus", args.gpus, f"this machine has {n} CUDA device(s)" + (f", ids 0..{n - 1}" if n else ""))
    if args.data_dir and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        fail("--data-dir", args.data_dir, "is a file, not a folder")
    check_writable_dir("--out", args.out)
    if args.slurm:
        check_writable_file("--slurm", args.slurm)
    check_passthrough(args)


def check_passthrough(args):
    """The flags after --: none that reproduce.py sets or an experiment varies, and every run's
    train.py command line accepted by train.py's own parser and flag checks."""
    varied = {f for e in (EXPERIMENTS if args.experiment == "all" else [args.experiment])
              for c in EXPERIMENTS[e]["configs"] for f in CONFIGS[c] if f.startswith("--")}
    for a in args.extra:
        flag = a.split("=")[0]
        if flag in OWN_FLAGS:
            fail("--", a, f"reproduce.py sets {flag} of every run itself; use {OWN_FLAGS[flag]}")
        if flag in varied:
            fail("--", a, f"{args.experiment}'s configurations set {flag} themselves; it cannot pass through")
    if not args.extra:
        return  # the configurations alone are train.py's defaults plus tested flags
    import train  # torch: only to check a user's flags
    world = args.nproc_per_node or 1
    for run in plan(args):
        p = train.parser()
        p.raise_errors = True
        try:
            train.check_flags(train.fill_defaults(p.parse_args(run["flags"])), world)
        except FlagError as e:
            fail("--", " ".join(args.extra), f"train.py refuses them for {run['label']}: {e}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    try:
        check_args(args)
    except FlagError as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        return 2
    exps = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    try:
        runs = plan(args)
        if args.slurm:
            write_slurm(args.slurm, runs, args, argv)
            return 0
        if args.dry_run:
            for i, run in enumerate(runs):
                st = state(run)
                say(f"{i + 1}/{len(runs)} {run['label']}: {st}")
                if st in ("new", "partial"):
                    print(shlex.join(train_cmd(run, args, resume=st == "partial")))
                if st != "done":
                    for c in eval_cmds(run, args):
                        print(shlex.join(c))
            return 0
        if args.task not in (None, "aggregate") and not (args.task.isdigit() and int(args.task) < len(runs)):
            raise ReproduceError(f"--task {args.task}: this plan has runs 0..{len(runs) - 1}")
        failed = [] if args.task == "aggregate" else execute(runs, args, None if args.task is None else int(args.task))
        if args.task in (None, "aggregate"):
            for exp in exps:
                write_results(exp, runs, args)
        if failed:
            say(f"{len(failed)} run(s) failed: " + "; ".join(failed))
            return 1
        return 0
    except (ReproduceError, OSError) as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
