"""The teacher stage of train.py (seed 4.1): DeiT-III Small, frozen, with a fresh 10-way head.

    cache = teacher.build(path, teacher_args, splits, data_args, resize="bicubic", head_epochs=10,
                          seed=0, device=device, amp_dtype=torch.bfloat16)
    logits = teacher.load_logits(cache)            # (N_train, 10), indexed by DeviceLoader's `index`
    live = teacher.live(path, teacher_args, cache, device)   # the full model with the fitted head

Top to bottom: file helpers; the cache folder and its key; (1) features: the frozen backbone's
final-norm class token on the 224px teacher view, once per split, fp16 on disk; (2) the head: a
linear layer fitted on those cached features with AdamW (seed 4.1: lr 5e-5, wd 0.05, no
augmentation), the epoch picked by val accuracy, never test; (3) logits of every training row,
cached, so the student loop reads a table instead of running a 22M-parameter model at 224px every
step; (4) the live teacher, for the two cases where a table cannot serve: `--teacher-view augmented`
(the teacher sees the student's augmented batch) and `--split standard` (fresh corruptions every
epoch). One process; train.py runs `build` on rank 0 while the other ranks wait.

Cache folder (shared by the vit / deit / cdeit runs of one dataset):
  <data root>/cache/teacher-<sha256[:16]>-<split>-s<seed>-<train>-<val>-<test>-<resize>/
    features_{train,val,test}.pt  {"features": (N, 384) fp16, "labels": (N,)}
    teacher_head.pt               the head file of contracts.md (read by eval.py --teacher)
    logits_train.pt               {"logits": (N_train, 10) fp32, "labels"}; not for split "standard"
"""
import contextlib
import hashlib
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import create_model, load_teacher

HEAD_LR, HEAD_WD, HEAD_BATCH = 5e-5, 0.05, 256  # seed 4.1: AdamW 5e-5, wd 0.05, no augmentation
SYNTHETIC_TEACHER = dict(depth=1, embed_dim=96, num_heads=2)  # deit3_small-shaped, random weights
# --split standard: the head is fitted on one fixed corrupted draw of the training rows (see build)
STANDARD_DRAW_SEED, DRAW_CHUNK = 7_919, 1024


# ----------------------------------------------------------------------------- files

def atomic_save(obj, path):
    """Write to a temp file, flush + fsync, then rename: a crash leaves the old file intact.
    A str is written as text (config.json, summary.csv), anything else with torch.save."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w" if isinstance(obj, str) else "wb") as f:
            f.write(obj) if isinstance(obj, str) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_synthetic_teacher(path, seed=0):
    """A random deit3_small-shaped file (1 block, D=96, 1000-way head) for the offline smoke run
    and tests; its metadata names those sizes (model.load_teacher reads them)."""
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    t = create_model("deit3_small", **SYNTHETIC_TEACHER)
    for n, p in t.named_parameters():  # LayerScale 1, not 1e-6: else every image gives the
        if n.endswith(".gamma"):       # same class token and the head learns nothing
            p.data.fill_(1.0)
    # the sizes travel in the file, so --teacher PATH loads it like the real one
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, path + ".tmp",
              metadata={"model_args": json.dumps(SYNTHETIC_TEACHER)})
    os.replace(path + ".tmp", path)


def cache_dir(path, data_args, resize, sha=None):
    """Keyed by the teacher file's hash, the split, seed, per-class counts and resize mode (issue 4):
    anything that changes a cached number changes the folder."""
    sha = sha or sha256_file(path)
    d = data_args
    counts = f"{d['train_per_class']}-{d['val_per_class']}-{d['test_per_class']}"
    return os.path.join(d["root"], "cache", f"teacher-{sha[:16]}-{d['split']}-s{d['seed']}-{counts}-{resize}")


# ----------------------------------------------------------------------------- (1) features

@torch.no_grad()
def features(teacher, images, device, resize, amp_dtype, corrupt_seed=None):
    """Final-norm class token of the teacher on the 224px view (seed 4.1), fp16 on the CPU.
    corrupt_seed: first corrupt the rows with data.draw_corruptions, in fixed chunks of DRAW_CHUNK
    rows from one generator, so the draw does not depend on the teacher's batch size."""
    bs = 256 if device.type == "cuda" else 64
    out = []
    g = None
    if corrupt_seed is not None:
        g = torch.Generator(device=device)
        g.manual_seed(corrupt_seed)
    for c in range(0, len(images), DRAW_CHUNK):
        chunk = images[c:c + DRAW_CHUNK].to(device)
        if g is not None:
            chunk = data.draw_corruptions(chunk, g)[0]
        for i in range(0, len(chunk), bs):
            x = data.teacher_view(chunk[i:i + bs], 224, resize)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out.append(teacher.forward_features(x)[:, 0].half().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.half)


# ----------------------------------------------------------------------------- (2) the head

def fit_head(feats, device, epochs, seed):
    """Fit the new 10-way linear head on frozen cached features (seed 4.1); pick the epoch by val.
    Returns (head, val accuracy, test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    X = {s: feats[s]["features"].to(device).float() for s in feats}
    y = {s: feats[s]["labels"].to(device) for s in feats}
    head = nn.Linear(X["train"].shape[1], 10).to(device)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=HEAD_LR, weight_decay=HEAD_WD)
    acc = lambda s: (head(X[s]).argmax(1) == y[s]).float().mean().item()  # noqa: E731
    best = (-1.0, None)
    for _ in range(epochs):
        perm = torch.randperm(len(y["train"]), generator=g).to(device)
        for i in range(0, len(perm), HEAD_BATCH):
            idx = perm[i:i + HEAD_BATCH]
            loss = F.cross_entropy(head(X["train"][idx]), y["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            if acc("val") > best[0]:  # select by val, never test
                best = (acc("val"), {k: v.detach().clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[1])
    with torch.no_grad():
        return head, best[0], acc("test")


# ----------------------------------------------------------------------------- (3) build the cache

def build(path, teacher_args, splits, data_args, resize, head_epochs, seed, device, amp_dtype, log=print,
          sha=None):
    """Features, head and (except for split "standard") train logits into cache_dir(...); reuses
    whatever is there and valid. Returns the cache folder.

    split "standard": the training rows are clean and get fresh corruptions every epoch, so there
    is no fixed training image to cache a logit for. The head (a property of the teacher, not of
    an epoch) is fitted on one fixed corrupted draw of the training rows (data.draw_corruptions,
    generator seeded from the seed), which matches the distribution the live teacher then sees
    (clean + the 10 seen types, uniform); val is the split's fixed corrupted val, test the clean
    test set, and the epoch is selected by val as for the other splits."""
    sha = sha or sha256_file(path)
    cache = cache_dir(path, data_args, resize, sha)
    head_path, logits_path = os.path.join(cache, "teacher_head.pt"), os.path.join(cache, "logits_train.pt")
    standard = data_args["split"] == "standard"
    os.makedirs(cache, exist_ok=True)
    if os.path.exists(head_path) and (standard or os.path.exists(logits_path)):
        h = torch.load(head_path, map_location="cpu", weights_only=True)
        if h.get("head_epochs") == head_epochs:
            log(f"teacher: cached head{'' if standard else ' and logits'} in {cache} "
                f"(val {h['val_accuracy']:.2%}, test {h['test_accuracy']:.2%})")
            return cache
    teacher = load_teacher(path, num_classes=10, **teacher_args).to(device).eval()
    feats = {}
    for s in ("train", "val", "test"):
        fp = os.path.join(cache, f"features_{s}.pt")
        ok = os.path.exists(fp)
        if ok:
            feats[s] = torch.load(fp, map_location="cpu", weights_only=True)
            ok = len(feats[s]["labels"]) == len(splits[s]["labels"])
        if not ok:
            t0 = time.time()
            cs = seed * 1_000_003 + STANDARD_DRAW_SEED if standard and s == "train" else None
            f = features(teacher, splits[s]["images"], device, resize, amp_dtype, corrupt_seed=cs)
            feats[s] = {"features": f, "labels": splits[s]["labels"].clone()}
            atomic_save(feats[s], fp)
            log(f"teacher: {s} features {tuple(f.shape)} in {time.time() - t0:.1f}s "
                f"({len(f) / max(1e-9, time.time() - t0):.0f} img/s)"
                + (" (one fixed corrupted draw of the training rows)" if cs is not None else ""))
    head, val_acc, test_acc = fit_head(feats, device, head_epochs, seed)
    log(f"teacher: head fitted ({head_epochs} epochs, AdamW lr {HEAD_LR}, wd {HEAD_WD}): "
        f"val {val_acc:.2%}, test {test_acc:.2%} (seed 4.1 reports 87.4%)")
    if not standard:
        with torch.no_grad():
            logits = head(feats["train"]["features"].to(device).float()).cpu()
        atomic_save({"logits": logits, "labels": feats["train"]["labels"]}, logits_path)
    # written last: its presence (with the same head_epochs) marks a complete cache
    atomic_save({"kind": "cdeit-kit/teacher-head", "version": 1, "weight": head.weight.detach().cpu(),
                 "bias": head.bias.detach().cpu(), "teacher_path": os.path.abspath(path),
                 "teacher_sha256": sha, "teacher_args": dict(teacher_args), "data_args": dict(data_args),
                 "resize": resize, "val_accuracy": val_acc, "test_accuracy": test_acc,
                 "head_epochs": head_epochs}, head_path)
    return cache


def load_logits(cache, device="cpu"):
    """The cached teacher logits of every training row, (N_train, 10) fp32, on device."""
    return torch.load(os.path.join(cache, "logits_train.pt"), map_location="cpu", weights_only=True)["logits"].to(device)


# ----------------------------------------------------------------------------- (4) the live teacher

def live(path, teacher_args, cache, device):
    """The full teacher with the fitted head, frozen, on device: input the 224px view, out logits."""
    h = torch.load(os.path.join(cache, "teacher_head.pt"), map_location="cpu", weights_only=True)
    t = load_teacher(path, num_classes=10, **teacher_args)
    t.head.load_state_dict({"weight": h["weight"], "bias": h["bias"]})
    return t.to(device).eval().requires_grad_(False)
