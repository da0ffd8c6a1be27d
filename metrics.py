"""The metrics of thesis 3.5, each a pure function over whole-split tensors (torch only), tested
on hand-computed values in tests/test_metrics.py:

    accuracy, NLL, ECE         Guo et al. 2017, thesis Eq. 8-9 (over the whole split at once)
    mCE                        Hendrycks & Dietterich 2019, thesis Eq. 10
    temperature scaling        Guo et al. 2017, 4.2

`names` lists the image types in index order (type 0 = clean): data.TYPES for the thesis's
11-type mix, corruptions.TYPE_NAMES for the 16 types of CIFAR-10-C. The thesis's ECEs (~0.0002)
sum per-batch ECEs and divide by the number of samples; they are not comparable to these.
"""
import math

import torch
import torch.nn.functional as F


def calibration_bins(confidences, correct, n_bins=15):
    """Per-bin (count, accuracy, mean confidence) over equal-width bins (lower, upper] of [0, 1].

    A confidence of exactly 1.0 falls in the last bin and one of exactly 0 in the first (bucketize
    with right=False puts x in bin i when edge[i-1] < x <= edge[i]). Empty bins have acc = conf = 0.
    """
    conf = confidences.double().flatten()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=False)  # 0..n_bins-1
    count = torch.bincount(idx, minlength=n_bins).double()
    hits = torch.bincount(idx, weights=correct.double().flatten(), minlength=n_bins)
    confsum = torch.bincount(idx, weights=conf, minlength=n_bins)
    safe = count.clamp(min=1)
    return count, hits / safe, confsum / safe


def expected_calibration_error(logits, labels, n_bins=15):
    """Guo et al. 2017, thesis Eq. 9: sum_m |B_m|/n |acc(B_m) - conf(B_m)|, top-1 softmax
    confidence, 15 equal-width bins (lower, upper], empty bins skipped, the whole set at once."""
    probs = logits.double().softmax(-1)  # float64: 1.0 - 1e-9 stays below the last edge
    conf, pred = probs.max(-1)
    return ece_from_bins(*calibration_bins(conf, pred == labels, n_bins))


def ece_from_bins(count, acc, conf):
    return float(((count / count.sum()) * (acc - conf).abs()).sum())  # empty bins add 0


def topk_accuracy(logits, labels, k=1):
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, -1).indices == labels[:, None]).any(-1).double().mean())


def nll(logits, labels):
    return float(F.cross_entropy(logits.double(), labels))


def mean_or_none(x):
    return float(x.double().mean()) if x.numel() else None


def per_type_accuracy(correct, types, names):
    """{type name: accuracy}; types index names (the mix's 11, thesis 3.4 order); None if absent."""
    return {name: mean_or_none(correct[types == t]) for t, name in enumerate(names)}


def per_severity_accuracy(correct, types, severities):
    """{"1".."5": accuracy over the corrupted images of that severity} (clean: severity 0)."""
    return {str(s): mean_or_none(correct[(types > 0) & (severities == s)]) for s in range(1, 6)}


def corruption_errors(correct, types, severities, names):
    """{corruption: [E_1..E_5]}: error rate per corruption and severity (None for an empty cell)."""
    return {name: [None if (m := (types == t) & (severities == s)).sum() == 0
                   else 1.0 - float(correct[m].double().mean()) for s in range(1, 6)]
            for t, name in enumerate(names) if t > 0}


def mean_corruption_error(per_type, names):
    """Unnormalised mean error over the corruption types `names` present (each weighted equally);
    with corruptions.SEEN / UNSEEN it gives the seen / unseen errors of the standard protocol."""
    errs = [1.0 - per_type[c] for c in names if per_type.get(c) is not None]
    return sum(errs) / len(errs) if errs else None


def mce(errors, baseline_errors, clean=0.0, baseline_clean=0.0):
    """Hendrycks & Dietterich, thesis Eq. 10: CE_c = sum_s E_sc / sum_s E^base_sc,
    mCE = mean_c CE_c. errors: {corruption: [E_1..E_5]}; severities missing on either side are
    left out of both sums.
    Returned as a fraction (x100 for the percentages the literature prints)."""
    ratios = []
    for c, e in errors.items():
        if c not in baseline_errors:
            raise ValueError(f"the baseline has no errors for corruption {c!r}")
        pairs = [(a, b) for a, b in zip(e, baseline_errors[c]) if a is not None and b is not None]
        den = sum(b - baseline_clean for _, b in pairs)
        ratios.append(sum(a - clean for a, _ in pairs) / den if pairs and den != 0 else math.nan)
    return sum(ratios) / len(ratios) if ratios else math.nan


def relative_mce(errors, clean_error, baseline_errors, baseline_clean_error):
    """Relative mCE: the same ratio after subtracting each model's own clean error from every E_sc
    (how much a model degrades under corruption, relative to the baseline's degradation).
    nan where relative_mce_undefined gives a reason."""
    if relative_mce_undefined(baseline_errors, baseline_clean_error):
        return math.nan
    return mce(errors, baseline_errors, clean_error, baseline_clean_error)


def relative_mce_undefined(baseline_errors, baseline_clean_error):
    """Why relative mCE has no meaning against this baseline, or None. Each corruption's denominator
    sum_s (E^base_sc - E^base_clean) must be positive: a baseline whose corrupted error is not
    above its clean error (the thesis's own regime, 4.4: clean ~0.25, corrupted < 0.02) degrades
    by nothing or less, and the ratio's sign and size mean nothing."""
    bad = [c for c, e in baseline_errors.items()
           if sum(b - baseline_clean_error for b in e if b is not None) <= 0]
    if not bad:
        return None
    named = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
    return (f"the baseline's corrupted error is not above its clean error "
            f"({100 * baseline_clean_error:.2f}%) for {len(bad)} of {len(baseline_errors)} "
            f"corruptions ({named})")


def confusion_matrix(pred, target, n):
    """(n, n) counts, rows = true index, columns = predicted index."""
    return torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)


# ----------------------------------------------------------------------------- temperature scaling

def fit_temperature(logits, labels, lo=1e-2, hi=1e2, iters=100):
    """Guo et al. 2017 (4.2, temperature scaling): the T > 0 minimising NLL(softmax(logits / T)) on
    held-out data. In beta = 1/T the NLL, mean(logsumexp(beta z) - beta z_y), is convex (a
    log-sum-exp of functions linear in beta), and its derivative mean(E_p[z] - z_y) increases with
    beta, so bisecting the derivative's sign in log beta finds the minimum; T is clipped to [lo, hi]
    (a separable set drives T -> 0). Float64, deterministic."""
    z, y = logits.double(), labels
    zy = z.gather(1, y[:, None])[:, 0]
    slope = lambda b: float(((b * z).softmax(-1) * z).sum(-1).sub(zy).mean())  # d NLL / d beta
    a, b = math.log(1 / hi), math.log(1 / lo)   # log beta bracket
    if slope(math.exp(a)) >= 0:
        return hi
    if slope(math.exp(b)) <= 0:
        return lo
    for _ in range(iters):
        m = (a + b) / 2
        a, b = (m, b) if slope(math.exp(m)) < 0 else (a, m)
    return 1 / math.exp((a + b) / 2)


def type_temperatures(logits, labels, pred_types, num_types, global_t, min_count=50, lo=1e-2,
                      hi=1e2):
    """One temperature per *predicted* corruption type (CdeiT's corruption-token argmax, so no label
    is needed at test time): fit_temperature on the held-out images the token assigns to type t,
    the global temperature for types with fewer than min_count of them, and for types whose fit
    hits a bound of fit_temperature's range (e.g. every image right: NLL falls as T -> 0).
    -> (temperatures (num_types,) float64, counts (num_types,), fitted (num_types,) bool)."""
    counts = torch.bincount(pred_types, minlength=num_types)
    fitted = counts >= min_count
    temps = torch.full((num_types,), float(global_t), dtype=torch.float64)
    for t in torch.nonzero(fitted).flatten().tolist():
        m = pred_types == t
        T = fit_temperature(logits[m], labels[m], lo, hi)
        if lo < T < hi:
            temps[t] = T
        else:
            fitted[t] = False
    return temps, counts, fitted


def scale_logits(logits, temperature, pred_types=None):
    """logits / T: one global T (a number), or T[pred_types] per image for per-type temperatures."""
    if pred_types is None:
        return logits / float(temperature)
    return logits / torch.as_tensor(temperature, dtype=logits.dtype)[pred_types][:, None]
