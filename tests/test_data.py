"""data.py: readers on synthetic files in the real formats, the mix, the loader, the augmentation.
CPU only, no network. The downloader has its own file (test_download.py)."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data

COUNTS = dict(train_per_class=100, val_per_class=20, test_per_class=20)   # small, multiples of 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test machine is shared: with 2 intra-op threads and busy cores, OpenMP barriers make
    # these small ops 10x slower. One thread is plenty for 64-image batches.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("synth"))
    data.write_synthetic(r)   # 250 train / 60 test per class
    return r


# --------------------------------------------------------------------------------- readers

def test_read_cifar10_synthetic(root):
    c = data.read_cifar10(root)
    assert c["train_images"].shape == (2500, 32, 32, 3) and c["train_images"].dtype == np.uint8
    assert c["test_images"].shape == (600, 32, 32, 3) and c["test_images"].dtype == np.uint8
    assert c["train_labels"].dtype == np.int64 and c["test_labels"].dtype == np.int64
    assert np.bincount(c["train_labels"]).tolist() == [250] * 10
    assert np.bincount(c["test_labels"]).tolist() == [60] * 10
    # the rows are 1024 R, 1024 G, 1024 B: check the HWC conversion against the raw pickle
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_2"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    row = raw[b"data"][7]
    img = c["train_images"][500 + 7]
    assert img[0, 0, 0] == row[0] and img[0, 0, 1] == row[1024] and img[0, 0, 2] == row[2048]
    assert img[1, 2, 1] == row[1024 + 32 + 2]
    assert data.read_cifar10(os.path.join(root, "cifar-10-batches-py"))["test_labels"].shape == (600,)


def _py2_batch_pickle(x, labels):
    """A CIFAR batch pickled the way Python 2 + numpy 1 wrote the real files (protocol 2, str =
    BINSTRING, numpy.core globals), written opcode by opcode."""
    def s(b):
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)
    n = len(x)
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
           + b"(" + i(1) + i(n) + i(3072) + b"\x86"
           + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
           + b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + i(0) + b"tb"
           + b"\x89" + s(x.tobytes()) + b"tb")
    lab = b"](" + b"".join(i(int(v)) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5") + s(b"labels") + lab
            + s(b"data") + arr + s(b"filenames") + b"]" + b"u.")


def test_read_python2_style_pickle(tmp_path, root):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, 12)
    p = tmp_path / "data_batch_1"
    p.write_bytes(_py2_batch_pickle(x, y))
    xs, ys = data._read_batch(str(p))
    assert np.array_equal(xs, x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) and ys.tolist() == y.tolist()
    p.write_bytes(pickle.dumps({"data": x, "labels": y.tolist()}, protocol=5))   # str keys, numpy 2 pickle
    xs, ys = data._read_batch(str(p))
    assert np.array_equal(xs, x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) and ys.tolist() == y.tolist()


def test_read_cifar10c(root):
    test_y = data.read_cifar10(root)["test_labels"]
    x, y = data.read_cifar10c(root, "fog")
    assert isinstance(x, np.memmap) and x.shape == (3000, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.array_equal(y, np.tile(test_y, 5))
    # severity grows the distortion (synthetic texture blend): mean |x_s - clean| increases with s
    clean = data.read_cifar10(root)["test_images"].astype(np.float32)
    d = [np.abs(x[s * 600:(s + 1) * 600] - clean).mean() for s in range(5)]
    assert all(a < b for a, b in zip(d, d[1:]))
    for name in data.CORRUPTION_FILES:
        assert os.path.exists(os.path.join(root, "CIFAR-10-C", f"{name}.npy"))


def _copy_tree(root, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(os.path.join(root, "cifar-10-batches-py"), dst / "cifar-10-batches-py")
    shutil.copytree(os.path.join(root, "CIFAR-10-C"), dst / "CIFAR-10-C")
    return dst


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "not a readable CIFAR-10 pickle"),
    ("shape", "'data' must be a uint8 array"),
    ("labels", "'labels' must be"),
    ("missing", "file not found"),
    ("notdict", "expected a pickled dict"),
])
def test_bad_batch_files(root, tmp_path, damage, needle):
    d = _copy_tree(root, tmp_path)
    p = d / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[:1000])
    elif damage == "missing":
        p.unlink()
    else:
        obj = pickle.loads(p.read_bytes())
        if damage == "shape":
            obj[b"data"] = obj[b"data"][:, :3000]
        elif damage == "labels":
            obj[b"labels"][0] = 10
        else:
            obj = [obj]
        p.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(data.DataError) as e:
        data.read_cifar10(str(d))
    assert str(p) in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("damage,needle", [
    ("dtype", "expected uint8"), ("rows", "expected uint8"), ("labels", "tiled 5 times"),
    ("garbage", "not a readable .npy"), ("pickled", "not a readable .npy"),
])
def test_bad_cifar10c_files(root, tmp_path, damage, needle):
    d = _copy_tree(root, tmp_path) / "CIFAR-10-C"
    p = d / ("labels.npy" if damage == "labels" else "snow.npy")
    if damage == "dtype":
        np.save(p, np.load(p).astype(np.float32))
    elif damage == "rows":
        np.save(p, np.load(p)[:2999])
    elif damage == "labels":
        y = np.load(p)
        y[5] = (y[5] + 1) % 10
        np.save(p, y)
    elif damage == "garbage":
        p.write_bytes(b"not numpy at all")
    else:
        np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(data.DataError) as e:
        data.read_cifar10c(str(d.parent), "snow")
    assert str(p) in str(e.value) and needle in str(e.value)


# --------------------------------------------------------------------------------- the mix

@pytest.fixture(scope="module")
def mixes(root):
    return {s: data.build_mix(root, s, seed=0, cache_dir=False, **COUNTS) for s in ("paper", "grouped")}


@pytest.mark.parametrize("split", ["paper", "grouped"])
def test_mix_counts_balance_and_content(root, mixes, split):
    m = mixes[split]
    c = data.read_cifar10(root)
    corr = {t: data.read_cifar10c(root, name)[0] for t, name in enumerate(data.TYPES) if t}
    for name, per in (("train", 100), ("val", 20), ("test", 20)):
        d = m[name]
        n = 11 * 10 * per
        assert d["images"].shape == (n, 3, 32, 32) and d["images"].dtype == torch.uint8
        for k in ("labels", "types", "severities", "sources"):
            assert d[k].shape == (n,) and d[k].dtype == torch.int64
        counts = torch.zeros(11, 10, dtype=torch.long)
        counts.index_put_((d["types"], d["labels"]), torch.ones(n, dtype=torch.long), accumulate=True)
        assert (counts == per).all(), counts
        clean = d["types"] == 0
        assert (d["severities"][clean] == 0).all() and (d["sources"][clean] < 50000).all()
        assert ((d["severities"][~clean] >= 1) & (d["severities"][~clean] <= 5)).all()
        assert (d["sources"][~clean] >= 50000).all()
        # every sample is what it claims to be: the right pixels and the source's label
        hwc = d["images"].permute(0, 2, 3, 1).numpy()
        src, sev, typ = d["sources"].numpy(), d["severities"].numpy(), d["types"].numpy()
        assert np.array_equal(hwc[clean.numpy()], c["train_images"][src[clean.numpy()]])
        assert np.array_equal(d["labels"][clean].numpy(), c["train_labels"][src[clean.numpy()]])
        j = src - 50000
        for i in np.flatnonzero(~clean.numpy())[::37]:
            assert np.array_equal(hwc[i], corr[typ[i]][(sev[i] - 1) * 600 + j[i]])
            assert d["labels"][i] == c["test_labels"][j[i]]


def test_mix_deterministic_and_cached(root, mixes, tmp_path):
    again = data.build_mix(root, "paper", seed=0, cache_dir=False, **COUNTS)
    for s in ("train", "val", "test"):
        for k in again[s]:
            assert torch.equal(again[s][k], mixes["paper"][s][k])
    other = data.build_mix(root, "paper", seed=1, cache_dir=False, **COUNTS)
    assert not torch.equal(other["test"]["sources"], mixes["paper"]["test"]["sources"])
    cache = tmp_path / "cache"
    first = data.build_mix(root, "grouped", seed=0, cache_dir=str(cache), **COUNTS)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("mix-grouped-s0-100-20-20-")
    second = data.build_mix(root, "grouped", seed=0, cache_dir=str(cache), **COUNTS)
    assert all(torch.equal(first[s][k], second[s][k]) for s in first for k in first[s])
    assert all(torch.equal(first[s][k], mixes["grouped"][s][k]) for s in first for k in first[s])
    (cache / files[0]).write_bytes(b"damaged")   # a damaged cache is rebuilt, not trusted
    third = data.build_mix(root, "grouped", seed=0, cache_dir=str(cache), **COUNTS)
    assert torch.equal(third["train"]["images"], first["train"]["images"])


def test_grouped_has_no_source_overlap_and_paper_does(mixes):
    g = mixes["grouped"]
    src = {s: set(g[s]["sources"].tolist()) for s in g}
    assert not (src["train"] & src["val"]) and not (src["train"] & src["test"]) and not (src["val"] & src["test"])
    # grouped: each corrupted source appears at all 5 severities of every corruption
    d = g["train"]
    cor = d["types"] > 0
    key = d["sources"][cor] * 100 + d["types"][cor] * 10 + d["severities"][cor]
    assert len(set(key.tolist())) == cor.sum()
    assert cor.sum() == len(set(d["sources"][cor].tolist())) * 10 * 5
    p = mixes["paper"]
    psrc = {s: set(p[s]["sources"][p[s]["types"] > 0].tolist()) for s in p}
    assert len(psrc["train"] & psrc["test"]) > 0   # the seed's protocol leaks source images
    # ... but never the same corrupted image twice: (type, severity, source) is unique across splits
    for m in (p, g):
        keys = torch.cat([m[s]["sources"] * 100 + m[s]["types"] * 10 + m[s]["severities"] for s in m])
        assert len(set(keys.tolist())) == len(keys)


def test_mix_pools_too_small(root, tmp_path):
    with pytest.raises(data.DataError, match="need 300"):
        data.build_mix(root, "paper", cache_dir=False, train_per_class=260, val_per_class=20, test_per_class=20)
    data.write_synthetic(str(tmp_path), train_per_class=100, test_per_class=10)
    with pytest.raises(data.DataError, match="class 0 test sources.* has 10 images.* need 12"):
        data.build_mix(str(tmp_path), "grouped", cache_dir=False, train_per_class=40, val_per_class=10, test_per_class=10)
    with pytest.raises(ValueError, match="multiples of 5"):
        data.build_mix(root, "grouped", cache_dir=False, train_per_class=101)


# --------------------------------------------------------------------------------- loader

def _toy_split(n):
    return {"images": torch.arange(n * 3072, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, 32, 32),
            "labels": torch.arange(n) % 10, "types": torch.arange(n) % 11,
            "severities": torch.arange(n) % 6, "sources": torch.arange(n)}


def test_device_loader_epochs_and_ranks():
    split = _toy_split(103)
    one = data.DeviceLoader(split, 16, "cpu", seed=3)
    assert len(one) == 6
    e0 = torch.cat([b["index"] for b in one])
    assert len(set(e0.tolist())) == 96
    assert torch.equal(e0, torch.cat([b["index"] for b in one]))   # same epoch -> same order
    one.set_epoch(1)
    assert not torch.equal(e0, torch.cat([b["index"] for b in one]))
    for b in one:
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (16, 3, 32, 32)
        assert torch.equal(b["images"], split["images"][b["index"]]) and torch.equal(b["labels"], split["labels"][b["index"]])
    # two ranks: contiguous halves of the same global batches
    ranks = [data.DeviceLoader(split, 16, "cpu", seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    for g, a, b in zip(one, *ranks):
        assert len(a["index"]) == 8 and torch.equal(torch.cat([a["index"], b["index"]]), g["index"])
    full = data.DeviceLoader(split, 16, "cpu", shuffle=False, drop_last=False)
    assert len(full) == 7 and torch.equal(torch.cat([b["index"] for b in full]), torch.arange(103))


# --------------------------------------------------------------------------------- augmentation

def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g), torch.randint(0, 11, (n,), generator=g))


def test_normalize_and_teacher_view():
    x, _, _ = _batch(4)
    mean = torch.tensor(data.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.STD).view(1, 3, 1, 1)
    ref = (x.float() / 255 - mean) / std
    assert torch.allclose(data.normalize(x), ref, atol=1e-5)
    for mode in ("bicubic", "bilinear"):
        up = F.interpolate(x.float(), size=(224, 224), mode=mode, align_corners=False, antialias=False)
        up = up.clamp(0, 255) if mode == "bicubic" else up
        got = data.teacher_view(x, 224, mode)
        assert got.shape == (4, 3, 224, 224) and got.dtype == torch.float32
        assert torch.allclose(got, (up / 255 - mean) / std, atol=1e-5)
    assert data.teacher_view(x, 224, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_flip_against_direct(mode):
    x, _, _ = _batch(20)
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 9, (20,), generator=g), torch.randint(0, 9, (20,), generator=g)
    flip = torch.rand(20, generator=g) < 0.5
    got = data.crop_flip(x, dy, dx, flip, 4, mode)
    padded = F.pad(x.float(), (4, 4, 4, 4), mode=mode).to(torch.uint8)
    for i in range(20):
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(got[i], ref.flip(-1) if flip[i] else ref)


def test_augment_crop_flip_outputs_are_crops():
    x, y, t = _batch(32)
    aug = data.Augment(mixup_prob=0, erase_prob=0)
    out, y2, t2 = aug(x, y, t, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.equal(y2, y) and torch.equal(t2, t)
    padded = data.normalize(F.pad(x, (4, 4, 4, 4)))
    flips = 0
    for i in range(32):
        cands = [(f, a, b) for f in (0, 1) for a in range(9) for b in range(9)
                 if torch.allclose(out[i], padded[i, :, a:a + 32, b:b + 32].flip(-1) if f else padded[i, :, a:a + 32, b:b + 32])]
        assert cands, f"sample {i} is not a crop/flip of its input"
        flips += cands[0][0]
    assert 4 <= flips <= 28


def test_augment_deterministic_with_generator():
    x, y, t = _batch(64)
    aug = data.Augment(mixup_prob=0.5, randaug_ops=2)
    a = aug(x, y, t, torch.Generator().manual_seed(5))
    b = aug(x, y, t, torch.Generator().manual_seed(5))
    c = aug(x, y, t, torch.Generator().manual_seed(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_mixup_targets():
    x, y, t = _batch(64)
    aug = data.Augment(crop_padding=0, flip=False, erase_prob=0, mixup_prob=1.0)
    out, ys, ts = aug(x, y, t, torch.Generator().manual_seed(0))
    assert ys.shape == (64, 10) and ts.shape == (64, 11) and ys.dtype == torch.float32
    assert torch.allclose(ys.sum(1), torch.ones(64)) and torch.allclose(ts.sum(1), torch.ones(64))
    i = int(((y != y.flip(0)) & (t != t.flip(0))).nonzero()[0])
    lam = float(ys[i, y[i]])
    assert abs(float(ts[i, t[i]]) - lam) < 1e-6   # labels and types share lambda
    ref = data.normalize(x) * lam + data.normalize(x.flip(0)) * (1 - lam)
    assert torch.allclose(out, ref, atol=1e-4)
    # with probability 0.3 only some batches mix; unmixed batches keep int64 targets
    aug = data.Augment(mixup_prob=0.3)
    g = torch.Generator().manual_seed(0)
    kinds = [aug(x, y, t, g)[1].dtype for _ in range(40)]
    assert 3 <= kinds.count(torch.float32) <= 22 and torch.int64 in kinds


def test_cutmix_targets():
    x, y, t = _batch(64)
    aug = data.Augment(crop_padding=0, flip=False, erase_prob=0, mixup_prob=0, cutmix_prob=1.0)
    out, ys, ts = aug(x, y, t, torch.Generator().manual_seed(2))
    assert torch.allclose(ys.sum(1), torch.ones(64)) and torch.allclose(ts.sum(1), torch.ones(64))
    same = (out == data.normalize(x)).all(1).float().mean((1, 2))   # fraction of pixels kept
    i = int(((y != y.flip(0)) & (x != x.flip(0)).any()).nonzero()[0])
    assert abs(float(ys[i, y[i]]) - float(same[i])) < 1e-6


def test_random_erasing_areas():
    x, y, t = _batch(400)
    aug = data.Augment(crop_padding=0, flip=False, mixup_prob=0, erase_prob=1.0)
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    diff = (out != data.normalize(x)).any(1)                        # (B, H, W) erased pixels
    erased = 0
    for i in range(400):
        if not diff[i].any():
            continue
        erased += 1
        rows, cols = diff[i].any(1).nonzero()[:, 0], diff[i].any(0).nonzero()[:, 0]
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert diff[i].sum() == h * w                                # one filled rectangle
        assert 0.02 * 1024 * 0.7 <= h * w <= 1024 / 3 * 1.2 and h < 32 and w < 32
        assert 0.3 / 1.6 <= h / w <= 1.6 / 0.3
    assert erased >= 390
    aug = data.Augment(crop_padding=0, flip=False, mixup_prob=0, erase_prob=0.25)
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    frac = (out != data.normalize(x)).flatten(1).any(1).float().mean()
    assert 0.17 <= frac <= 0.33


def test_randaugment_runs_batched():
    x, y, t = _batch(256)
    aug = data.Augment(crop_padding=0, flip=False, mixup_prob=0, erase_prob=0, randaug_ops=2)
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    lo = (0 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
    hi = (1 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
    assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()
    changed = (out - data.normalize(x)).abs().flatten(1).amax(1) > 1e-4
    assert 0.5 <= changed.float().mean() <= 0.95     # p(no op applied twice) = 1/4


def test_randaugment_ops_against_torchvision_and_dispatch():
    import torchvision.transforms.functional as TF
    x, _, _ = _batch(8)
    xf, one = x.float(), torch.ones(8)
    m = 0.9
    f = 1 + 0.9 * m
    refs = {"Invert": TF.invert(x), "Posterize": TF.posterize(x, 8 - int(4 * m)),
            "Solarize": TF.solarize(x, 256 - 256 * m), "Brightness": TF.adjust_brightness(x, f),
            "Color": TF.adjust_saturation(x, f), "Contrast": TF.adjust_contrast(x, f),
            "Sharpness": TF.adjust_sharpness(x, f), "AutoContrast": TF.autocontrast(x)}
    for name, ref in refs.items():
        got = data.RANDAUG_OPS[name](xf, m, one).round()
        assert (got - ref.float()).abs().max() <= 1, name        # uint8 rounding in torchvision
    # the sorted-chunk dispatch equals applying each sample's op to it alone
    g = torch.Generator().manual_seed(0)
    x, _, _ = _batch(40)
    k = torch.randint(0, len(data.RANDAUG_OPS) + 1, (40,), generator=g)
    s = torch.where(torch.rand(40, generator=g) < 0.5, -1.0, 1.0)
    got = data._apply_ops(x.float(), k, s, m)
    fns = list(data.RANDAUG_OPS.values()) + [lambda v, m, s: v]
    for i in range(40):
        assert torch.allclose(got[i], fns[k[i]](x[i:i + 1].float(), m, s[i:i + 1])[0], atol=1e-3)
