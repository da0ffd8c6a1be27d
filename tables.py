"""The tables eval.py prints: one result in full, several side by side, student vs teacher.

    print_one(r)           headline metrics, each head alone, error per type and severity
    print_table(results)   one row per result (like the thesis's Table 3), then per type / head
    print_agreement(r)     the student-teacher agreement of eval.py --teacher

Accuracies and errors are printed in %, NLL in nats; "-" marks a value a result does not have.
"""
import math

import data
import robustbench


def _num(v, digits=4, scale=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{scale * v:.{digits}f}"


def _pct(v, digits=2):
    return _num(v, digits, 100)


def _err(acc):
    return None if acc is None else 1.0 - acc


def rel_mce_text(r, unit="%", why=True):
    """Relative mCE as printed: a percentage, or "undefined" with the reason
    (metrics.relative_mce_undefined)."""
    if r.get("relative_mce_undefined"):
        return "undefined" + (f" ({r['relative_mce_undefined']})" if why else "")
    return _pct(r["relative_mce"]) + (unit if r["relative_mce"] is not None else "")


def _mce_vs(r):
    """The column name of Eq. 10's mCE: against the ViT (the thesis's baseline) or another model."""
    m = r.get("baseline_model")
    if m == "vit":
        return "mCE vs ViT"
    return f"mCE vs {m}" if m else "mCE vs base"


def _cosine_line(hist):
    """First and last epoch of the logged val cosines; thesis 4.4 reports DeiT 0.10 -> 0.54 and
    CdeiT 0.13 -> 0.84 for (cls, dist), and 0.21 for CdeiT's (cls, corr) at the end."""
    keys = [k for k in ("cls_dist", "cls_corr") if any(h[k] is not None for h in hist)]

    def at(h):
        cosines = "  ".join(f"cos(cls, {k[4:]}) {_num(h[k], 3)}" for k in keys)
        return f"epoch {h['epoch']} {cosines}"

    line = "val token cosines in training (checkpoint history): " + at(hist[0])
    return line + (f"  ->  {at(hist[-1])}" if len(hist) > 1 else "")


def print_one(r):
    """Everything about one result: headline metrics, heads, per type and severity."""
    print(f"\n{r['checkpoint']}: {r['model_name']} (distill {r['distill'] or 'none'}), "
          f"{r['split']} split of data split {r['data_args'].get('split')!r}, {r['n']:,} images, "
          f"{r['images_per_s']:,.0f} img/s on {r['device']}")
    if r.get("benchmark"):
        extra = ""
        if "mean_accuracy_extra" in r:
            extra = f"  4 extra corruptions {_pct(r['mean_accuracy_extra'])}%"
        print(f"  clean {_pct(r['clean_accuracy'])}%  CIFAR-10-C mean over 15 x 5: "
              f"{_pct(r['accuracy'])}% (RobustBench {robustbench.STANDARD}: "
              f"{robustbench.STANDARD_ACCURACY}%)  error on the seen types "
              f"{_pct(r['seen_corruption_error'])}%  on the unseen types "
              f"{_pct(r['unseen_corruption_error'])}%" + extra)
    print(f"  {'pooled ' if r.get('benchmark') else ''}accuracy "
          f"{_pct(r['head_accuracy']['combined'])}%  top-5 {_pct(r['top5'])}%  "
          f"NLL {_num(r['nll'])} nats  ECE {_pct(r['ece'])}%  "
          f"clean error {_pct(r['clean_error'])}%")
    vs = ""
    if r["baseline"]:
        name = _mce_vs(r)
        vs = (f"  {name} {_pct(r['mce_vs_baseline'])}%  relative {name} {rel_mce_text(r)} "
              f"(Eq. 10, baseline {r['baseline_run']})")
    print(f"  mCE {_pct(r['mce'])}% (mean corruption error over {len(r['corruption_errors'])} "
          "corruptions x severities, the CIFAR-10-C convention)" + vs)
    extra = [f"final-layer cos(cls, {k[4:]}) {v:.3f}"
             for k, v in r["token_similarity"].items() if v is not None]
    if r["corruption_accuracy"] is not None:
        extra.append(f"corruption-token type accuracy {_pct(r['corruption_accuracy'])}%")
    print("  accuracy of each head alone: "
          + "  ".join(f"{k} {_pct(v)}%" for k, v in r["head_accuracy"].items())
          + "".join(f"  | {e}" for e in extra))
    if r.get("token_similarity_history"):
        print("  " + _cosine_line(r["token_similarity_history"]))
    print(f"  {'type':<18}{'acc %':>7}{'err %':>7}   error % at severity 1..5")
    for t, a in r["per_type"].items():
        errs = [] if t == "clean" else r["corruption_errors"][t]
        sev = " ".join(f"{_pct(e, 1):>5}" for e in errs)
        print(f"  {t:<18}{_pct(a, 1):>7}{_pct(_err(a), 1):>7}   {sev}")
    print(f"  {'all corrupted':<32}"
          + " ".join(f"{_pct(_err(a), 1):>5}" for a in r["per_severity"].values()))
    if r["confusion_matrix"] is not None:
        short = [t.split("_")[0][:7] for t in data.TYPES]  # brightness -> brightn
        print("  corruption-token confusion (images): rows = true type, columns = predicted type")
        print(f"  {'':<18}" + " ".join(f"{c:>7}" for c in short))
        for t, row in zip(data.TYPES, r["confusion_matrix"]):
            print(f"  {t:<18}" + " ".join(f"{v:>7}" for v in row))


def _table_row(cells, widths):
    """The first cell left-aligned, the others right-aligned, two spaces apart."""
    return "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                     for j, (c, w) in enumerate(zip(cells, widths)))


def print_table(results):
    """One side-by-side table, like the thesis's Table 3 (model, distillation, accuracy, ECE, mCE).
    A column shows when some result has a value for it: clean % and C10-C % (mean over 15 x 5) for
    CIFAR-10-C results (--benchmark, standard split), acc % for the mix, seen / unseen corruption
    errors whenever a CIFAR-10-C result is in the table."""
    labels = [r["label"] for r in results]
    based = [r for r in results if r.get("baseline")]
    vs = _mce_vs(based[0] if based else {})

    def on_mix(r):
        return None if r.get("benchmark") else r["accuracy"]

    def cos(k):
        return lambda r: r["token_similarity"][k]

    spec = [("acc %", on_mix, _pct), ("clean %", "clean_accuracy", _pct),
            ("C10-C %", "robustbench_accuracy", _pct), ("top5 %", "top5", _pct),
            ("NLL", "nll", _num), ("ECE %", "ece", _pct), ("clean err %", "clean_error", _pct)]
    if any(r.get("benchmark") for r in results):
        spec += [("seen err %", "seen_corruption_error", _pct),
                 ("unseen err %", "unseen_corruption_error", _pct)]
    spec += [("mCE %", "mce", _pct), (f"{vs} %", "mce_vs_baseline", _pct),
             (f"rel {vs} %", lambda r: r, lambda r: rel_mce_text(r, "", False)),
             ("type acc %", "corruption_accuracy", _pct),
             ("cos(cls,dist)", cos("cls_dist"), lambda v: _num(v, 3)),
             ("cos(cls,corr)", cos("cls_corr"), lambda v: _num(v, 3)),
             ("img/s", "images_per_s", lambda v: f"{v:,.0f}")]
    cols = [(c, [fmt(k(r) if callable(k) else r.get(k)) for r in results]) for c, k, fmt in spec]
    cols = [(c, v) for c, v in cols if c in ("mCE %", "img/s") or any(x != "-" for x in v)]
    cols = [("run", labels)] + cols
    widths = [max(len(c), *map(len, v)) for c, v in cols]
    print(f"\n{'/'.join(sorted({r['split'] for r in results}))} split, {results[0]['device']}")
    print(_table_row([c for c, _ in cols], widths))
    for i, r in enumerate(results):
        print(_table_row([v[i] for _, v in cols], widths) + f"  {r['checkpoint']}")
    if based:
        print("mCE: mean corruption error over the corruptions x severities (the CIFAR-10-C "
              f"convention); {vs}: Eq. 10 against {based[0]['baseline_run']}")
    else:
        print("mCE: mean corruption error over the corruptions x severities (the CIFAR-10-C "
              f"convention); {vs}: needs --baseline (an eval.py --json of the ViT)")
    for why in dict.fromkeys(r["relative_mce_undefined"] for r in results
                             if r.get("relative_mce_undefined")):
        print(f"relative mCE undefined: {why}")
    lw = max(14, *map(len, labels))
    print("\nerror % per type   " + "  ".join(f"{x:>{lw}}" for x in labels))  # thesis 4.4
    for t in dict.fromkeys(t for r in results for t in r["per_type"]):
        print(f"{t:<18} " + "  ".join(f"{_pct(_err(r['per_type'].get(t))):>{lw}}" for r in results))
    print("accuracy % of each head alone")
    for h in ("cls", "dist", "cls_corr", "combined"):
        print(f"{h:<18} " + "  ".join(f"{_pct(r['head_accuracy'].get(h)):>{lw}}" for r in results))


def print_agreement(r):
    """One row per (type, severity) cell: how student and teacher predictions agree, in %."""
    rep = r["teacher_agreement"]
    keys = ("agreement", "both_right", "student_only", "teacher_only", "same_error",
            "different_errors")
    print(f"\n{r['checkpoint']} vs the teacher head {rep['teacher']}: % of images (same_error: "
          "both wrong with the same class, an error the student shares)")
    print(f"  {'type':<18}{'sev':>4}{'n':>7}" + "".join(f"{k:>17}" for k in keys))
    rows = [("all", "", rep["overall"])]
    rows += [(c["type"], c["severity"] or "", c) for c in rep["cells"]]
    for name, s, c in rows:
        print(f"  {name:<18}{s:>4}{c['n']:>7}" + "".join(f"{_pct(c[k]):>17}" for k in keys))
