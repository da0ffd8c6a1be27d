"""Temperature scaling for eval.py --calibrate (Guo et al. 2017; metrics.fit_temperature fits).

    fit_temperatures()  one global T fitted on val by NLL, and for CdeiT one T per predicted
                        corruption type: the sidecar stored beside the checkpoint
    report()            NLL and ECE unscaled / global T / per-type T, overall and per cell
    print_report()      that report as a table (NLL in nats, ECE in %)

The per-type T is chosen by the corruption token's argmax, so no label is needed at test time;
a type the token assigns fewer than --min-type-images val images gets the global T.
"""
import os

import torch

import data
import fileio
import model as model_lib
from metrics import (
    expected_calibration_error,
    fit_temperature,
    nll,
    scale_logits,
    type_temperatures,
)

VARIANTS = {"none": "none = unscaled", "global": "global = the global T",
            "per_type": "per_type = the predicted type's T"}


def fit_temperatures(outs, labels, checkpoint, min_type_images):
    """The temperatures sidecar (model.TEMPERATURE_KIND) for `checkpoint`, from its outputs on
    the val split (eval.run_student's dict: "combined" class logits, CdeiT's "corr" too)."""
    z = outs["combined"].double()  # (N, classes)
    T = fit_temperature(z, labels)
    t = {"kind": model_lib.TEMPERATURE_KIND, "version": 1,
         "checkpoint": os.path.basename(checkpoint),
         "checkpoint_sha256": fileio.sha256_file(checkpoint), "fitted_on": "val", "n": len(labels),
         "global": T, "per_type": None,
         "val_nll": {"none": nll(z, labels), "global": nll(scale_logits(z, T), labels)}}
    if "corr" in outs:
        pred_t = outs["corr"].argmax(-1)  # (N,) predicted corruption type
        temps, counts, fitted = type_temperatures(z, labels, pred_t, outs["corr"].shape[1], T,
                                                  min_type_images)
        t.update(per_type=temps.tolist(), types=list(data.TYPES), val_counts=counts.tolist(),
                 fitted=fitted.tolist(), min_type_images=min_type_images)
        t["val_nll"]["per_type"] = nll(scale_logits(z, temps, pred_t), labels)
    return t


def report(outs, split, names, temps):
    """NLL and ECE of the class logits unscaled, with the global T and (CdeiT) the per-type T:
    overall, on the corrupted images (type > 0), per true type and per (type, severity) cell.
    -> {"overall", "corrupted", "per_type", "cells"}, each score {variant: {"nll", "ece"}}."""
    z, y = outs["combined"].double(), split["labels"]
    variants = {"none": z, "global": scale_logits(z, temps["global"])}
    if temps.get("per_type") and "corr" in outs:
        variants["per_type"] = scale_logits(z, temps["per_type"], outs["corr"].argmax(-1))

    def score(m):
        return {v: {"nll": nll(x[m], y[m]), "ece": expected_calibration_error(x[m], y[m])}
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


def print_report(r):
    """The fitted temperatures, then one row per cell of r's evaluated split (r["split"])."""
    rep, t = r["calibration_scaling"], r["temperatures"]
    vs = list(rep["overall"])
    line = f"\n{r['checkpoint']}: temperature scaling fitted on val ({t['n']:,} images): " \
        f"global T {t['global']:.3f}"
    if t.get("per_type") is not None:
        per = zip(t["types"], t["per_type"], t["fitted"])
        line += "; per predicted type " + " ".join(f"{n} {v:.2f}{'' if ok else '*'}"
                                                   for n, v, ok in per)
        line += " (* = global T: too few val images of that type, or a fit at the range's edge)"
    print(line)
    print(f"  rows: the {r['split']} split by true type and severity; NLL in nats, ECE in %")
    print("  columns: " + ", ".join(VARIANTS[v] for v in vs))
    print(f"  {'type':<18}{'sev':>4}{'n':>7}  " + "".join(f"{'NLL ' + v:>15}" for v in vs)
          + "".join(f"{'ECE % ' + v:>16}" for v in vs))
    n_all = sum(c["n"] for c in rep["cells"])
    n_corrupted = sum(c["n"] for c in rep["cells"] if c["severity"])
    rows = [("all", "", n_all, rep["overall"]),
            ("all corrupted", "", n_corrupted, rep["corrupted"])]
    rows += [(c["type"], c["severity"] or "", c["n"], c) for c in rep["cells"]]
    for name, s, n, sc in rows:
        print(f"  {name:<18}{s:>4}{n:>7}  " + "".join(f"{sc[v]['nll']:>15.4f}" for v in vs)
              + "".join(f"{100 * sc[v]['ece']:>16.2f}" for v in vs))
