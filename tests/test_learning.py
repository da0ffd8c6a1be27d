"""Training learns real images, through the command lines a user types, with the DEFAULT models.

scikit-learn ships 1,797 real handwritten digits (8x8 scans, 10 classes; UCI optdigits). They are
upscaled to 32x32 RGB and written as CIFAR-10 files in the real layouts (data.write_cifar: the
pickled batches, CHW rows), and their test images are rendered by corruptions.py into the
CIFAR-10-C .npy layout (data.write_cifar10c: 15 corruptions x 5 severities). Then
`python train.py --dataset cifar --data-dir DIR` and `python eval.py CKPT --json` run unchanged,
for seeds 0, 1 and 2, each of which must pass:

- a small ViT (--distill none; the default thesis layout and its MLP head, no model flag) must
  reach a clean test accuracy far above chance (10%);
- a small CdeiT (distilled from a tiny random teacher, teacher.write_synthetic_teacher) must name
  the corruption type of test images far above chance (1 of 11). Its class accuracy is not
  asserted: the random teacher's head reaches ~20%, and the distillation token copies it.

The synthetic files (data.write_synthetic) are learnable from colour alone, so labels misaligned
with images, a wrong normalisation or a dead gradient path could pass every other test. The
thresholds sit far above chance; the ViT one also fails when timm's layout (trunc-normal init,
linear head) stands in for the thesis layout.
"""

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_PER_CLASS = 40  # CIFAR-format test images per class; the rest (~140 per class) is training

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py (files written in-process)


def write_digits(root, seed=0, names=None):
    """scikit-learn's digits as CIFAR-10 + CIFAR-10-C files under root (the layouts train.py reads);
    names: the CIFAR-10-C corruptions to render (default the 15 of the benchmark)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] * (255 / 16)  # (N, 1, 8, 8), ink 0..255
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    x = x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3) gray RGB
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS] for c in range(10)]
    )
    train = rng.permutation(np.setdiff1d(np.arange(len(y)), test))
    test = rng.permutation(test)
    data.write_cifar(root, x[train], y[train], x[test], y[test], filename="digit_{}.png")
    data.write_cifar10c(root, names=names, seed=seed)


# Small and short: the regularisers that slow a 2-block model are off, and so are crop and flip (a
# mirrored digit is another glyph). --split paper (the default): the clean test images come from
# the digits' training files, disjoint from the clean training images. No model flag: the defaults
# are what is tested.
COMMON = ["--dataset", "cifar", "--device", "cpu", "--depth", "2", "--num-heads", "2",
          "--warmup-epochs", "1", "--mixup-prob", "0", "--erase-prob", "0", "--drop-path", "0",
          "--crop-padding", "0", "--no-hflip", "--val-per-class", "5", "--log-interval", "1000"]
# --lr 2.4e-2 at batch 64: a peak lr of 3e-3 (x 64 / 512)
VIT = ["--model", "vit", "--distill", "none", "--embed-dim", "48", "--train-per-class", "25",
       "--test-per-class", "20", "--batch-size", "64", "--lr", "2.4e-2", "--epochs", "4"]
CDEIT = ["--model", "cdeit", "--distill", "hard", "--embed-dim", "64", "--train-per-class", "10",
         "--test-per-class", "5", "--batch-size", "32", "--lr", "3.2e-2", "--head-epochs", "20",
         "--epochs", "6"]
SEEDS = (0, 1, 2)
CLEAN_ACCURACY_MIN = 0.70  # chance 0.10
TYPE_ACCURACY_MIN = 0.20  # chance 1/11 = 0.091



@pytest.fixture(scope="module")
def digits(digits_files):
    """tests/conftest.py writes them once per session (write_digits + a random teacher)."""
    return digits_files



def run_pool(cmds, out, width=2):
    """Run {key: argv} at most `width` at a time (one thread each: the machine's cores), each one's
    output in <out>/<key>.log. -> {key: output}; a failed command fails the test with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pending, running, logs = list(cmds.items()), {}, {}
    while pending or running:
        while pending and len(running) < width:
            key, argv = pending.pop(0)
            # open across the loop's turns: closed when its process ends
            f = open(os.path.join(out, f"{key}.log"), "w")  # noqa: SIM115
            p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            running[key] = (p, f)
        for key, (p, f) in list(running.items()):
            if p.poll() is not None:
                f.close()
                del running[key]
                with open(f.name) as g:
                    logs[key] = g.read()
                assert p.returncode == 0, f"{key} failed:\n{logs[key][-3000:]}"
        time.sleep(0.1)
    return logs


def train_and_eval(root, out, seeds=SEEDS):
    """vit and cdeit for each seed, two runs at a time, then eval.py --json on each last checkpoint:
    seed 0's one by one (their full report), the others in one call (its side-by-side table).
    -> {(name, seed): (eval JSON dict, eval stdout, train stdout)}."""
    runs = {"vit": VIT, "cdeit": CDEIT + ["--teacher", os.path.join(root, "teacher.safetensors")]}
    ckpt = lambda k, s: os.path.join(out, f"{k}-s{s}", "ckpt.pt")
    train = {
        f"{k}-s{s}": [sys.executable, "train.py", *COMMON, *flags, "--seed", str(s),
                      "--data-dir", root, "--out-dir", os.path.dirname(ckpt(k, s))]
        for s in seeds
        for k, flags in runs.items()
    }
    logs = run_pool(train, out)
    rest = [(k, s) for s in seeds[1:] for k in runs]
    evals = {f"eval-{k}-s{s}": [(k, s)] for s in seeds[:1] for k in runs}
    if rest:
        evals["eval-rest"] = rest
    evaluate = {
        name: [sys.executable, "eval.py", *[ckpt(k, s) for k, s in which],
               "--json", os.path.join(out, f"{name}.json"), "--device", "cpu"]
        for name, which in evals.items()
    }
    printed = run_pool(evaluate, out)
    res = {}
    for name, which in evals.items():
        with open(os.path.join(out, f"{name}.json")) as f:
            js = json.load(f)
        for (k, s), r in zip(which, js if isinstance(js, list) else [js]):
            assert r["checkpoint"] == ckpt(k, s)
            res[k, s] = (r, printed[name], logs[f"{k}-s{s}"])
    return res


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    return train_and_eval(digits, str(tmp_path_factory.mktemp("runs")))


def test_student_learns_real_digits(runs):
    """Every seed above its threshold (the message lists them all)."""
    clean = {s: runs["vit", s][0]["per_type"]["clean"] for s in SEEDS}
    types = {s: runs["cdeit", s][0]["corruption_accuracy"] for s in SEEDS}
    print(f"ViT clean accuracy per seed {clean}; CdeiT type accuracy per seed {types}")
    low = [s for s in SEEDS if clean[s] < CLEAN_ACCURACY_MIN]
    assert not low, (clean, runs["vit", low[0]][2][-2000:])
    low = [s for s in SEEDS if types[s] < TYPE_ACCURACY_MIN]
    assert not low, (types, runs["cdeit", low[0]][2][-2000:])


def _summary(run):
    with open(os.path.join(os.path.dirname(run[0]["checkpoint"]), "summary.csv")) as f:
        return list(csv.DictReader(f))


def test_history_logs_each_token(runs):
    """summary.csv and the checkpoint's history: row 0 is the untrained model (val heads and token
    cosines, no training losses); every epoch logs each token's loss, and the logged parts are the
    ones optimised (thesis Eq. 6: loss = (CE(cls + corr_proj(corr)) + dist + type) / 3)."""
    import checkpoint

    for (name, seed), run in runs.items():
        if seed != SEEDS[0]:
            continue  # one report each
        rows = _summary(run)
        ck = torch.load(run[0]["checkpoint"], map_location="cpu", weights_only=True)
        assert list(rows[0]) == checkpoint.SUMMARY_FIELDS
        n = ck["config"]["epochs"]
        epochs = [h["epoch"] for h in ck["history"]]
        assert [int(r["epoch"]) for r in rows] == list(range(n + 1)) == epochs
        assert rows[0]["step"] == "0" and rows[0]["train_loss"] == ""
        assert rows[0]["val_accuracy"] != ""
        last = {k: float(v) if v else None for k, v in rows[-1].items()}
        if name == "vit":
            assert last["train_loss"] == pytest.approx(last["train_cls"], rel=1e-6)
            absent = ("train_dist", "train_type", "val_type", "val_cos_cls_dist")
            assert all(r[k] == "" for r in rows for k in absent)
            continue
        for r in rows[1:]:
            r = {k: float(v) for k, v in r.items()}
            assert r["train_loss"] == pytest.approx(
                (r["train_cls_corr"] + r["train_dist"] + r["train_type"]) / 3, rel=1e-5
            )
            # the class token alone, not the label term
            assert r["train_cls"] != r["train_cls_corr"]
        heads = ("val_cls", "val_dist", "val_cls_corr", "val_type")
        for k in (*heads, "val_cos_cls_dist", "val_cos_cls_corr"):
            assert rows[0][k] != "" and last[k] is not None, k
            assert ck["history"][-1][k] == pytest.approx(last[k], rel=1e-9), k
        # eval.py prints the start -> end cosines from the history (thesis 4.4's comparison)
        first = ck["history"][0]
        assert (
            f"val token cosines in training (checkpoint history): epoch 0 cos(cls, dist) "
            f"{first['val_cos_cls_dist']:.3f}  cos(cls, corr) {first['val_cos_cls_corr']:.3f}"
            f"  ->  epoch {n}"
        ) in run[1], run[1]

        start = run[0]["token_similarity_history"][0]
        assert start["cls_dist"] == pytest.approx(first["val_cos_cls_dist"])
