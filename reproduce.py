"""Reproduce the thesis's tables and figures with one command: several seeds, mean +- std beside
the published numbers.

    python reproduce.py table3 --seeds 0 1 2              # this machine, one run at a time
    python reproduce.py all --seeds 0 1 2 --gpus 0,1,2,3  # one run per GPU at once
    python reproduce.py table3 --nproc-per-node 8         # each run under torchrun
    python reproduce.py table3 --slurm table3.sbatch      # write a job array, run nothing
    python reproduce.py table3 --dry-run                  # print the exact commands
    python reproduce.py table3 --dataset synthetic --device cpu -- --epochs 2   # -- to train.py

A driver: each (configuration, seed) is one `train.py` run in its own folder
<out>/runs/<split>[-synthetic]/<config>-s<seed> (its output in train.log there), then
`eval.py --json` on its best.pt (eval.json, eval.log). It reads only their files: config.json,
ckpt.pt's epoch, summary.csv, the eval JSONs. A finished run (ckpt.pt at its last epoch) is
skipped, an interrupted one continued with --resume, an evaluation redone only when older than
its checkpoint: after a crash or a preemption, run the same command again. A configuration shared
by two experiments (Table 4's best row is Table 3's DeiT hard) is one set of runs.

Results: <out>/<experiment>.md and .json (e.g. results/table3.md), mean +- std over seeds beside
the thesis's values (results.py); figures: plots.py (needs matplotlib).
"""
import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import cli
from fileio import atomic_write
from results import ReproduceError, read_json, read_summary, say, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN, EVAL = os.path.join(HERE, "train.py"), os.path.join(HERE, "eval.py")

# Every configuration as flags changed from train.py's defaults (Table 1 / Table 4's best row).
# CutMix: the thesis gives no probability, only that CutMix hurts "even at low application
# probabilities" (4.2); we use the Mixup probability of its Table 1 (0.3).
CUTMIX_PROB = 0.3
CONFIGS = {
    "vit-none": ["--model", "vit", "--distill", "none"],
    "deit-hard": ["--model", "deit", "--distill", "hard"],
    "deit-soft": ["--model", "deit", "--distill", "soft"],
    "cdeit-hard": ["--model", "cdeit", "--distill", "hard"],  # strategy 2, thesis 4.3's choice
    "cdeit-soft": ["--model", "cdeit", "--distill", "soft"],
    "cdeit-hard-strategy1": ["--model", "cdeit", "--distill", "hard", "--strategy", "1"],
    "cdeit-hard-strategy3": ["--model", "cdeit", "--distill", "hard", "--strategy", "3"],
    "deit-hard-wd0.01": ["--model", "deit", "--distill", "hard", "--weight-decay", "0.01"],
    "deit-hard-lr3e-4": ["--model", "deit", "--distill", "hard", "--lr", "3e-4"],
    "deit-hard-lr3e-4-wd0.01": ["--model", "deit", "--distill", "hard", "--lr", "3e-4",
                                "--weight-decay", "0.01"],
    "deit-hard-sgd": ["--model", "deit", "--distill", "hard", "--opt", "sgd"],
    "deit-hard-randaug": ["--model", "deit", "--distill", "hard", "--randaug", "9"],
    "deit-hard-no-mixup": ["--model", "deit", "--distill", "hard", "--mixup-prob", "0"],
    "deit-hard-cutmix": ["--model", "deit", "--distill", "hard",
                         "--cutmix-prob", str(CUTMIX_PROB)],
    "deit-hard-no-erasing": ["--model", "deit", "--distill", "hard", "--erase-prob", "0"],
    "deit-hard-dropout": ["--model", "deit", "--distill", "hard", "--drop", "0.1"],
    "deit-hard-no-drop-path": ["--model", "deit", "--distill", "hard", "--drop-path", "0"],
}
TABLE3 = ["vit-none", "deit-hard", "deit-soft", "cdeit-hard", "cdeit-soft"]
# experiment -> its title, configurations, forced split (None: --split), the metrics of its
# results table and the configuration its "mCE vs ViT" is against
EXPERIMENTS = {
    "teacher": {"title": "the teacher's refitted head (thesis 4.1)", "configs": ["deit-hard"],
                "split": None, "metrics": ["teacher_val_accuracy", "teacher_test_accuracy"],
                "baseline": None},
    "table2": {"title": "learning rate x weight decay for DeiT (thesis Table 2)",
               "configs": ["deit-hard", "deit-hard-wd0.01", "deit-hard-lr3e-4",
                           "deit-hard-lr3e-4-wd0.01"],
               "split": None, "metrics": ["accuracy", "ece"], "baseline": None},
    "table3": {"title": "ViT, DeiT and CdeiT with hard and soft distillation (thesis Table 3)",
               "configs": TABLE3, "split": None,
               "metrics": ["accuracy", "ece", "nll", "clean_error", "mce", "mce_vs_baseline",
                           "relative_mce"],
               "baseline": "vit-none"},
    "table4": {"title": "augmentation and regularisation ablations, each a change from DeiT's best "
                        "row (thesis Table 4)",
               "configs": ["deit-hard", "deit-hard-sgd", "deit-hard-randaug", "deit-hard-no-mixup",
                           "deit-hard-cutmix", "deit-hard-no-erasing", "deit-hard-dropout",
                           "deit-hard-no-drop-path"],
               "split": None, "metrics": ["accuracy", "ece"], "baseline": None},
    "fig5": {"title": "CdeiT's inference strategies 1 / 2 / 3 (thesis Fig. 5)",
             "configs": ["vit-none", "cdeit-hard-strategy1", "cdeit-hard", "cdeit-hard-strategy3"],
             "split": None, "metrics": ["accuracy", "mce", "mce_vs_baseline"],
             "baseline": "vit-none"},
    "robustness": {"title": "the standard protocol: CIFAR-10 train, tested on CIFAR-10-C 15 x 5",
                   "configs": TABLE3, "split": "standard",
                   "metrics": ["clean_accuracy", "robustbench_accuracy", "seen_corruption_error",
                               "unseen_corruption_error", "mce", "mce_vs_baseline"],
                   "baseline": "vit-none"},
}


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
                    dataset = ["--dataset", args.dataset] if args.dataset else []
                    flags = CONFIGS[name] + ["--split", split, "--seed", str(seed)] + dataset
                    label = f"{name} s{seed}" + ("" if split == args.split else f" [{split}]")
                    seen[key] = {"config": name, "split": split, "seed": seed,
                                 "flags": flags + args.extra, "teacher": False, "label": label,
                                 "dir": os.path.join(args.out, "runs", tag, f"{name}-s{seed}")}
                    runs.append(seen[key])
                seen[key]["teacher"] |= exp == "teacher"
    return runs


def train_cmd(run, args, resume=False):
    """The train.py command line of one run (under torchrun with --nproc-per-node; with --nodes N
    under srun, one torchrun agent per node)."""
    launch = [sys.executable]
    if args.nproc_per_node:
        launch += ["-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc_per_node}"]
    if args.nodes > 1:  # a Slurm task on several nodes: one torchrun agent per node
        import nodes  # torch: only for this launch
        launch = nodes.slurm_launch(args.nodes, args.nproc_per_node or 1)
    cmd = launch + [TRAIN] + run["flags"] + ["--out-dir", run["dir"]]
    if args.device:
        cmd += ["--device", args.device]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd + (["--resume"] if resume else [])


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
            raise ReproduceError(f"{run['dir']} holds a run of other train.py flags "
                                 f"({shlex.join(old)}); use another --out or delete it")
    t_ck = _mtime(ck)
    if t_ck is None:
        return "new"
    t_best = _mtime(os.path.join(run["dir"], "best.pt")) or t_ck
    evals = [_mtime(os.path.join(run["dir"], n)) for n in _eval_outputs(run)]
    if all(t is not None and t >= max(t_ck, t_best) for t in evals):
        return "done"  # an evaluation only follows a finished training: no need to open ckpt.pt
    epoch, epochs = checkpoint_epoch(ck)
    return "trained" if epoch >= epochs else "partial"


def checkpoint_epoch(path):
    """-> (epoch reached, epochs planned) of a checkpoint; (0, 1) when it cannot be read."""
    import torch
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        return ck["epoch"], ck["config"]["epochs"]
    except Exception as e:  # noqa: BLE001  (any damage: train.py --resume says what is wrong)
        say(f"warning: cannot read {path} ({type(e).__name__}); trying --resume")
        return 0, 1


def teacher_head(run):
    """The teacher head file train.py recorded in the run's best.pt."""
    import torch
    ck = torch.load(os.path.join(run["dir"], "best.pt"), map_location="cpu", weights_only=True)
    return ck["teacher"]["head"]


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
            record = {"flags": self.run["flags"], "command": cmd}
            atomic_write(os.path.join(self.run["dir"], "command.json"),
                         json.dumps(record, indent=1) + "\n", what="run command")
            seq = [cmd]
        else:
            head = teacher_head(self.run) if self.run["teacher"] else None
            seq = eval_cmds(self.run, self.args, head)
        self.phase = phase
        self.queue = seq
        self.env = env
        self._spawn()

    def _spawn(self):
        cmd = self.queue.pop(0)
        if self.log:
            self.log.close()
        # open while the child writes to it; closed by the next _spawn or a finished poll
        self.log = open(os.path.join(self.run["dir"], f"{self.phase}.log"), "a")  # noqa: SIM115
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
    """A finished run's best val accuracy, test accuracy and ECE, for the progress line."""
    path = os.path.join(run["dir"], "eval.json")
    if not os.path.exists(path):
        return ""
    e = read_json(path)
    acc = e.get("robustbench_accuracy") or e.get("accuracy")
    # row 0 is the untrained model; best.pt is chosen from epoch 1 on
    trained = [float(h["val_accuracy"]) for h in read_summary(run)
               if int(h["epoch"]) > 0 and h.get("val_accuracy")]
    val = f"val {100 * max(trained):.2f}%, " if trained else ""
    return val + f"test {100 * acc:.2f}%, ECE {100 * e.get('ece', math.nan):.2f}%"


WHAT = {"new": "train + eval", "partial": "resume with --resume + eval", "trained": "eval"}


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
    free = list(slots)
    jobs = {}  # keyed by run: --gpus 0,0 gives GPU 0 two runs at once
    failed, durations = [], []
    # seeds whose teacher cache exists (a distilled run got as far as a checkpoint): until then the
    # first run that builds it runs alone, so parallel runs never build one cache twice at once
    warm = {r["seed"] for r in runs if not r["config"].startswith("vit")
            and os.path.exists(os.path.join(r["dir"], "ckpt.pt"))}
    # nothing on disk yet: the first run fetches or writes the data alone
    data_ready = any(os.path.exists(os.path.join(r["dir"], "ckpt.pt")) for r in runs)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    pending = list(todo)
    left = len(todo)
    try:
        while pending or jobs:
            if STOP["sig"]:
                break
            while free and pending and (data_ready or not jobs):
                building = {j.run["seed"] for j in jobs.values() if j.phase == "train"
                            and not j.run["config"].startswith("vit")}
                pick = next((p for p in pending if p[1]["config"].startswith("vit")
                             or p[1]["seed"] in warm or p[1]["seed"] not in building), None)
                if pick is None:
                    break
                pending.remove(pick)
                i, run, st = pick
                slot = free.pop(0)
                env = dict(os.environ)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                job = Job(run, st, args, i)
                job.t0 = time.time()
                job.slot = slot
                job.start_next(env)
                jobs[i] = job
                where = f" on GPU {slot}" if slot is not None else ""
                say(f"{i + 1}/{len(runs)} started {run['label']} ({WHAT[st]}){where} "
                    f"-> {run['dir']}")
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
                        f"{time.time() - job.t0:.1f}s: {key_numbers(run)} | {left} remain, "
                        f"ETA {eta / 60:.1f} min")
                elif not STOP["sig"]:
                    failed.append(f"{run['label']}: {msg}")
                    say(f"{job.index + 1}/{len(runs)} FAILED {run['label']}: {msg} | {left} remain")
        if STOP["sig"]:
            for job in jobs.values():  # train.py saves where it is on SIGTERM; eval.py just stops
                if job.proc.poll() is None:
                    job.proc.send_signal(signal.SIGTERM)
            for job in jobs.values():
                job.proc.wait()
            name = signal.Signals(STOP["sig"]).name
            say(f"stopped by {name}: run the same command again to continue")
            raise SystemExit(128 + STOP["sig"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return failed


# ----------------------------------------------------------------------------- slurm

def write_slurm(path, runs, args, argv):
    """A job-array script: task i trains and evaluates run i; TASK=aggregate (or running the script
    without SLURM_ARRAY_TASK_ID, which runs every task in turn) writes the results."""
    own = argv[:argv.index("--")] if "--" in argv else argv
    # each task runs one run on the GPU(s) Slurm gives it: --slurm and --gpus do not carry over
    drop = {j for i, a in enumerate(own) if a in ("--slurm", "--gpus") for j in (i, i + 1)}
    drop |= {i for i, a in enumerate(own) if a.startswith(("--slurm=", "--gpus="))}
    base = [sys.executable, os.path.abspath(__file__)]
    base += [a for i, a in enumerate(argv) if i not in drop]
    k = base.index("--") if "--" in base else len(base)

    def task(s):  # reproduce.py's own flags, --task s, then the train.py flags after --
        return base[:k] + ["--task", s] + base[k:]

    n = len(runs)
    out_dir = os.path.join(args.out, "slurm")
    resources = (f"#SBATCH --gres=gpu:{args.nproc_per_node or 1}" if args.device != "cpu"
                 else "#SBATCH --cpus-per-task=4")
    submit = (f"jid=$(sbatch --parsable {path}) && sbatch --dependency=afterok:$jid --array=0 "
              f"--export=ALL,TASK=aggregate {path}")
    nodes_lines = ([f"#SBATCH --nodes={args.nodes}", "#SBATCH --ntasks-per-node=1"]
                   if args.nodes > 1 else [])
    one_task = shlex.join(task("__I__")).replace("__I__", '"$1"')
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=cdeit-{args.experiment}",
             f"#SBATCH --array=0-{n - 1}",
             *nodes_lines,
             resources,
             f"#SBATCH --output={os.path.abspath(out_dir)}/%x-%A_%a.out",
             ("# written by reproduce.py; submit the tasks, then the aggregation once they all "
              "succeeded:"),
             f"#   {submit}",
             (f"# run as a plain script (bash {path}) it runs every task in turn, then the "
              "aggregation"),
             "set -euo pipefail",
             f"cd {shlex.quote(os.getcwd())}",
             f"mkdir -p {shlex.quote(out_dir)}",
             "runs=("] + [f"  {shlex.quote(r['label'])}" for r in runs] + [")",
             f'task() {{ echo "task $1: ${{runs[$1]}}"; {one_task}; }}',
             f'aggregate() {{ {shlex.join(task("aggregate"))}; }}',
             'if [ "${TASK:-}" = aggregate ]; then aggregate',
             'elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then task "$SLURM_ARRAY_TASK_ID"',
             f"else for i in $(seq 0 {n - 1}); do task \"$i\"; done; aggregate",
             "fi"]
    os.makedirs(out_dir, exist_ok=True)  # Slurm opens --output before the script runs
    atomic_write(path, "\n".join(lines) + "\n", what="slurm script")
    os.chmod(path, 0o755)
    say(f"wrote {path}: {n} array tasks + aggregation; submit with")
    say(f"  {submit}")


# ----------------------------------------------------------------------------- command line

def _experiments_help():
    lines = ["experiments (each configuration is train.py's defaults plus the flags shown):"]
    for name, e in EXPERIMENTS.items():
        lines.append(f"  {name:<11} {e['title']}" + (f"; split {e['split']}" if e["split"] else ""))
        lines += [f"{'':14}{c}: {' '.join(CONFIGS[c]) or '(defaults)'}" for c in e["configs"]]
    lines += ["  all         every experiment above; a configuration shared by two is trained once",
              "",
              "after --: flags for every train.py run, e.g. -- --epochs 2 --depth 1 (checked",
              "before anything runs; the flags reproduce.py sets itself, and those an",
              "experiment's configurations vary, are refused)"]
    return "\n".join(lines)


# train.py flags reproduce.py sets itself -> the reproduce.py flag that sets them
OWN_FLAGS = {"--seed": "--seeds", "--split": "--split", "--dataset": "--dataset",
             "--device": "--device", "--data-dir": "--data-dir", "--out-dir": "--out",
             "--resume": "(automatic: rerun the command)"}


def get_args(argv):
    """reproduce.py's own flags (before --) parsed; args.extra = the train.py flags after --."""
    p = cli.Parser(prog="reproduce.py", description=__doc__.split("\n\n")[0],
                   epilog=_experiments_help(),
                   usage="%(prog)s EXPERIMENT [options] [-- train.py flags]")
    a = p.add_argument
    a("experiment", choices=[*EXPERIMENTS, "all"], help="what to reproduce (see below)")
    a("--seeds", type=cli.seed_int, nargs="+", default=[0, 1, 2],
      help="one train.py run per configuration and seed; tables show mean ± std over them")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpus", type=cli.gpu_list,
                   help="comma-separated GPU ids: one run per GPU at once (CUDA_VISIBLE_DEVICES; "
                        "an id twice runs two there); default: one run at a time")
    g.add_argument("--nproc-per-node", type=cli.positive_int,
                   help="each run under torchrun with N processes, in turn")
    a("--split", default="paper", choices=["paper", "grouped", "standard"],
      help="train.py's --split for every experiment but robustness (always standard)")
    a("--data-dir", help="passed to every train.py / eval.py (default: train.py's ./data)")
    a("--dataset", choices=["cifar", "synthetic"],
      help="passed to every train.py (default: cifar)")
    a("--device",
      help="cpu, cuda or cuda:N for every train.py / eval.py (default: cuda when available)")
    a("--out", default="results",
      help="results (<out>/<experiment>.md) and run folders (<out>/runs/)")
    a("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    a("--slurm", metavar="SCRIPT", help="write a Slurm job-array script instead of running")
    a("--nodes", type=cli.positive_int, default=1,
      help="with --slurm: each run on N nodes (srun torchrun --nnodes N, c10d); "
           "--data-dir may be node-local, --out must be shared")
    a("--no-plots", action="store_true", help="write the tables only")
    a("--task", help=argparse.SUPPRESS)  # the slurm script's: a run index, or "aggregate"
    own, extra = argv, []
    if "--" in argv:
        own, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = p.parse_args(own)  # a bad value: one line from cli.Parser, exit 2
    args.extra = extra
    return args


def check_args(args):
    """Every option and the flags after --, before any file is read or written: raises
    cli.FlagError."""
    if len(set(args.seeds)) != len(args.seeds):
        cli.fail("--seeds", " ".join(map(str, args.seeds)), "has duplicates")
    # a script or a listing may be written on a machine without GPUs
    running = not (args.dry_run or args.slurm)
    if running:
        cli.check_device("--device", args.device)
    if args.gpus and running and args.device != "cpu":  # with cpu the ids are only parallel slots
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if max(int(g) for g in args.gpus.split(",")) >= n:
            ids = f", ids 0..{n - 1}" if n else ""
            cli.fail("--gpus", args.gpus, f"this machine has {n} CUDA device(s){ids}")
    if args.data_dir and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        cli.fail("--data-dir", args.data_dir, "is a file, not a folder")
    cli.check_writable_dir("--out", args.out)
    if args.slurm:
        cli.check_writable_file("--slurm", args.slurm)
    if args.nodes > 1 and not (args.slurm or args.task):
        cli.fail("--nodes", args.nodes,
                 "needs --slurm (the script's tasks run on the nodes Slurm gives them)")
    check_passthrough(args)


def check_passthrough(args):
    """The flags after --: none that reproduce.py sets or an experiment varies, and every run's
    train.py command line accepted by train.py's own parser and flag checks."""
    varied = {f for e in (EXPERIMENTS if args.experiment == "all" else [args.experiment])
              for c in EXPERIMENTS[e]["configs"] for f in CONFIGS[c] if f.startswith("--")}
    for a in args.extra:
        flag = a.split("=")[0]
        if flag in OWN_FLAGS:
            cli.fail("--", a,
                     f"reproduce.py sets {flag} of every run itself; use {OWN_FLAGS[flag]}")
        if flag in varied:
            cli.fail("--", a, f"{args.experiment}'s configurations set {flag} themselves; it "
                     "cannot pass through")
    if not args.extra:
        return  # the configurations alone are train.py's defaults plus tested flags
    import train  # torch: only to check a user's flags
    world = (args.nproc_per_node or 1) * args.nodes
    for run in plan(args):
        p = train.parser()
        p.raise_errors = True
        try:
            train.check_flags(train.fill_defaults(p.parse_args(run["flags"])), world)
        except cli.FlagError as e:
            cli.fail("--", " ".join(args.extra),
                     f"train.py refuses them for {run['label']}: {e}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    try:
        check_args(args)
    except cli.FlagError as e:
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
        index = None
        if args.task not in (None, "aggregate"):
            if not (args.task.isdigit() and int(args.task) < len(runs)):
                raise ReproduceError(f"--task {args.task}: this plan has runs 0..{len(runs) - 1}")
            index = int(args.task)
        failed = [] if args.task == "aggregate" else execute(runs, args, index)
        if args.task in (None, "aggregate"):
            for exp in exps:
                write_results(exp, EXPERIMENTS[exp], CONFIGS, runs, args)
        if failed:
            say(f"{len(failed)} run(s) failed: " + "; ".join(failed))
            return 1
        return 0
    except (ReproduceError, OSError) as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
