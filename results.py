"""The thesis's numbers and the results files of reproduce.py: per-run numbers collected,
mean +- std over seeds, markdown / JSON beside the thesis.

    METRICS, THESIS      each metric's column and unit; the published values and their sources
    collect              a finished run's files (eval.json, config.json, summary.csv) -> its numbers
    aggregate            one row per configuration: mean +- std (the sample std, n - 1) and n,
                         the thesis's value beside it with the difference
    render_md            the markdown of that dict: the table, per-type errors, the runs
    write_results        <out>/<experiment>.md and .json, then plots.py's figures

Runs of one configuration whose config.json differ in anything but the seed are refused. mCE is
the CIFAR-10-C papers' mean corruption error over corruptions x severities (eval.py's, no
baseline model), the thesis's mCE values beside it; "mCE vs ViT" (Eq. 10) is computed here from
the eval JSONs with metrics.py, against the ViT run of the same seed and split. An experiment is
one entry of reproduce.EXPERIMENTS, passed in with reproduce.CONFIGS.
"""
import csv
import json
import math
import os
import shlex
import statistics

import plots
import robustbench
from fileio import atomic_write

# metric -> (column, scale to the printed unit). mce: the CIFAR-10-C convention, the unnormalised
# mean corruption error (eval.json's "mce"); mce_vs_baseline: Eq. 10 against the ViT.
METRICS = {"accuracy": ("acc %", 100), "ece": ("ECE (0-1)", 1), "nll": ("NLL (nats)", 1),
           "clean_error": ("clean err %", 100), "mce": ("mCE %", 100),
           "mce_vs_baseline": ("mCE vs ViT %", 100), "relative_mce": ("rel mCE vs ViT %", 100),
           "clean_accuracy": ("clean acc %", 100), "robustbench_accuracy": ("C10-C acc %", 100),
           "seen_corruption_error": ("seen err %", 100),
           "unseen_corruption_error": ("unseen err %", 100),
           "teacher_val_accuracy": ("val acc %", 100), "teacher_test_accuracy": ("test acc %", 100)}

# The published numbers, in the unit the source prints, and where each comes from. Nothing else
# here is a thesis number. Table 4's data-augmentation rows are garbled in the text we have: we
# read them as RandAugment 96.7, no Mixup 96.3, CutMix 95.5; its fourth row (95.7) cannot be
# attributed.
GARBLED = "thesis Table 4 (row read from garbled text)"
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
    ("table4", "deit-hard-randaug", "accuracy", 96.7, None, GARBLED),
    ("table4", "deit-hard-no-mixup", "accuracy", 96.3, None, GARBLED),
    ("table4", "deit-hard-cutmix", "accuracy", 95.5, None, GARBLED),
    ("table4", "deit-hard-no-erasing", "accuracy", 95.2, None, "thesis Table 4"),
    ("table4", "deit-hard-dropout", "accuracy", 96.5, None, "thesis Table 4"),
    ("table4", "deit-hard-no-drop-path", "accuracy", 96.2, None, "thesis Table 4"),
    ("fig5", "cdeit-hard", "accuracy", 97.5, 0.3, "thesis 4.3 (Fig. 5's strategy 2)"),
]
# config.json keys that may differ between the seeds of one configuration
NOT_CONFIG = {"seed", "out_dir", "resume", "environment", "device", "data_dir", "mirror",
              "log_interval"}


class ReproduceError(RuntimeError):
    """A bad option or an unusable run folder; reproduce.py prints it as one line, exit 2."""


def say(msg):
    """One line of reproduce.py's progress on stdout."""
    print(f"[reproduce] {msg}", flush=True)


def read_json(path):
    """A run's JSON file; ReproduceError when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ReproduceError(f"{path}: unreadable ({e})") from None


def read_summary(run):
    """The run's summary.csv rows (one per epoch, epoch 0 = the untrained model)."""
    path = os.path.join(run["dir"], "summary.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def config_of(run):
    """The run's config.json ({} before train.py wrote it)."""
    path = os.path.join(run["dir"], "config.json")
    return read_json(path) if os.path.exists(path) else {}


def headline_mce(res):
    """The mCE of an eval.json: the mean corruption error, no baseline model. eval.py writes it as
    "mce"; older files hold it as "mean_corruption_error" (the oldest with "mce" = Eq. 10)."""
    return res["mean_corruption_error"] if "mean_corruption_error" in res else res.get("mce")


def mce_against(res, base, base_dir):
    """Eq. 10 from two eval JSONs (metrics.py), refused when they saw other images.
    -> (mCE vs the baseline, relative mCE or None, why the relative mCE is undefined or None)."""
    from metrics import mce, relative_mce, relative_mce_undefined

    def images(r):
        mix = {k: v for k, v in (r.get("data_args") or {}).items() if k != "root"}
        return r.get("benchmark"), r.get("split"), mix

    a, b = images(res), images(base)
    if a[:2] != b[:2] or (not a[0] and a[2] != b[2]):
        raise ReproduceError(f"{base_dir}: the mCE baseline was evaluated on other images than "
                             f"{res.get('checkpoint')}")
    errs, base_errs = res["corruption_errors"], base["corruption_errors"]
    why = relative_mce_undefined(base_errs, base["clean_error"])
    rel = None if why else relative_mce(errs, res["clean_error"], base_errs, base["clean_error"])
    return mce(errs, base_errs), rel, why


def collect(exp, e, runs, split):
    """Per-run numbers of experiment `exp` (its reproduce.EXPERIMENTS entry e) from the runs'
    files (only runs that finished evaluation)."""
    out = []
    split = e["split"] or split
    for run in (r for r in runs if r["config"] in e["configs"] and r["split"] == split):
        path = os.path.join(run["dir"], "eval.json")
        if not os.path.exists(path):
            continue
        res = read_json(path)
        vals = {m: res.get(m) for m in e["metrics"] if m in res}
        if "mce" in e["metrics"]:
            vals["mce"] = headline_mce(res)
        rec = {"config": run["config"], "seed": run["seed"], "dir": run["dir"], "eval": path,
               "values": vals, "environment": config_of(run).get("environment"),
               "mce_baseline": None, "relative_mce_undefined": None}
        if exp == "teacher":
            for s in ("val", "test"):
                p = os.path.join(run["dir"], f"teacher-{s}.json")
                if os.path.exists(p):
                    vals[f"teacher_{s}_accuracy"] = read_json(p).get("accuracy")
        if e["baseline"] and ("mce_vs_baseline" in e["metrics"] or "relative_mce" in e["metrics"]):
            base = next((r for r in runs if r["config"] == e["baseline"]
                         and r["seed"] == run["seed"] and r["split"] == run["split"]), None)
            bpath = base and os.path.join(base["dir"], "eval.json")
            if bpath and os.path.exists(bpath):
                m, rel, why = mce_against(res, read_json(bpath), base["dir"])
                vals["mce_vs_baseline"] = m
                if "relative_mce" in e["metrics"]:
                    vals["relative_mce"] = rel
                rec["mce_baseline"] = bpath
                rec["relative_mce_undefined"] = why
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
    """-> (mean, sample std or None, n) over the values that are numbers."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None, 0
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def _cell(m, mine, pub):
    """One results-table cell: metric m over the runs `mine`, beside its thesis value pub."""
    scale = METRICS[m][1]
    vals = [r["values"].get(m) for r in mine]
    mean, std, n = mean_std([None if v is None else scale * v for v in vals])
    cell = {"mean": mean, "std": std, "n": n, "unit": METRICS[m][0], "values": vals,
            "scale": scale}
    if m == "relative_mce":
        why = next((r["relative_mce_undefined"] for r in mine if r["relative_mce_undefined"]), None)
        if why:
            cell.update(mean=None, std=None, n=0, undefined=why)
    if pub:
        cell["thesis"] = {"value": pub[3], "std": pub[4], "source": pub[5],
                          "diff": None if mean is None else mean - pub[3]}
    return cell


def aggregate(exp, e, configs, runs, args):
    """-> the results dict of experiment `exp` (entry e, configs: reproduce.CONFIGS), also
    written as <out>/EXP.json and .md."""
    recs = collect(exp, e, runs, args.split)
    check_same_config(recs, runs)
    rows = []
    for name in e["configs"]:
        mine = [r for r in recs if r["config"] == name]
        metrics = {m: _cell(m, mine, next((t for t in THESIS if t[:3] == (exp, name, m)), None))
                   for m in e["metrics"]}
        rows.append({"config": name, "flags": configs[name], "n": len(mine),
                     "seeds": [r["seed"] for r in mine], "metrics": metrics})
    cfg = config_of(runs[0]) if runs else {}
    mce_baseline = None
    if e["baseline"] and "mce_vs_baseline" in e["metrics"]:
        mce_baseline = (f"{e['baseline']} run of the same seed and split (its eval.json), Eq. 10 "
                        "without clean-error subtraction")
    return {"experiment": exp, "title": e["title"], "split": e["split"] or args.split,
            "dataset": args.dataset or "cifar", "seeds": args.seeds,
            "extra_train_flags": args.extra, "rows": rows, "mce_baseline": mce_baseline,
            "std": "sample standard deviation over seeds (n - 1); n = runs with a value",
            "robustbench": robustbench.REFERENCE if exp == "robustness" else None,
            "runs": [{k: v for k, v in r.items() if k != "summary"} for r in recs],
            "synthetic_warning": cfg.get("dataset") == "synthetic" or args.dataset == "synthetic"}


def _fmt(v, d):
    return "-" if v is None else f"{v:.{d}f}"


def _digits(m):
    return 4 if METRICS[m][1] == 1 else 2


def render_md(res):
    """The results markdown: the mean +- std table beside the thesis, per-type errors, the runs."""
    lines = [f"# {res['experiment']}: {res['title']}", ""]
    if res["synthetic_warning"]:
        lines += [f"**{plots.SYNTHETIC}.**", ""]
    flags = res["extra_train_flags"]
    seeds = " ".join(map(str, res["seeds"]))
    lines += [f"split `{res['split']}`, dataset `{res['dataset']}`, seeds {seeds}"
              + (f", extra train.py flags `{shlex.join(flags)}`" if flags else ""),
              (f"Cells: mean ± std (n), {res['std']}. Thesis values in the unit it prints; "
               "diff = ours - thesis."), ""]
    metrics = list(res["rows"][0]["metrics"]) if res["rows"] else []
    if "mce" in metrics or "mce_vs_baseline" in metrics:
        text = ("mCE: the mean corruption error over the corruptions x severities, as CIFAR-10-C "
                "papers report it (no baseline model); the thesis's mCE values are on this scale "
                "and sit beside it.")
        if res["mce_baseline"]:
            text += (f" mCE vs ViT: Eq. 10 against the {res['mce_baseline']}. The thesis names no "
                     "baseline; see the README.")
        lines += [text, ""]
    pubs = [m for m in metrics if any("thesis" in r["metrics"][m] for r in res["rows"])]
    head = ["config", "n"]
    for m in metrics:
        head += [METRICS[m][0]] + (["thesis (diff)"] if m in pubs else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in res["rows"]:
        cells = [row["config"], str(row["n"])]
        for m in metrics:
            c, d = row["metrics"][m], _digits(m)
            if c.get("undefined"):
                cells.append("undefined")
                notes.append(f"relative mCE undefined: {c['undefined']}")
            elif c["mean"] is None:
                cells.append("-")
            else:
                cells.append(f"{c['mean']:.{d}f} ± {_fmt(c['std'], d)} ({c['n']})")
            if m in pubs:
                t = c.get("thesis")
                diff = "-" if not t or t["diff"] is None else f"{t['diff']:+.{d}f}"
                std = f" ± {t['std']}" if t and t["std"] else ""
                cells.append(f"{t['value']}{std} ({diff})" if t else "")
        lines.append("| " + " | ".join(cells) + " |")
    srcs = sorted({c["thesis"]["source"] for r in res["rows"] for c in r["metrics"].values()
                   if "thesis" in c})
    lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)]
    if srcs:
        lines.append(f"Thesis sources: {'; '.join(srcs)}.")
    if res["robustbench"]:
        lines += ["", "RobustBench CIFAR-10-C (mean accuracy over 15 x 5): "
                  + "; ".join(f"{n} {v}%" for n, v in res["robustbench"])]
    per_type = _per_type(res)
    if per_type:
        lines += ["", "Error % per image type (mean ± std over seeds)", "",
                  "| type | " + " | ".join(c for c, _ in per_type) + " |",
                  "|" + "---|" * (len(per_type) + 1)]
        for t in per_type[0][1]:
            lines.append(f"| {t} | " + " | ".join(
                "-" if p[t][0] is None else f"{p[t][0]:.2f} ± {_fmt(p[t][1], 2)}"
                for _, p in per_type) + " |")
    lines += ["", "Runs", "",
              "| config | seed | folder | " + " | ".join(METRICS[m][0] for m in metrics)
              + " | commit | torch | triton | CUDA | GPU |", "|" + "---|" * (len(metrics) + 8)]
    for r in res["runs"]:
        lines.append(_run_row(r, metrics))
    return "\n".join(lines) + "\n"


def _run_row(r, metrics):
    """One run's markdown row: its numbers and what it ran on (config.json's environment)."""
    env = r.get("environment") or {}
    commit = (env.get("git_commit") or "?")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    gpu = f"{env.get('gpu')} x {env.get('gpu_count')}" if env.get("gpu") else "none"
    vals = [_fmt(None if r["values"].get(m) is None else METRICS[m][1] * r["values"][m],
                 _digits(m)) for m in metrics]
    ran_on = [commit, env.get("torch", "?"), env.get("triton", "?"), env.get("cuda", "?"), gpu]
    return f"| {r['config']} | {r['seed']} | {r['dir']} | " + " | ".join(vals + ran_on) + " |"


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


def write_results(exp, e, configs, runs, args):
    """<out>/EXP.json and .md, and unless --no-plots the figures (plots.experiment)."""
    res = aggregate(exp, e, configs, runs, args)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, exp)
    atomic_write(base + ".json", json.dumps(res, indent=1, default=str) + "\n", what="results")
    atomic_write(base + ".md", render_md(res), what="results")
    say(f"wrote {base}.md and {base}.json")
    if args.no_plots:
        return res
    try:
        recs = collect(exp, e, runs, args.split)
        written = plots.experiment(exp, res, recs, _per_type(res), base)
    except ImportError:
        say("plots skipped: matplotlib is not installed (pip install -r requirements-plot.txt)")
        return res
    if written:
        say("plots: " + ", ".join(written))
    return res
