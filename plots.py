"""The figures of eval.py --plot and reproduce.py (matplotlib, requirements-plot.txt).

    evaluation(results, f)      eval.py: reliability diagram + error per image type, one colour
                                per result
    experiment(exp, res, recs, per_type, base)
                                reproduce.py: the thesis's figures of one experiment as
                                <base>-<name>.png

matplotlib is imported inside each function (an optional dependency): ImportError when missing.
"""
import json
import math
import statistics

import numpy as np

SYNTHETIC = "SYNTHETIC DATA (--dataset synthetic): these numbers say nothing about CIFAR-10"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def evaluation(results, f):
    """eval.py's PNG into the file object f: reliability (15 bins) beside error bars for every
    image type of any result; each result is labelled with its r["label"]."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 2]})
    ax1.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    names = list(dict.fromkeys(t for r in results for t in r["per_type"]))
    width = 0.8 / len(results)
    for j, r in enumerate(results):
        cal = r["calibration"]
        points = [(c, a) for n, c, a in zip(cal["count"], cal["confidence"], cal["accuracy"])
                  if n > 0]
        ax1.plot([c for c, _ in points], [a for _, a in points], "o-",
                 label=f"{r['label']} (ECE {100 * r['ece']:.2f}%)")
        errs = [math.nan if r["per_type"].get(t) is None else 1 - r["per_type"][t] for t in names]
        offset = (j - (len(results) - 1) / 2) * width
        ax2.bar(np.arange(len(names)) + offset, errs, width, label=r["label"])
    ax1.set(xlabel="confidence (top-1 softmax)", ylabel="accuracy", title="reliability (15 bins)",
            xlim=(0, 1), ylim=(0, 1))
    splits = "/".join(sorted({r["split"] for r in results}))
    ax2.set(ylabel="error", title=f"error per image type ({splits})")
    ax2.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax1.legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def experiment(exp, res, recs, per_type, base):
    """reproduce.py's figures of experiment `exp` from its results dict res, the per-run records
    recs (each with its summary.csv rows and eval.json path) and per_type ([(config, {type:
    (mean error %, std)})]). fig5: strategies 1 / 2 / 3; table3: thesis Fig. 6 and Fig. 7
    (losses per epoch); table3 and robustness: error per type and reliability. -> paths written."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    written = []
    if not recs:
        return written

    def save(fig, name):
        top = 1.0
        if res["synthetic_warning"]:  # on every figure, not only the markdown
            fig.text(0.5, 0.995, SYNTHETIC, ha="center", va="top", color="red",
                     fontweight="bold", fontsize=9)
            top = 0.93
        for ax in fig.axes:
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")  # never 1e-5+2.298
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
        names = [_strategy(r["flags"]) for r in rows]
        for ax, m in zip(axes, ("mce", "accuracy")):
            ax.bar(range(len(rows)), [r["metrics"][m]["mean"] or 0 for r in rows],
                   yerr=[r["metrics"][m]["std"] or 0 for r in rows], capsize=4)
            ax.set_xticks(range(len(rows)), names)
            ax.set_title(rows[0]["metrics"][m]["unit"])
        save(fig, "fig5")
    if exp == "table3":
        by_cfg = {}
        for r in recs:
            by_cfg.setdefault(r["config"], []).append(r["summary"])
        # thesis Fig. 6: the hard-label loss per epoch; Fig. 7: every per-token loss column
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for cfg, hists in by_cfg.items():
            # the label term: class + corruption projection where CdeiT has it
            cls_corr = any(h and h[-1].get("train_cls_corr") for h in hists)
            _curve(ax, hists, "train_cls_corr" if cls_corr else "train_cls", cfg)
        ax.set(xlabel="epoch", ylabel="label loss", title="hard-label loss (thesis Fig. 6)")
        epochs(ax)
        legend_beside(ax, fontsize=7)
        save(fig, "fig6")
        first_rows = [h[0] for hs in by_cfg.values() for h in hs if h]
        cols = [c for c in dict.fromkeys(k for row in first_rows for k in row)
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
        if per_type:
            types = list(per_type[0][1])
            fig, ax = plt.subplots(figsize=(11.5, 3.5))
            w = 0.8 / len(per_type)
            for j, (cfg, p) in enumerate(per_type):
                ax.bar([i + j * w for i in range(len(types))], [p[t][0] or 0 for t in types], w,
                       yerr=[p[t][1] or 0 for t in types], capsize=2, label=cfg)
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(types))], types, rotation=45,
                          ha="right", fontsize=7)
            ax.set(ylabel="error %", title="error per type, bars = seed std")
            legend_beside(ax, fontsize=7)
            save(fig, "per-type")
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for cfg in dict.fromkeys(r["config"] for r in recs):
            xy = _pooled_reliability([r["eval"] for r in recs if r["config"] == cfg])
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", ms=3, label=cfg)
        ax.set(xlabel="confidence", ylabel="accuracy", title="reliability, seeds pooled")
        ax.legend(fontsize=7, loc="upper left")  # above the diagonal's empty corner
        save(fig, "reliability")
    return written


def _strategy(flags):
    """A fig5 configuration's CdeiT inference strategy (train.py's default: 2)."""
    return f"strategy {flags[flags.index('--strategy') + 1] if '--strategy' in flags else 2}"


def _pooled_reliability(eval_paths):
    """The calibration bins of several eval.json files pooled, weighted by count:
    [(mean confidence, accuracy)] of the non-empty bins."""
    cal = []
    for path in eval_paths:
        with open(path) as f:
            cal.append(json.load(f)["calibration"])
    out = []
    for b in range(len(cal[0]["count"])):
        n = sum(c["count"][b] for c in cal)
        if n:
            conf = sum(c["confidence"][b] * c["count"][b] for c in cal)
            acc = sum(c["accuracy"][b] * c["count"][b] for c in cal)
            out.append((conf / n, acc / n))
    return out


def _curve(ax, hists, col, label):
    """Mean over seeds per epoch, shaded min..max."""
    series = [[float(h[col]) for h in hist if h.get(col) not in (None, "")] for hist in hists]
    series = [s for s in series if s and any(s)]  # train.py writes 0 for a token the model lacks
    if not series:
        return
    n = min(map(len, series))
    xs = range(1, n + 1)
    ax.plot(xs, [statistics.mean(s[i] for s in series) for i in range(n)], "o-", ms=3, label=label)
    ax.fill_between(xs, [min(s[i] for s in series) for i in range(n)],
                    [max(s[i] for s in series) for i in range(n)], alpha=0.2)
