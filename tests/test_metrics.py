"""metrics.py: each formula on hand-computed values (ECE and its bins, accuracy, NLL, mCE, the
per-type and per-severity bookkeeping)."""
import math

import pytest
import torch

import data
import metrics


def two_class_logits(p_top, top):
    """Logits whose softmax gives probability p_top to class `top`; log-probabilities are logits."""
    p = torch.tensor(p_top, dtype=torch.float64)
    lg = torch.stack([torch.log(p), torch.log1p(-p)], 1)
    return torch.where(torch.tensor(top)[:, None] == 0, lg, lg.flip(1))


# ----------------------------------------------------------------------------- ECE

def test_ece_hand_example():
    # 6 predictions: four at confidence 0.95 (3 right), two at 0.55 (1 right).
    # Bins are (k/15, (k+1)/15]: 0.95 -> bin 14 (0.933, 1], 0.55 -> bin 8 (0.533, 0.6].
    # ECE = 4/6 * |3/4 - 0.95| + 2/6 * |1/2 - 0.55| = 4/6 * 0.20 + 2/6 * 0.05
    #     = 0.13333 + 0.01667 = 0.15
    logits = two_class_logits([0.95, 0.95, 0.95, 0.95, 0.55, 0.55], [0, 1, 0, 1, 0, 1])
    labels = torch.tensor([0, 1, 0, 0, 0, 0])  # wrong: sample 3 (pred 1) and sample 5 (pred 1)
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx(0.15, abs=1e-12)
    conf, pred = logits.softmax(-1).max(-1)
    count, acc, cf = metrics.calibration_bins(conf, pred == labels)
    assert count[14] == 4 and count[8] == 2 and count.sum() == 6
    assert acc[14] == pytest.approx(0.75) and cf[8] == pytest.approx(0.55)
    # 10 classes, 3 bins: conf 0.1 (bin 1: (0.0667, 0.1333]), 0.5 (bin 7: (0.4667, 0.5333]),
    # 0.9 (bin 13)
    # one prediction each, correct only at 0.9 -> ECE = 1/3 (0.1 + 0.5 + 0.1) = 0.23333
    probs = torch.full((3, 10), 0.0)
    for i, p in enumerate([0.1, 0.5, 0.9]):
        probs[i] = (1 - p) / 9
        probs[i, 3] = p
    probs[0] = 0.1  # a tie at 0.1: argmax picks class 0, the label is 3 -> wrong
    labels = torch.tensor([3, 0, 3])
    ece = metrics.expected_calibration_error(probs.double().log(), labels)
    assert ece == pytest.approx((0.1 + 0.5 + 0.1) / 3, abs=1e-9)


def test_ece_bin_edges_and_confidence_one():
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    # (lower, upper]: an edge belongs to the bin below it; 0 goes to the first bin, 1.0 to the last
    conf = torch.stack([edges[3], edges[0], edges[15], edges[3] + 1e-9])
    count, _, _ = metrics.calibration_bins(conf, torch.ones(4, dtype=torch.bool))
    assert count[2] == 1 and count[0] == 1 and count[14] == 1 and count[3] == 1
    logits = torch.tensor([[100.0, 0.0]] * 4, dtype=torch.float64)
    assert (logits.softmax(-1).max(-1).values == 1.0).all()  # confidence exactly 1.0
    # all right -> ECE 0; half right -> bin 14 has acc 0.5, conf 1.0 -> ECE = 4/4 * 0.5 = 0.5
    assert metrics.expected_calibration_error(logits, torch.zeros(4, dtype=torch.long)) == 0.0
    half = metrics.expected_calibration_error(logits, torch.tensor([0, 0, 1, 1]))
    assert half == pytest.approx(0.5)


def test_ece_invariants():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    p = 0.1 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)  # top-1 probability
    probs = ((1 - p) / 9)[:, None].repeat(1, 10)
    probs[:, 0] = p  # the prediction is class 0 with confidence p
    right = torch.rand(n, generator=g, dtype=torch.float64) < p  # correct with probability p
    labels = torch.where(right, 0, torch.randint(1, 10, (n,), generator=g))
    # calibrated by construction
    assert metrics.expected_calibration_error(probs.log(), labels) < 0.01
    wrong = torch.zeros(n, 10, dtype=torch.float64)
    wrong[:, 0] = 30.0  # confidence ~1, label never class 0
    never = torch.randint(1, 10, (n,), generator=g)
    assert metrics.expected_calibration_error(wrong, never) > 0.999


def test_accuracy_and_nll():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    labels = torch.tensor([0, 1])
    assert metrics.topk_accuracy(logits, labels, 1) == 0.5
    assert metrics.topk_accuracy(logits, labels, 2) == 1.0
    assert metrics.topk_accuracy(logits, labels, 5) == 1.0  # k above the class count: all classes
    lse = math.log(math.exp(2) + math.exp(1) + 1)  # NLL = mean(lse - 2, lse - 1)
    assert metrics.nll(logits, labels) == pytest.approx(lse - 1.5)


# ----------------------------------------------------------------------------- mCE and bookkeeping

def test_mce_hand_example():
    errs = {"a": [0.1, 0.2, 0.3, 0.4, 0.5], "b": [0.0, 0.1, 0.1, 0.1, 0.2]}  # sums 1.5, 0.5
    base = {"a": [0.2, 0.3, 0.4, 0.5, 0.6], "b": [0.1, 0.1, 0.2, 0.2, 0.4]}  # sums 2.0, 1.0
    # CE_a = 1.5 / 2.0 = 0.75, CE_b = 0.5 / 1.0 = 0.5 -> mCE = 0.625
    assert metrics.mce(errs, base) == pytest.approx(0.625)
    # relative, clean errors 0.05 (model) and 0.1 (baseline):
    # a: (1.5 - 5*0.05) / (2.0 - 5*0.1) = 1.25 / 1.5; b: (0.5 - 0.25) / (1.0 - 0.5) = 0.5
    assert metrics.relative_mce(errs, 0.05, base, 0.1) == pytest.approx((1.25 / 1.5 + 0.5) / 2)
    assert metrics.mce(base, base) == pytest.approx(1.0)
    # a severity missing on one side is left out of both sums:
    # a = (0.1+0.2+0.3+0.4) / (0.2+0.3+0.4+0.5)
    holey = {"a": [0.1, 0.2, 0.3, 0.4, None]}
    assert metrics.mce(holey, base) == pytest.approx(1.0 / 1.4)
    with pytest.raises(ValueError, match="zzz"):
        metrics.mce({"zzz": [0.1] * 5}, base)


def test_per_type_and_severity_bookkeeping():
    types = torch.tensor([0, 0, 1, 1, 1, 2, 2, 10])
    sev = torch.tensor([0, 0, 1, 1, 3, 5, 5, 2])
    correct = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    pt = metrics.per_type_accuracy(correct, types, data.TYPES)
    assert list(pt) == data.TYPES
    assert pt["clean"] == 0.5 and pt["brightness"] == pytest.approx(2 / 3)
    assert pt["defocus_blur"] == 0.0
    assert pt["jpeg_compression"] == 1.0 and pt["fog"] is None
    # severity s over corrupted images: s1 -> samples 2,3 (1 of 2); s2 -> 7; s3 -> 4; s5 -> 5,6
    per_sev = metrics.per_severity_accuracy(correct, types, sev)
    assert per_sev == {"1": 0.5, "2": 1.0, "3": 1.0, "4": None, "5": 0.0}
    ce = metrics.corruption_errors(correct, types, sev, data.TYPES)
    assert list(ce) == data.TYPES[1:]
    assert ce["brightness"] == [0.5, None, 0.0, None, None]
    assert ce["defocus_blur"] == [None] * 4 + [1.0]
    # mean over the corruption types present: brightness 1/3, defocus_blur 1, jpeg 0 -> 4/9
    assert metrics.mean_corruption_error(pt, data.TYPES[1:]) == pytest.approx(4 / 9)
    cm = metrics.confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


# ----------------------------------------------------------------------------- evaluation pass
