"""Data: files on disk -> the thesis's 11-type mix -> device tensors -> augmented batches.

Top to bottom:
  1. readers for the real formats (a restricted unpickler, memory-mapped .npy);
  2. writers of the same formats: synthetic images (tests and the offline smoke run), or any
     labelled 32x32 images, with their CIFAR-10-C files rendered by corruptions.py;
  3. the mixes, cached on disk: the thesis's 11-type mix (thesis 3.4), a leak-free variant, and the
     standard robustness protocol (CIFAR-10 training images, corrupted on the device by
     corruptions.py, tested on the real CIFAR-10-C files);
  4. DeviceLoader: the whole split on the device as uint8, batches are slices of a randperm
     (airbench style, no DataLoader workers).

Augmentation (crop / flip / RandAugment / Random Erasing / Mixup / CutMix, normalize, the
teacher's 224px view) is augment.py's job; fetching the files (resume, checksums, safe extraction,
the offline error) is download.py's.
Facts (URLs, checksums, layouts): ../shared/reference/data-formats.md.
Command line: `python data.py --data-dir ./data` downloads what is missing (as download.py does);
`python data.py --data-dir ./data --synthetic` writes small synthetic files instead.
"""

import hashlib
import importlib
import json
import math
import os
import pickle
import sys

import numpy as np
import torch

import corruptions
import download as _download
from download import CIFAR_DIR, CIFAR_FILES, CIFARC_DIR, CORRUPTION_FILES, DataError
from fileio import atomic_write, locked

# thesis 3.4: clean + the 10 training corruptions; the index is the corruption-token target
TYPES = ["clean"] + corruptions.SEEN
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------------
# 1. Readers

# What a CIFAR-10 batch pickle may reference: numpy's array reconstruction, nothing else
# (dicts, lists, bytes and str are pickle opcodes, not globals).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _latin1_bytes(path):
    """Python 3 pickles bytes with protocol < 3 as _codecs.encode(str, "latin1") (b"" as bytes()):
    a file re-saved that way gets these stand-ins, which turn a str into bytes and run nothing."""

    def encode(text, encoding=None):
        if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
            raise DataError(
                f"refusing to unpickle _codecs.encode({type(text).__name__}, {encoding!r:.20}) in "
                f"{path}: only latin1 str -> bytes is allowed"
            )
        return text.encode("latin1")

    def empty(*args):
        if args:
            raise DataError(
                f"refusing to unpickle bytes() with arguments in {path}: only b'' is allowed"
            )
        return b""

    return encode, empty


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f, encoding="bytes")  # Python 2 str -> bytes
        self.path = path

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes(self.path)[0]
        if (module, name) in (("builtins", "bytes"), ("__builtin__", "bytes")):
            return _latin1_bytes(self.path)[1]
        if (module, name) not in _NUMPY_GLOBALS:
            raise DataError(f"refusing to unpickle {module}.{name} in {self.path}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 moved it
        return getattr(importlib.import_module(module), name)


def _unpickle(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (a damaged pickle raises any type: one line instead)
        raise DataError(
            f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path):
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: missing key 'data' or 'labels' (has {sorted(d)})")
    x, y = d["data"], np.asarray(d["labels"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(
            f"{path}: 'data' must be a uint8 array (N, 3072), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    if (
        y.shape != (len(x),)
        or y.dtype.kind not in "iu"
        or (len(y) and (y.min() < 0 or y.max() > 9))
    ):
        raise DataError(
            f"{path}: 'labels' must be {len(x)} integers in 0..9, got {y.dtype} {y.shape}"
        )
    # rows are 1024 R, 1024 G, 1024 B, each 32x32 row-major -> HWC
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def _sub(root, name):
    return os.path.join(root, name) if os.path.isdir(os.path.join(root, name)) else root


def read_cifar10(root):
    """root: the data folder (holding cifar-10-batches-py/) or that folder itself."""
    d = _sub(root, CIFAR_DIR)
    parts = [_read_batch(os.path.join(d, f"data_batch_{i}")) for i in range(1, 6)]
    test_x, test_y = _read_batch(os.path.join(d, "test_batch"))
    return {
        "train_images": np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
        "train_labels": np.concatenate([p[1] for p in parts]),
        "test_images": np.ascontiguousarray(test_x),
        "test_labels": test_y,
    }


def _load_npy(path, mmap):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 (a damaged .npy raises any type: one line instead)
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None


def read_cifar10c(root, name, test_labels=None):
    """(images, labels) of CIFAR-10-C/<name>.npy: images memory-mapped (5n, 32, 32, 3) uint8, rows
    (s-1)*n..s*n = severity s of test image 0..n-1; labels int64 (5n,). Validated against the
    CIFAR-10 test set (n = its length) read from root unless test_labels is given."""
    if test_labels is None:
        test_labels = _read_batch(os.path.join(_sub(root, CIFAR_DIR), "test_batch"))[1]
    d = _sub(root, CIFARC_DIR)
    n = len(test_labels)
    path, lpath = os.path.join(d, f"{name}.npy"), os.path.join(d, "labels.npy")
    x, y = _load_npy(path, True), _load_npy(lpath, False)
    if x.dtype != np.uint8 or x.shape != (5 * n, 32, 32, 3):
        raise DataError(f"{path}: expected uint8 (5*{n}, 32, 32, 3), got {x.dtype} {x.shape}")
    if y.shape != (5 * n,) or y.dtype.kind not in "iu":
        raise DataError(f"{lpath}: expected {5 * n} integer labels, got {y.dtype} {y.shape}")
    if not np.array_equal(y, np.tile(test_labels, 5)):
        raise DataError(f"{lpath}: labels are not the CIFAR-10 test labels tiled 5 times")
    return x, y.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# 2. Synthetic files in the exact on-disk formats


def write_synthetic(root, train_per_class=250, test_per_class=60, seed=0):
    """Write cifar-10-batches-py/ and CIFAR-10-C/ (19 corruptions + labels.npy) in the real layout,
    small. Class c = a class colour + oriented stripes + noise (a tiny ViT learns it in a minute);
    corruption k at severity s = a fixed per-name texture blended in with strength growing with s
    (not the real corruptions: just learnable by a corruption token)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    templ = np.empty((10, 32, 32, 3), np.float32)
    for c in range(10):
        ang, freq = math.pi * c / 10, 2 + (c % 3)
        stripes = np.sin(2 * math.pi * freq * (xx * math.cos(ang) + yy * math.sin(ang)) / 32)
        templ[c] = 128 + 60 * rng.uniform(-1, 1, 3) + 45 * stripes[..., None]

    def images(labels):
        noise = rng.integers(-30, 31, (len(labels), 32, 32, 3), dtype=np.int16)
        return np.clip(templ[labels].astype(np.int16) + noise, 0, 255).astype(np.uint8)

    train_y = rng.permutation(np.repeat(np.arange(10), train_per_class))
    test_y = rng.permutation(np.repeat(np.arange(10), test_per_class))
    train_x, test_x = images(train_y), images(test_y)
    write_cifar(root, train_x, train_y, test_x, test_y, filename="synthetic_{}.png")

    dc = os.path.join(root, CIFARC_DIR)
    os.makedirs(dc, exist_ok=True)
    # noise bank: reused, rolled per severity
    bank = rng.integers(-12, 13, test_x.shape, dtype=np.int8).astype(np.int16)
    lut = {s: (np.arange(256) * (0.85 - 0.1 * s)).astype(np.int16) for s in range(1, 6)}  # x(1-a)
    for name in CORRUPTION_FILES:
        tex = np.kron(rng.uniform(-1, 1, (4, 4, 3)), np.ones((8, 8, 1)))
        out = np.empty((5 * len(test_x), 32, 32, 3), np.uint8)
        for s in range(1, 6):
            a = 0.15 + 0.1 * s  # severity -> blend strength of the texture
            img = lut[s][test_x] + ((128 + 120 * tex) * a).astype(np.int16)
            if "noise" in name:
                img += s * np.roll(bank, s, axis=0)
            np.clip(img, 0, 255, out=img)
            out[(s - 1) * len(test_x) : s * len(test_x)] = img
        _save_npy(os.path.join(dc, f"{name}.npy"), out, "synthetic CIFAR-10-C file")
    labels = np.tile(test_y, 5).astype(np.uint8)
    _save_npy(os.path.join(dc, "labels.npy"), labels, "synthetic CIFAR-10-C labels")


def _save_npy(path, array, what):
    atomic_write(path, lambda f: np.save(f, array), what=what)


def write_cifar(root, train_x, train_y, test_x, test_y, filename="image_{}.png"):
    """cifar-10-batches-py/ in the real layout from any labelled images (N,32,32,3) uint8, labels
    0..9: data_batch_1..5 (the training images split in 5), test_batch and batches.meta."""
    for x, y in ((train_x, train_y), (test_x, test_y)):
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or len(y) != len(x):
            raise ValueError(
                f"images must be uint8 (N, 32, 32, 3) with N labels, got {x.dtype} {x.shape}, "
                f"{len(y)}"
            )
    d = os.path.join(root, CIFAR_DIR)
    os.makedirs(d, exist_ok=True)

    def batch(path, x, y, label):
        # CHW rows like the real files; bytes keys, as Python 2 pickles load with encoding='bytes'
        obj = {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in y],
            b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072)),
            b"filenames": [filename.format(i).encode() for i in range(len(x))],
        }
        atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4), what="CIFAR-10 batch")

    for i, (xs, ys) in enumerate(zip(np.array_split(train_x, 5), np.array_split(train_y, 5))):
        batch(os.path.join(d, f"data_batch_{i + 1}"), xs, ys, f"training batch {i + 1} of 5")
    batch(os.path.join(d, "test_batch"), test_x, test_y, "testing batch 1 of 1")
    meta = {
        b"label_names": [c.encode() for c in CLASSES],
        b"num_cases_per_batch": len(test_x),
        b"num_vis": 3072,
    }
    path = os.path.join(d, "batches.meta")
    atomic_write(path, lambda f: pickle.dump(meta, f, protocol=4), what="CIFAR-10 meta")


def write_cifar10c(root, names=None, seed=0):
    """CIFAR-10-C/<name>.npy and labels.npy in the real layout, rendered by corruptions.py from
    root's test_batch (any CIFAR-format test set): rows (s-1)*n..s*n = severity s of test image
    0..n-1. names: default the 15 benchmark corruptions (what download.py looks for)."""
    test_x, test_y = _read_batch(os.path.join(root, CIFAR_DIR, "test_batch"))
    x, g = torch.from_numpy(np.ascontiguousarray(test_x)), torch.Generator().manual_seed(seed)
    dc = os.path.join(root, CIFARC_DIR)
    os.makedirs(dc, exist_ok=True)
    for name in names or corruptions.CORRUPTIONS:
        out = torch.cat([corruptions.corrupt(x, name, s, generator=g) for s in range(1, 6)]).numpy()
        _save_npy(os.path.join(dc, f"{name}.npy"), out, "CIFAR-10-C file")
    labels = np.tile(test_y, 5).astype(np.uint8)
    _save_npy(os.path.join(dc, "labels.npy"), labels, "CIFAR-10-C labels")


# ----------------------------------------------------------------------------------------------
# 3. The mixes

# Changes whenever the sampling or the cache's identity does, so a stale cache is never reused.
MIX_VERSION = 3
_BLOCKS, _BLOCK = 16, 1 << 16  # files_identity reads 16 blocks of 64 KiB per file


def files_identity(root, split):
    """What the mix reads, by content: {file name: "size:digest"}, the digest a sha256 of 16 evenly
    spaced 64 KiB blocks (first and last included). About 1 MB read per file instead of hashing
    1.7 GB; a rewritten file changes it whatever its mtime, and a copied data folder keeps its
    caches. The standard split reads no CIFAR-10-C file, but corruptions.py makes its val set, so
    that file is hashed whole."""
    out = {}
    paths = [os.path.join(_sub(root, CIFAR_DIR), f) for f in CIFAR_FILES[:6]]
    if split == "standard":
        with open(corruptions.__file__, "rb") as f:
            out["corruptions.py"] = hashlib.sha256(f.read()).hexdigest()[:16]
    else:
        paths += [os.path.join(_sub(root, CIFARC_DIR), f"{n}.npy") for n in TYPES[1:] + ["labels"]]
    for p in paths:
        if not os.path.isfile(p):
            out[os.path.basename(p)] = "missing"
            continue
        h, size = hashlib.sha256(), os.path.getsize(p)
        with open(p, "rb") as f:
            for k in range(_BLOCKS):
                f.seek(max(0, size - _BLOCK) * k // (_BLOCKS - 1))
                h.update(f.read(_BLOCK))
        out[os.path.basename(p)] = f"{size}:{h.hexdigest()[:16]}"
    return out


def _counts(split, train_per_class, val_per_class, test_per_class):
    """Per-class (train, val, test) counts as build_mix uses them (val default; test 0 for
    standard)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if val_per_class is None:
        val_per_class = 500 if split == "standard" else 200
    counts = (
        int(train_per_class),
        int(val_per_class),
        0 if split == "standard" else int(test_per_class),
    )
    if min(counts) < 0 or (split == "grouped" and any(c % 5 for c in counts)):
        raise ValueError(
            f"per-class counts {counts} must be >= 0 (and multiples of 5 for 'grouped')"
        )
    return counts


def mix_identity(root, split="paper", seed=0, train_per_class=4500, val_per_class=None,
                 test_per_class=200):
    """Everything a mix depends on (build_mix's arguments and defaults): stored in its cache and in
    the teacher cache's identity, and compared when either is read."""
    counts = _counts(split, train_per_class, val_per_class, test_per_class)
    return {
        "kind": "cdeit-kit/mix",
        "version": MIX_VERSION,
        "split": split,
        "seed": int(seed),
        "counts": list(counts),
        "files": files_identity(root, split),
    }


def digest(obj):
    """sha256 of a JSON-able identity (sorted keys): the tag in cache file and folder names."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def mix_digest(mix):
    """{split: sha256 of its labels, types, severities, sources and a strided sample of ~4,096 image
    rows}: what a teacher cache is checked against. Cheap (a few MB hashed for 495,000 rows)."""
    out = {}
    for s in sorted(mix):
        d, h = mix[s], hashlib.sha256()
        for k in ("labels", "types", "severities", "sources"):
            h.update(k.encode() + str(tuple(d[k].shape)).encode())
            h.update(d[k].to(torch.int64).contiguous().numpy().tobytes())
        img = d["images"]
        h.update(
            str(tuple(img.shape)).encode()
            + img[:: max(1, len(img) // 4096)].contiguous().numpy().tobytes()
        )
        out[s] = h.hexdigest()
    return out


def _check_mix(mix):
    """Why a loaded mix is unusable (one line), or None: its splits, fields, dtypes and shapes."""
    if not isinstance(mix, dict) or sorted(mix) != ["test", "train", "val"]:
        return "not a mix (expected the splits train, val, test)"
    keys = ("images", "labels", "types", "severities", "sources")
    for s, d in mix.items():
        if not isinstance(d, dict) or any(not torch.is_tensor(d.get(k)) for k in keys):
            return f"split {s} lacks one of {keys}"
        n, img = len(d["labels"]), d["images"]
        if img.dtype != torch.uint8 or tuple(img.shape) != (n, 3, 32, 32):
            return (
                f"split {s}: images {img.dtype} {tuple(img.shape)}, expected uint8 ({n}, 3, 32, 32)"
            )
        if any(d[k].dtype != torch.int64 or tuple(d[k].shape) != (n,) for k in keys[1:]):
            return f"split {s}: labels/types/severities/sources are not {n} int64 values each"
        if n and (
            d["labels"].min() < 0
            or d["labels"].max() > 9
            or d["types"].min() < 0
            or d["types"].max() >= len(TYPES)
        ):
            return f"split {s}: labels or types out of range"
    return None


def _read_mix_cache(path, ident, quiet=False):
    """The cached mix if the file loads, holds this identity and is well formed; else None, the
    reason printed on one line (a damaged or foreign cache is rebuilt, never trusted)."""
    if not os.path.exists(path):
        return None
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a damaged cache raises any type: it is rebuilt)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"unreadable ({type(e).__name__}: {msg[:200]})"
    else:
        if not isinstance(c, dict) or c.get("identity") != ident:
            why = "built from other files or settings"
        else:
            why = _check_mix(c.get("mix"))
            if why is None:
                return c["mix"]
    if not quiet:
        print(f"data: rebuilding the mix cache {path}: {why}", file=sys.stderr)
    return None


TEST_SOURCE = 50000  # source id of CIFAR-10 test image j is 50000 + j, whatever the file sizes


def _take(pool, counts, rng, what):
    if len(pool) < sum(counts):
        raise DataError(
            f"{what}: the pool has {len(pool)} images, the requested split counts "
            f"{counts} need {sum(counts)}; use smaller per-class counts"
        )
    pool = rng.permutation(pool)
    cuts = np.cumsum(counts)
    return pool[: cuts[0]], pool[cuts[0] : cuts[1]], pool[cuts[1] : cuts[2]]


SPLITS = ("paper", "grouped", "standard")


def build_mix(root, split="paper", seed=0, train_per_class=4500, val_per_class=None,
              test_per_class=200, cache_dir=None):
    """{"train", "val", "test"} -> {images (N,3,32,32) uint8, labels, types (index into TYPES),
    severities (0 clean, 1..5), sources (CIFAR-10 train image i -> i, test image j -> 50000 + j)}.

    split (the splits are described in docs/): "paper", the thesis's 11-type mix (thesis 3.4; its
    corrupted test images share sources across train / val / test); "grouped", the same without
    shared sources (counts multiples of 5); "standard", clean CIFAR-10 training rows that the
    training loop corrupts every epoch (draw_corruptions), val corrupted once, test the clean
    CIFAR-10 test set (test_per_class ignored). Counts are per class, and per type for paper and
    grouped; val_per_class defaults to 200, or 500 for standard. seed: the random seed of every
    draw. Cached in cache_dir (default <root>/cache; False: none) under mix_identity, compared on
    read (a damaged or foreign cache is rebuilt); one process builds it while the others wait."""
    counts = _counts(split, train_per_class, val_per_class, test_per_class)
    if cache_dir is False:
        return _build(root, split, seed, counts)
    cache_dir = cache_dir or os.path.join(root, "cache")
    ident = mix_identity(root, split, seed, *counts)
    tag = "-".join(map(str, counts[:2] if split == "standard" else counts))
    path = os.path.join(cache_dir, f"mix-{split}-s{seed}-{tag}-{digest(ident)[:12]}.pt")
    mix = _read_mix_cache(path, ident, quiet=True)  # no lock to read: a read-only data folder works
    if mix is not None:
        return mix
    with locked(cache_dir, log=lambda m: print(f"data: {m}", file=sys.stderr)):
        mix = _read_mix_cache(path, ident)  # built by another process while this one waited?
        if mix is None:
            mix = _build(root, split, seed, counts)
            atomic_write(path, {"identity": ident, "mix": mix}, what="mix cache")
    return mix


def _build(root, split, seed, counts):
    if split == "standard":
        return _standard_mix(root, seed, counts[:2])
    return _thesis_mix(root, split, seed, counts)


def _thesis_mix(root, split, seed, counts):
    """The thesis's 11-type mix ("paper" or "grouped"; see build_mix). Clean rows come from
    CIFAR-10's training set in both splits (the thesis does not say where; this keeps clean
    train / val / test disjoint). "paper": each (corruption, class) pool is the 5 severities x
    that class's test images; "grouped": each class's test images are partitioned once into
    train / val / test sources, each used at all 5 severities."""
    rng = np.random.default_rng(seed)
    cifar = read_cifar10(root)
    tr_y, te_y = cifar["train_labels"], cifar["test_labels"]
    n_te = len(te_y)
    if len(tr_y) > TEST_SOURCE:
        raise DataError(
            f"{root}: {len(tr_y)} training images; source ids assume at most {TEST_SOURCE}"
        )
    out = {
        s: {k: [] for k in ("images", "labels", "types", "severities", "sources")}
        for s in ("train", "val", "test")
    }

    def add(split_name, images, labels, t, sev, src):
        d = out[split_name]
        d["images"].append(images)
        d["labels"].append(labels)
        d["types"].append(np.full(len(labels), t))
        d["severities"].append(sev)
        d["sources"].append(src)

    # clean (type 0): CIFAR-10 training images, per class
    picks = [
        _take(np.flatnonzero(tr_y == c), counts, rng, f"clean class {c} (CIFAR-10 train)")
        for c in range(10)
    ]
    for i, s in enumerate(("train", "val", "test")):
        idx = np.sort(np.concatenate([p[i] for p in picks]))
        add(s, cifar["train_images"][idx], tr_y[idx], 0, np.zeros(len(idx), np.int64), idx)

    # grouped: one partition of each class's test images, shared by every corruption
    if split == "grouped":
        sources = [k // 5 for k in counts]  # each source image is used at all 5 severities
        what = "test sources (CIFAR-10 test)"
        groups = [
            _take(np.flatnonzero(te_y == c), sources, rng, f"class {c} {what}")
            for c in range(10)
        ]
    tiled = np.tile(te_y, 5)
    for t, name in enumerate(TYPES[1:], start=1):
        x, _ = read_cifar10c(root, name, te_y)
        if split == "paper":  # any rows (s-1)*n + j of class c: 5 severities x its test images
            picks = [
                _take(np.flatnonzero(tiled == c), counts, rng, f"{name} class {c} (CIFAR-10-C)")
                for c in range(10)
            ]
        else:  # every severity of the class's sources in that split
            picks = [
                [(np.arange(5)[:, None] * n_te + g[i][None, :]).ravel() for i in range(3)]
                for g in groups
            ]
        for i, s in enumerate(("train", "val", "test")):
            rows = np.sort(np.concatenate([p[i] for p in picks]))  # sorted reads of the memmap
            src = rows % n_te
            add(s, np.asarray(x[rows]), te_y[src], t, rows // n_te + 1, TEST_SOURCE + src)
        del x
    mix = {}
    for s, d in out.items():  # concatenate one field at a time, freeing the pieces as we go
        mix[s] = {
            k: torch.from_numpy(np.concatenate(d.pop(k)).astype(np.int64, copy=False))
            for k in ("labels", "types", "severities", "sources")
        }
        mix[s]["images"] = (
            torch.from_numpy(np.concatenate(d.pop("images"))).permute(0, 3, 1, 2).contiguous()
        )
    return mix


def _clean_split(images_hwc, labels, sources):
    n = len(labels)
    return {
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "types": torch.zeros(n, dtype=torch.int64),
        "severities": torch.zeros(n, dtype=torch.int64),
        "sources": torch.from_numpy(sources.astype(np.int64)),
        "images": torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous(),
    }


def _val_generator(seed):
    """The standard split's fixed val draw: its own stream, derived from the seed by a hash, so it
    cannot coincide with a training loop's generator seeded from (seed, epoch, rank)."""
    h = hashlib.sha256(f"standard-val/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)


def _standard_mix(root, seed, counts):
    """The standard robustness split (see build_mix); counts = (train, val) per class."""
    rng = np.random.default_rng(seed)
    cifar = read_cifar10(root)
    tr_y, te_y = cifar["train_labels"], cifar["test_labels"]
    if len(tr_y) > TEST_SOURCE:
        raise DataError(
            f"{root}: {len(tr_y)} training images; source ids assume at most {TEST_SOURCE}"
        )
    picks = [
        _take(np.flatnonzero(tr_y == c), (*counts, 0), rng, f"class {c} (CIFAR-10 train)")
        for c in range(10)
    ]
    mix = {}
    for i, s in enumerate(("train", "val")):
        idx = np.sort(np.concatenate([p[i] for p in picks]))
        mix[s] = _clean_split(cifar["train_images"][idx], tr_y[idx], idx)
    val = mix["val"]  # corrupted once, here, on the CPU: a fixed draw, the same every epoch
    val["images"], val["types"], val["severities"] = draw_corruptions(
        val["images"], _val_generator(seed)
    )
    mix["test"] = _clean_split(cifar["test_images"], te_y, TEST_SOURCE + np.arange(len(te_y)))
    return mix


def draw_corruptions(images, generator=None):
    """Per sample, a training corruption drawn afresh: (images, types, severities), all on the
    images' device; images uint8 (B,3,32,32) or (B,32,32,3), returned in the same shape.
    The type is uniform over the 11 training types (clean and the thesis's 10, 1/11 each: the type
    balance of the thesis's mix, thesis 3.4), then, for a corruption, the severity uniform in 1..5
    (severity 0 for clean). Uniform over the 51 (type, severity) pairs would instead make clean
    only 1/51 of the samples. Applied with corruptions.corrupt_batch on the images' device.
    Deterministic for the generator: the draws come from it (on its device, as corruptions.py
    draws) and so do the corruptions' own random numbers; None uses the global RNG."""
    B, dev = images.shape[0], images.device
    gdev = generator.device if generator is not None else dev
    types = torch.randint(0, len(TYPES), (B,), generator=generator, device=gdev).to(dev)
    sev = torch.randint(1, 6, (B,), generator=generator, device=gdev).to(dev)
    sev = torch.where(types == 0, torch.zeros_like(sev), sev)
    try:
        out = corruptions.corrupt_batch(images, types, sev, generator)
    except corruptions.CorruptionError as e:  # e.g. frost without imagecorruptions: say what to do
        raise DataError(f"draw_corruptions: {e}") from None
    return out, types, sev


# ----------------------------------------------------------------------------------------------
# 4. The loader: the split lives on the device, batches are slices of a permutation (airbench)


class DeviceLoader:
    """Yields {images (b,3,32,32) uint8, labels, types, severities, sources, index} on `device`.
    batch_size is the global batch; under DDP every rank draws the same permutation (generator
    seeded with (seed, epoch)) and takes its contiguous slice b = batch_size // world_size of each
    global batch, so the ranks together see each sample at most once per epoch. `index` holds row
    numbers into the split (for cached teacher logits). Without drop_last the last, short global
    batch is split as evenly as tensor_split does (a rank may get fewer rows, even none)."""

    def __init__(
        self, split, batch_size, device, shuffle=True, drop_last=True, seed=0, rank=0, world_size=1
    ):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.device = torch.device(device)
        keys = ("images", "labels", "types", "severities", "sources")
        self.data = {k: split[k].to(self.device) for k in keys if k in split}  # once, uint8 images
        self.n = len(self.data["images"])
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g, device=self.device)
        else:
            perm = torch.arange(self.n, device=self.device)
        b = self.batch_size // self.world_size
        for step in range(len(self)):
            glob = perm[step * self.batch_size : (step + 1) * self.batch_size]
            if len(glob) == self.batch_size:
                idx = glob[self.rank * b : (self.rank + 1) * b]
            else:
                idx = glob.tensor_split(self.world_size)[self.rank]
            batch = {k: v.index_select(0, idx) for k, v in self.data.items()}  # row copies
            batch["index"] = idx
            yield batch


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    """download.py's command line, plus --synthetic."""
    ap = _download.parser(
        "Fetch CIFAR-10, CIFAR-10-C and the DeiT-III teacher into --data-dir "
        "(or, with --synthetic, write small synthetic files in the same formats)."
    )
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="write small synthetic files instead (offline smoke runs)",
    )
    args = ap.parse_args(argv)
    if not args.synthetic:
        return _download.run(args)
    try:
        write_synthetic(args.data_dir)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote synthetic CIFAR-10 / CIFAR-10-C files into {args.data_dir}")


if __name__ == "__main__":
    main()
