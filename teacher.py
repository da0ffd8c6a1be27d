"""The teacher stage of train.py (thesis 4.1): DeiT-III Small, frozen, with a fresh 10-way head.

    ident = teacher.identity(sha256, teacher_args, splits, data_args, resize="bilinear",
                             head_epochs=10, seed=0, amp_dtype=torch.bfloat16)  # cache key
    cache = teacher.build(path, teacher_args, splits, data_args, ident, device, torch.bfloat16)
    logits = teacher.load_logits(cache, ident, splits["train"], device)  # (N_train, 10), checked
    live = teacher.live(path, teacher_args, cache, ident, device)  # full model, fitted head

Top to bottom: the cache's identity, folder and checked readers; (1) features: the frozen
backbone's final-norm class token on the 224px teacher view, once per split, fp16 on disk; (2) the
head: a linear layer fitted on those features with AdamW (thesis 4.1: lr 5e-5, wd 0.05) and label
smoothing 0.1 (the thesis's code), the epoch picked by val accuracy, never test (the thesis's code
augments each batch and stops early on test loss: cached features cannot be augmented, and test
data selects nothing here); (3) logits of every training row, so the student loop reads a table
instead of running a 22M-parameter model at 224px every step; (4) the live teacher, where a table
cannot serve: `--teacher-view augmented` and `--split standard` (fresh corruptions every epoch).
train.py runs `build` on rank 0 while the other ranks wait.


Cache folder (shared by the vit / deit / cdeit runs of one dataset), content-addressed:
  <data root>/cache/teacher-<sha256[:12]>-<split>-s<seed>-<digest of the identity [:16]>/
    features_{train,val,test}.pt  {"identity", "features": (N, 384) fp16, "labels", "sources"}
    teacher_head.pt               the head file read by eval.py --teacher, with the "identity"
    logits_train.pt               {"identity", "logits": (N_train, 10) fp32, "labels", "sources"};
                                  not for split "standard"
The identity is everything a cached number depends on (teacher file and arguments, the mix, the
resize, the head's settings and seed, the autocast dtype). Every file stores it and every reader
compares it, and the labels and sources, with the current mix; a file that does not load, lacks a
field or has the wrong shape is rebuilt, never used. One process builds a folder under
fileio.locked while the others wait and then read it.
"""

import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import data
from augment import teacher_view
from download import DataError
from fileio import atomic_write, locked
from model import create_model, load_teacher

HEAD_LR, HEAD_WD, HEAD_BATCH = 5e-5, 0.05, 256  # thesis 4.1: AdamW 5e-5, wd 0.05; the batch is ours
HEAD_SMOOTHING = 0.1  # the thesis's code (FineTuningModule.train): CE with label_smoothing=0.1
SYNTHETIC_TEACHER = {"depth": 1, "embed_dim": 96, "num_heads": 2}  # deit3_small-shaped, random
# --split standard: the head is fitted on one fixed corrupted draw of the training rows (see build)
STANDARD_DRAW_SEED, DRAW_CHUNK = 7_919, 1024
# changes whenever features, head or logits are computed differently: old folders are not reused
CACHE_VERSION = 3
HEAD_KIND = "cdeit-kit/teacher-head"  # the head file's kind, checked by eval.py


class CacheError(DataError):
    """A teacher cache file is missing, unreadable or malformed; str(e) is one line."""


class CacheMismatch(CacheError):
    """A teacher cache file of another teacher or mix (identity, labels or sources differ)."""


# ----------------------------------------------------------------------------- files and identity


def write_synthetic_teacher(path, seed=0):
    """A random deit3_small-shaped file (1 block, D=96, 1000-way head) for the offline smoke run
    and tests; its metadata names those sizes (model.load_teacher reads them)."""
    from safetensors.torch import save

    torch.manual_seed(seed)
    t = create_model("deit3_small", **SYNTHETIC_TEACHER)
    for n, p in t.named_parameters():  # LayerScale 1, not 1e-6: else every image gives the
        if n.endswith(".gamma"):  # same class token and the head learns nothing
            p.data.fill_(1.0)
    # the sizes travel in the file, so --teacher PATH loads it like the real one
    blob = save(
        {k: v.contiguous() for k, v in t.state_dict().items()},
        metadata={"model_args": json.dumps(SYNTHETIC_TEACHER)},
    )
    atomic_write(path, blob, what="synthetic teacher")


def identity(sha, teacher_args, splits, data_args, resize, head_epochs, seed, amp_dtype):
    """Everything the cached features, head and logits depend on (JSON-able; compared on every
    read): the teacher file's sha256 and arguments, the mix (data.mix_identity and
    data.mix_digest), the resize mode, the head's settings and seed, the autocast dtype."""
    ident = {
        "kind": "cdeit-kit/teacher-cache",
        "version": CACHE_VERSION,
        "teacher_sha256": sha,
        "teacher_args": {k: teacher_args[k] for k in sorted(teacher_args)},
        "resize": resize,
        "head": {
            "epochs": int(head_epochs),
            "lr": HEAD_LR,
            "weight_decay": HEAD_WD,
            "batch": HEAD_BATCH,
            "smoothing": HEAD_SMOOTHING,
            "seed": int(seed),
        },
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
        "mix": dict(data.mix_identity(**data_args), content=data.mix_digest(splits)),
    }
    return json.loads(json.dumps(ident))  # tuples -> lists: equal to what a cache file gives back


def cache_dir(root, ident):
    """The folder named by the identity: a readable prefix and a digest of all of it."""
    m = ident["mix"]
    sha, digest = ident["teacher_sha256"][:12], data.digest(ident)[:16]
    name = f"teacher-{sha}-{m['split']}-s{m['seed']}-{digest}"
    return os.path.join(root, "cache", name)


def read(path, ident, split=None, fields=(), what="teacher cache file"):
    """torch.load a cache file and check that it belongs here: it loads, holds `fields`, carries
    this identity and (with split) the split's labels and sources row for row. Raises CacheError."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise CacheError(f"{path}: {what} not found")
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load: a truncated zip, not a zip, a refused global)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CacheError(f"{path}: unreadable {what} ({type(e).__name__}: {msg[:200]})") from None
    if not isinstance(c, dict) or any(k not in c for k in ("identity", *fields)):
        raise CacheError(
            f"{path}: {what} lacks a field of {('identity', *fields)} (an older or foreign file)"
        )
    if c["identity"] != ident:
        diff = sorted(
            k for k in set(ident) | set(c["identity"]) if ident.get(k) != c["identity"].get(k)
        )
        raise CacheMismatch(
            f"{folder}: the teacher cache was built for another teacher or mix (differs in {diff})"
        )
    if split is not None:
        for k in ("labels", "sources"):
            v = c.get(k)
            if (
                not torch.is_tensor(v)
                or v.shape != split[k].shape
                or not torch.equal(v.long(), split[k])
            ):
                raise CacheMismatch(
                    f"{folder}: the teacher cache's {k} disagree with the current mix "
                    f"({os.path.basename(path)}); it belongs to other images"
                )
    return c


# ----------------------------------------------------------------------------- (1) features


@torch.no_grad()
def features(teacher, images, device, resize, amp_dtype, corrupt_seed=None):
    """Final-norm class token of the teacher on the 224px view (thesis 4.1), fp16 on the CPU.
    corrupt_seed: first corrupt the rows with data.draw_corruptions, in fixed chunks of DRAW_CHUNK
    rows from one generator, so the draw does not depend on the teacher's batch size."""
    bs = 256 if device.type == "cuda" else 64
    out = []
    g = None
    if corrupt_seed is not None:
        g = torch.Generator(device=device)
        g.manual_seed(corrupt_seed)
    for c in range(0, len(images), DRAW_CHUNK):
        chunk = images[c : c + DRAW_CHUNK].to(device)
        if g is not None:
            chunk = data.draw_corruptions(chunk, g)[0]
        for i in range(0, len(chunk), bs):
            x = teacher_view(chunk[i : i + bs], 224, resize)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out.append(teacher.forward_features(x)[:, 0].half().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.half)


# ----------------------------------------------------------------------------- (2) the head


def fit_head(feats, device, epochs, seed):
    """Fit the new 10-way linear head on frozen cached features (thesis 4.1); pick the epoch by val.
    Returns (head, val accuracy, test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    X = {s: feats[s]["features"].to(device).float() for s in feats}
    y = {s: feats[s]["labels"].to(device) for s in feats}
    with torch.random.fork_rng(devices=[]):  # PyTorch's default init, drawn from the fit's seed
        torch.manual_seed(seed)
        head = nn.Linear(X["train"].shape[1], 10).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=HEAD_LR, weight_decay=HEAD_WD)
    acc = lambda s: (head(X[s]).argmax(1) == y[s]).float().mean().item()
    best = (-1.0, None)
    for _ in range(epochs):
        perm = torch.randperm(len(y["train"]), generator=g).to(device)
        for i in range(0, len(perm), HEAD_BATCH):
            idx = perm[i : i + HEAD_BATCH]
            loss = F.cross_entropy(
                head(X["train"][idx]), y["train"][idx], label_smoothing=HEAD_SMOOTHING
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            if acc("val") > best[0]:  # select by val, never test
                best = (acc("val"), {k: v.detach().clone() for k, v in head.state_dict().items()})
    if best[1] is None:  # no epoch, or no val rows to select one by
        raise CacheError(
            f"teacher head: no epoch to select ({epochs} epochs, {len(y['val'])} val rows); "
            "use --head-epochs >= 1 and --val-per-class >= 1"
        )
    head.load_state_dict(best[1])
    with torch.no_grad():
        return head, best[0], acc("test")


# ----------------------------------------------------------------------------- (3) build the cache


def read_features(cache, ident, s, split):
    """features_<s>.pt, checked: this identity, the split's labels and sources, (N, D) floats."""
    c = read(os.path.join(cache, f"features_{s}.pt"), ident, split, ("features",), f"{s} features")
    f = c["features"]
    if (
        not torch.is_tensor(f)
        or f.ndim != 2
        or len(f) != len(split["labels"])
        or not f.is_floating_point()
    ):
        raise CacheError(
            f"{cache}: features_{s}.pt holds {getattr(f, 'shape', type(f).__name__)}, "
            f"expected ({len(split['labels'])}, D) floats"
        )
    return c


def read_head(cache, ident):
    """The fitted head file, checked: this identity, weight (10, D), bias (10,); or CacheError."""
    path = os.path.join(cache, "teacher_head.pt")
    fields = ("kind", "weight", "bias", "val_accuracy", "test_accuracy")
    h = read(path, ident, None, fields, "teacher head")
    w, b = h["weight"], h["bias"]
    if h["kind"] != HEAD_KIND or not (
        torch.is_tensor(w)
        and torch.is_tensor(b)
        and w.ndim == 2
        and w.shape[0] == 10
        and b.shape == (10,)
    ):
        raise CacheError(f"{path}: not a 10-way teacher head (weight (10, D), bias (10,))")
    return h


def load_logits(cache, ident, train, device="cpu"):
    """The cached teacher logits of every training row, (N_train, 10) fp32 on device, after checking
    that the file carries this identity and the current training split's labels and sources."""
    path = os.path.join(cache, "logits_train.pt")
    c = read(path, ident, train, ("logits",), "teacher logits")
    x = c["logits"]
    if (
        not torch.is_tensor(x)
        or x.dtype != torch.float32
        or tuple(x.shape) != (len(train["labels"]), 10)
        or not torch.isfinite(x).all()
    ):
        raise CacheError(
            f"{path}: logits {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}, "
            f"expected finite float32 ({len(train['labels'])}, 10)"
        )
    return x.to(device)


def _complete(cache, ident, splits, standard):
    """The head (written last), the features and, except for split standard, the logits, every
    file checked (eval.py reads the features too); None if any is missing, foreign or damaged."""
    try:
        h = read_head(cache, ident)
        for s in ("train", "val", "test"):
            read_features(cache, ident, s, splits[s])
        if not standard:
            load_logits(cache, ident, splits["train"])
        return h
    except CacheError:
        return None


def build(path, teacher_args, splits, data_args, ident, device, amp_dtype, log=print):
    """Features, head and (except for split "standard") train logits into cache_dir(root, ident);
    keeps whatever is there, belongs to ident and checks out, rebuilds the rest. One process at a
    time per folder (fileio.locked): a second waits, then finds the cache complete and reads it.
    Returns the cache folder.

    split "standard": the training rows are clean and get fresh corruptions every epoch, so there
    is no fixed training image to cache a logit for. The head (a property of the teacher, not of
    an epoch) is fitted on one fixed corrupted draw of the training rows (data.draw_corruptions,
    generator seeded from --seed), which matches the distribution the live teacher then sees
    (clean + the 10 seen types, uniform); val is the split's fixed corrupted val, test the clean
    test set, and the epoch is selected by val as for the other splits."""
    cache = cache_dir(data_args["root"], ident)
    standard = data_args["split"] == "standard"
    resize, head_epochs, seed = ident["resize"], ident["head"]["epochs"], ident["head"]["seed"]

    def cached():
        h = _complete(cache, ident, splits, standard)
        if h is not None:
            log(
                f"teacher: cached head{'' if standard else ' and logits'} in {cache} "
                f"(val {h['val_accuracy']:.2%}, test {h['test_accuracy']:.2%})"
            )
        return h is not None

    # no lock for a complete cache: a read-only data folder works
    if os.path.isdir(cache) and cached():
        return cache

    with locked(cache, log=lambda m: log(f"teacher: {m}")):
        if cached():  # checked again under the lock: maybe another process built it meanwhile
            return cache
        teacher = None
        feats = {}
        for s in ("train", "val", "test"):
            try:
                feats[s] = read_features(cache, ident, s, splits[s])
                continue
            except CacheError as e:
                if os.path.exists(os.path.join(cache, f"features_{s}.pt")):
                    log(f"teacher: rebuilding {s} features: {e}")
            teacher = (
                teacher or load_teacher(path, num_classes=10, **teacher_args).to(device).eval()
            )
            t0 = time.time()
            cs = seed * 1_000_003 + STANDARD_DRAW_SEED if standard and s == "train" else None
            f = features(teacher, splits[s]["images"], device, resize, amp_dtype, corrupt_seed=cs)
            feats[s] = {
                "identity": ident,
                "features": f,
                "labels": splits[s]["labels"].clone(),
                "sources": splits[s]["sources"].clone(),
            }
            atomic_write(
                os.path.join(cache, f"features_{s}.pt"), feats[s], what=f"teacher {s} features"
            )
            log(
                f"teacher: {s} features {tuple(f.shape)} in {time.time() - t0:.1f}s "
                f"({len(f) / max(1e-9, time.time() - t0):.0f} img/s)"
                + (" (one fixed corrupted draw of the training rows)" if cs is not None else "")
            )
        head, val_acc, test_acc = fit_head(feats, device, head_epochs, seed)
        log(
            f"teacher: head fitted ({head_epochs} epochs, AdamW lr {HEAD_LR}, wd {HEAD_WD}, "
            f"smoothing {HEAD_SMOOTHING}): "
            f"val {val_acc:.2%}, test {test_acc:.2%} (thesis 4.1 reports 87.4%)"
        )
        if not standard:
            with torch.no_grad():
                logits = head(feats["train"]["features"].to(device).float()).float().cpu()
            atomic_write(
                os.path.join(cache, "logits_train.pt"),
                {
                    "identity": ident,
                    "logits": logits,
                    "labels": feats["train"]["labels"],
                    "sources": feats["train"]["sources"],
                },
                what="teacher logits",
            )
        # written last: a head file with this identity marks a complete cache
        atomic_write(
            os.path.join(cache, "teacher_head.pt"),
            {
                "kind": HEAD_KIND,
                "version": 1,
                "identity": ident,
                "weight": head.weight.detach().cpu(),
                "bias": head.bias.detach().cpu(),
                "teacher_path": os.path.abspath(path),
                "teacher_sha256": ident["teacher_sha256"],
                "teacher_args": dict(teacher_args),
                "data_args": dict(data_args),
                "resize": resize,
                "val_accuracy": val_acc,
                "test_accuracy": test_acc,
                "head_epochs": head_epochs,
            },
            what="teacher head",
        )
    return cache


# ----------------------------------------------------------------------------- (4) the live teacher


def live(path, teacher_args, cache, ident, device):
    """The full teacher with the fitted head (checked against ident), frozen, on device: input the
    224px view, out logits."""
    h = read_head(cache, ident)
    t = load_teacher(path, num_classes=10, **teacher_args)
    t.head.load_state_dict({"weight": h["weight"], "bias": h["bias"]})
    return t.to(device).eval().requires_grad_(False)
