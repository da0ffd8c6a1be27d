"""data.py's standard split and draw_corruptions, on small synthetic files in the real
formats: counts, class balance, sources (CIFAR-10 training images only in train/val), the fixed
val draw (same every call, really corrupted as recorded), the per-epoch draws' determinism and
distribution."""

import numpy as np
import pytest
import torch

import corruptions
import data
import download

TRAIN, VAL = 20, 12  # per class; the synthetic pool has 40 training images per class
# brightness, defocus_blur, zoom_blur, jpeg_compression: no random numbers
DETERMINISTIC = {1, 2, 3, 10}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("standard")
    data.write_synthetic(str(r), train_per_class=40, test_per_class=6)
    return str(r)


@pytest.fixture(scope="module")
def mix(root):
    return data.build_mix(
        root, "standard", seed=0, train_per_class=TRAIN, val_per_class=VAL, cache_dir=False
    )


@pytest.fixture(scope="module")
def cifar(root):
    return data.read_cifar10(root)


def _nchw(hwc):
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(0, 3, 1, 2)


def test_type_indices_agree():
    assert corruptions.TYPE_NAMES[:11] == data.TYPES
    assert "standard" in data.SPLITS


def test_counts_balance_and_sources(mix, cifar):
    assert {s: len(mix[s]["labels"]) for s in mix} == {
        "train": 10 * TRAIN,
        "val": 10 * VAL,
        "test": 60,
    }
    for s in ("train", "val"):
        assert (
            torch.bincount(mix[s]["labels"], minlength=10).tolist()
            == [TRAIN if s == "train" else VAL] * 10
        )
        src = mix[s]["sources"]
        assert src.max() < data.TEST_SOURCE and len(src.unique()) == len(src)  # CIFAR-10 train only
        assert torch.equal(mix[s]["labels"], torch.from_numpy(cifar["train_labels"][src.numpy()]))
        assert (
            mix[s]["images"].shape == (len(src), 3, 32, 32)
            and mix[s]["images"].dtype == torch.uint8
        )
    assert not set(mix["train"]["sources"].tolist()) & set(mix["val"]["sources"].tolist())
    # train: clean, exactly the source images; corruptions come fresh each epoch at training time
    tr = mix["train"]
    assert tr["types"].eq(0).all() and tr["severities"].eq(0).all()
    assert torch.equal(tr["images"], _nchw(cifar["train_images"][tr["sources"].numpy()]))
    # test: the whole clean CIFAR-10 test set, in order, test_per_class ignored
    te = mix["test"]
    assert te["sources"].tolist() == list(range(data.TEST_SOURCE, data.TEST_SOURCE + 60))
    assert te["types"].eq(0).all() and te["severities"].eq(0).all()
    assert torch.equal(te["images"], _nchw(cifar["test_images"]))
    assert torch.equal(te["labels"], torch.from_numpy(cifar["test_labels"]))


def test_val_is_a_fixed_draw_recorded_truthfully(root, mix, cifar):
    val = mix["val"]
    t, s = val["types"], val["severities"]
    assert t.min() >= 0 and t.max() <= 10 and len(t.unique()) >= 6  # a mix of types, not one
    assert torch.equal(s == 0, t == 0) and s.max() <= 5
    clean = _nchw(cifar["train_images"][val["sources"].numpy()])
    diff = (val["images"].int() - clean.int()).abs().flatten(1).amax(1)
    assert diff[t == 0].eq(0).all() and diff[t > 0].gt(0).all()  # clean untouched, the rest changed
    # the recorded (type, severity) is the one applied: recompute the corruptions that draw no
    # random numbers
    checked = 0
    for i in torch.nonzero(torch.isin(t, torch.tensor(sorted(DETERMINISTIC)))).squeeze(1).tolist():
        name, sev = data.TYPES[t[i]], int(s[i])
        again = corruptions.corrupt(clean[i : i + 1], name, sev)[0]
        assert (again.int() - val["images"][i].int()).abs().max() <= 1, (i, name, sev)
        # the wrong severity differs
        other = corruptions.corrupt(clean[i : i + 1], name, 5 if sev < 5 else 1)[0]
        assert (other.int() - val["images"][i].int()).abs().max() > 1, (i, name, sev)
        checked += 1
    assert checked >= 5
    # the same every call (and for the training loop every epoch), another seed another draw
    again = data.build_mix(
        root, "standard", seed=0, train_per_class=TRAIN, val_per_class=VAL, cache_dir=False
    )
    for k in ("images", "types", "severities", "sources"):
        assert torch.equal(again["val"][k], val[k]) and torch.equal(
            again["train"][k], mix["train"][k]
        )
    other = data.build_mix(
        root, "standard", seed=1, train_per_class=TRAIN, val_per_class=VAL, cache_dir=False
    )
    assert not torch.equal(other["val"]["sources"], val["sources"])
    assert not torch.equal(other["val"]["types"], val["types"])


def test_cache_shared_across_test_counts(root, mix, tmp_path):
    a = data.build_mix(
        root, "standard", seed=0, train_per_class=TRAIN, val_per_class=VAL, cache_dir=str(tmp_path)
    )
    # .lock: one builder at a time
    files = sorted(f for f in tmp_path.iterdir() if f.name != ".lock")
    assert len(files) == 1 and files[0].name.startswith(f"mix-standard-s0-{TRAIN}-{VAL}-")
    b = data.build_mix(
        root,
        "standard",
        seed=0,
        train_per_class=TRAIN,
        val_per_class=VAL,
        test_per_class=7,
        cache_dir=str(tmp_path),
    )
    # test_per_class ignored: the same cache
    assert sorted(f for f in tmp_path.iterdir() if f.name != ".lock") == files
    for s in mix:
        for k in mix[s]:
            assert torch.equal(a[s][k], mix[s][k]) and torch.equal(b[s][k], mix[s][k])


def test_pool_too_small(root):
    with pytest.raises(
        download.DataError, match=r"class 0 \(CIFAR-10 train\).* has 40 images.* need 41"
    ):
        data.build_mix(root, "standard", train_per_class=36, val_per_class=5, cache_dir=False)


def test_draw_corruptions(cifar):
    x = _nchw(cifar["train_images"][:440])
    g = lambda seed: torch.Generator().manual_seed(seed)
    y, t, s = data.draw_corruptions(x, g(3))
    assert y.shape == x.shape and y.dtype == torch.uint8 and t.dtype == s.dtype == torch.int64
    y2, t2, s2 = data.draw_corruptions(x, g(3))  # deterministic for the generator
    assert torch.equal(y, y2) and torch.equal(t, t2) and torch.equal(s, s2)
    y3, t3, _ = data.draw_corruptions(x, g(4))
    assert not torch.equal(t3, t) and not torch.equal(y3, y)
    # every one of the 11 training types, roughly uniform (40 expected each); severity 0 iff clean
    counts = torch.bincount(t, minlength=12)
    assert counts[11] == 0 and counts[:11].min() >= 15 and counts[:11].max() <= 70, counts.tolist()
    assert torch.equal(s == 0, t == 0)
    sev = torch.bincount(s[t > 0], minlength=6)
    assert sev[0] == 0 and sev[1:].min() >= 40, sev.tolist()  # ~80 each of 1..5
    diff = (y.int() - x.int()).abs().flatten(1).amax(1)
    assert diff[t == 0].eq(0).all() and diff[t > 0].gt(0).all()
    # channels-last input gives the same draws and images in its own layout
    yh, th, sh = data.draw_corruptions(x.permute(0, 2, 3, 1).contiguous(), g(3))
    assert torch.equal(th, t) and torch.equal(sh, s) and torch.equal(yh.permute(0, 3, 1, 2), y)
