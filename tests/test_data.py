"""data.py: readers on synthetic files in the real formats, the mix and the loader. CPU only, no
network. The downloader (test_download.py), the standard split (test_standard_split.py) and the
augmentation itself (test_augment.py) have their own files."""

import itertools
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import data
import download

COUNTS = {"train_per_class": 100, "val_per_class": 20, "test_per_class": 20}  # multiples of 5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("synth"))
    data.write_synthetic(r)  # 250 train / 60 test per class
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
    assert data.read_cifar10(os.path.join(root, "cifar-10-batches-py"))["test_labels"].shape == (
        600,
    )


def _py2_batch_pickle(x, labels):
    """A CIFAR batch pickled the way Python 2 + numpy 1 wrote the real files (protocol 2, str =
    BINSTRING, numpy.core globals), written opcode by opcode."""

    def s(b):
        return (
            (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)
        )

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    n = len(x)
    arr = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        b"cnumpy\nndarray\n"
        + i(0)
        + b"\x85"
        + s(b"b")
        + b"\x87R"
        + b"("
        + i(1)
        + i(n)
        + i(3072)
        + b"\x86"
        + b"cnumpy\ndtype\n"
        + s(b"u1")
        + i(0)
        + i(1)
        + b"\x87R"
        + b"("
        + i(3)
        + s(b"|")
        + b"NNN"
        + b"J\xff\xff\xff\xff" * 2
        + i(0)
        + b"tb"
        + b"\x89"
        + s(x.tobytes())
        + b"tb"
    )
    lab = b"](" + b"".join(i(int(v)) for v in labels) + b"e"
    return (
        b"\x80\x02}("
        + s(b"batch_label")
        + s(b"training batch 1 of 5")
        + s(b"labels")
        + lab
        + s(b"data")
        + arr
        + s(b"filenames")
        + b"]"
        + b"u."
    )


def test_read_python2_style_pickle(tmp_path, root):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, 12)
    p = tmp_path / "data_batch_1"
    p.write_bytes(_py2_batch_pickle(x, y))
    xs, ys = data._read_batch(str(p))
    assert (
        np.array_equal(xs, x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        and ys.tolist() == y.tolist()
    )
    # str keys, numpy 2 pickle
    p.write_bytes(pickle.dumps({"data": x, "labels": y.tolist()}, protocol=5))
    xs, ys = data._read_batch(str(p))
    assert (
        np.array_equal(xs, x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        and ys.tolist() == y.tolist()
    )


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_read_batch_resaved_by_python3_with_old_protocol(root, tmp_path, protocol):
    """Python 3 writes bytes as _codecs.encode(str, 'latin1') below protocol 3 (b'' as bytes())."""
    src = os.path.join(root, "cifar-10-batches-py", "data_batch_2")
    with open(src, "rb") as f:
        obj = pickle.load(f, encoding="bytes")  # our own file, trusted
    obj[b"filenames"][0] = b""
    p = tmp_path / "data_batch_2"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    assert b"_codecs" in p.read_bytes() and b"bytes" in p.read_bytes()
    (x0, y0), (x, y) = data._read_batch(src), data._read_batch(str(p))
    assert x.dtype == x0.dtype and np.array_equal(x, x0) and np.array_equal(y, y0)


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    "payload,needle",
    [
        (lambda m: _Reduce(os.system, f"touch {m}"), "system"),
        # protocol 2: __builtin__
        (lambda m: _Reduce(eval, f"open({str(m)!r}, 'w')"), "builtin__.eval"),
        # protocol 2: commands.Popen
        (lambda m: _Reduce(__import__("subprocess").Popen, ["touch", str(m)]), ".Popen"),
        (lambda m: _Reduce(__import__("_codecs").encode, "abc", "rot13"), "only latin1"),
        (lambda m: _Reduce(__import__("_codecs").encode, 7, "latin1"), "only latin1"),
        (lambda m: _Reduce(__import__("_codecs").decode, b"abc", "latin1"), "_codecs.decode"),
        (lambda m: _Reduce(bytes, 10**10), "bytes() with arguments"),
        (
            lambda m: _Reduce(__import__("_codecs").encode, _Reduce(eval, "1"), "latin1"),
            "builtin__.eval",
        ),
    ],
)
def test_malicious_pickles_are_refused(tmp_path, payload, needle):
    marker = tmp_path / "pwned"
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"labels": [0], b"data": payload(marker)}, protocol=2))
    with pytest.raises(download.DataError) as e:
        data._read_batch(str(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "refusing" in msg and needle in msg, msg
    assert not marker.exists()


def test_read_cifar10c(root):
    test_y = data.read_cifar10(root)["test_labels"]
    x, y = data.read_cifar10c(root, "fog")
    assert isinstance(x, np.memmap) and x.shape == (3000, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.array_equal(y, np.tile(test_y, 5))
    # severity grows the distortion (synthetic texture blend): mean |x_s - clean| increases with s
    clean = data.read_cifar10(root)["test_images"].astype(np.float32)
    d = [np.abs(x[s * 600 : (s + 1) * 600] - clean).mean() for s in range(5)]
    assert all(a < b for a, b in itertools.pairwise(d))
    for name in download.CORRUPTION_FILES:
        assert os.path.exists(os.path.join(root, "CIFAR-10-C", f"{name}.npy"))


def _copy_tree(root, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(os.path.join(root, "cifar-10-batches-py"), dst / "cifar-10-batches-py")
    shutil.copytree(os.path.join(root, "CIFAR-10-C"), dst / "CIFAR-10-C")
    return dst


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("truncate", "not a readable CIFAR-10 pickle"),
        ("shape", "'data' must be a uint8 array"),
        ("labels", "'labels' must be"),
        ("missing", "file not found"),
        ("notdict", "expected a pickled dict"),
    ],
)
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
    with pytest.raises(download.DataError) as e:
        data.read_cifar10(str(d))
    assert str(p) in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("dtype", "expected uint8"),
        ("rows", "expected uint8"),
        ("labels", "tiled 5 times"),
        ("garbage", "not a readable .npy"),
        ("pickled", "not a readable .npy"),
    ],
)
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
    with pytest.raises(download.DataError) as e:
        data.read_cifar10c(str(d.parent), "snow")
    assert str(p) in str(e.value) and needle in str(e.value)


# --------------------------------------------------------------------------------- the mix


@pytest.fixture(scope="module")
def mixes(root):
    return {
        s: data.build_mix(root, s, seed=0, cache_dir=False, **COUNTS) for s in ("paper", "grouped")
    }


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
        counts.index_put_(
            (d["types"], d["labels"]), torch.ones(n, dtype=torch.long), accumulate=True
        )
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
    files = [f for f in os.listdir(cache) if f != ".lock"]  # .lock: one builder at a time
    assert len(files) == 1 and files[0].startswith("mix-grouped-s0-100-20-20-")
    second = data.build_mix(root, "grouped", seed=0, cache_dir=str(cache), **COUNTS)
    assert all(torch.equal(first[s][k], second[s][k]) for s in first for k in first[s])
    assert all(torch.equal(first[s][k], mixes["grouped"][s][k]) for s in first for k in first[s])
    (cache / files[0]).write_bytes(b"damaged")  # a damaged cache is rebuilt, not trusted
    third = data.build_mix(root, "grouped", seed=0, cache_dir=str(cache), **COUNTS)
    assert torch.equal(third["train"]["images"], first["train"]["images"])
    ident = torch.load(cache / files[0], weights_only=True)["identity"]
    assert ident == data.mix_identity(root, "grouped", 0, **COUNTS)  # stored with the mix
    for bad in (
        {"identity": dict(ident, seed=1), "mix": other},  # another mix
        {
            "identity": ident,
            "mix": {s: dict(other[s], labels=other[s]["labels"][1:]) for s in other},
        },
    ):
        torch.save(bad, cache / files[0])
        fourth = data.build_mix(root, "grouped", seed=0, cache_dir=str(cache), **COUNTS)
        assert all(torch.equal(fourth[s][k], first[s][k]) for s in first for k in first[s])


def test_mix_cache_keyed_on_file_content_not_mtime(tmp_path):
    """Files rewritten with other content (same sizes, the old mtimes put back): not the old mix."""
    r = str(tmp_path / "d")
    data.write_synthetic(r, train_per_class=20, test_per_class=10, seed=0)
    args = {"train_per_class": 5, "val_per_class": 1, "test_per_class": 1}
    old = data.build_mix(r, "paper", **args)
    stamps = {
        os.path.join(r, sub, f): os.stat(os.path.join(r, sub, f)).st_mtime_ns
        for sub in (download.CIFAR_DIR, download.CIFARC_DIR)
        for f in os.listdir(os.path.join(r, sub))
    }
    assert len(stamps) == 7 + 20
    data.write_synthetic(r, train_per_class=20, test_per_class=10, seed=1)
    for p, t in stamps.items():
        os.utime(p, ns=(t, t))
    new = data.build_mix(r, "paper", **args)
    fresh = data.build_mix(r, "paper", cache_dir=False, **args)
    assert all(torch.equal(new[s][k], fresh[s][k]) for s in fresh for k in fresh[s])
    assert not torch.equal(new["train"]["labels"], old["train"]["labels"])
    assert len([f for f in os.listdir(os.path.join(r, "cache")) if f.startswith("mix-")]) == 2


def test_grouped_has_no_source_overlap_and_paper_does(mixes):
    g = mixes["grouped"]
    src = {s: set(g[s]["sources"].tolist()) for s in g}
    assert (
        not (src["train"] & src["val"])
        and not (src["train"] & src["test"])
        and not (src["val"] & src["test"])
    )
    # grouped: each corrupted source appears at all 5 severities of every corruption
    d = g["train"]
    cor = d["types"] > 0
    key = d["sources"][cor] * 100 + d["types"][cor] * 10 + d["severities"][cor]
    assert len(set(key.tolist())) == cor.sum()
    assert cor.sum() == len(set(d["sources"][cor].tolist())) * 10 * 5
    p = mixes["paper"]
    psrc = {s: set(p[s]["sources"][p[s]["types"] > 0].tolist()) for s in p}
    assert len(psrc["train"] & psrc["test"]) > 0  # the thesis's protocol leaks source images
    # ... but never the same corrupted image twice: (type, severity, source) is unique across splits
    for m in (p, g):
        keys = torch.cat(
            [m[s]["sources"] * 100 + m[s]["types"] * 10 + m[s]["severities"] for s in m]
        )
        assert len(set(keys.tolist())) == len(keys)


def test_mix_pools_too_small(root, tmp_path):
    with pytest.raises(download.DataError, match="need 300"):
        data.build_mix(
            root, "paper", cache_dir=False, train_per_class=260, val_per_class=20, test_per_class=20
        )
    data.write_synthetic(str(tmp_path), train_per_class=100, test_per_class=10)
    with pytest.raises(download.DataError, match="class 0 test sources.* has 10 images.* need 12"):
        data.build_mix(
            str(tmp_path),
            "grouped",
            cache_dir=False,
            train_per_class=40,
            val_per_class=10,
            test_per_class=10,
        )
    with pytest.raises(ValueError, match="multiples of 5"):
        data.build_mix(root, "grouped", cache_dir=False, train_per_class=101)


# --------------------------------------------------------------------------------- loader


def _toy_split(n):
    return {
        "images": torch.arange(n * 3072, dtype=torch.int64)
        .remainder(251)
        .to(torch.uint8)
        .view(n, 3, 32, 32),
        "labels": torch.arange(n) % 10,
        "types": torch.arange(n) % 11,
        "severities": torch.arange(n) % 6,
        "sources": torch.arange(n),
    }


def test_device_loader_epochs_and_ranks():
    split = _toy_split(103)
    one = data.DeviceLoader(split, 16, "cpu", seed=3)
    assert len(one) == 6
    e0 = torch.cat([b["index"] for b in one])
    assert len(set(e0.tolist())) == 96
    assert torch.equal(e0, torch.cat([b["index"] for b in one]))  # same epoch -> same order
    one.set_epoch(1)
    assert not torch.equal(e0, torch.cat([b["index"] for b in one]))
    for b in one:
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (16, 3, 32, 32)
        assert torch.equal(b["images"], split["images"][b["index"]]) and torch.equal(
            b["labels"], split["labels"][b["index"]]
        )
    # two ranks: contiguous halves of the same global batches
    ranks = [data.DeviceLoader(split, 16, "cpu", seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    for g, a, b in zip(one, *ranks):
        assert len(a["index"]) == 8 and torch.equal(torch.cat([a["index"], b["index"]]), g["index"])
    full = data.DeviceLoader(split, 16, "cpu", shuffle=False, drop_last=False)
    assert len(full) == 7 and torch.equal(torch.cat([b["index"] for b in full]), torch.arange(103))
