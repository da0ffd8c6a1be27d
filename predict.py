"""Classify your own images with a trained student; CdeiT also names each image's corruption.

    python predict.py out/cdeit-hard-paper-s0/best.pt photos/ cat.jpg more.npy test_batch
    python predict.py best.pt photos/ --top-k 3 --json preds.json --csv preds.csv

Inputs, in the order given: PNG / JPEG / WebP / GIF files; folders (every such file under them,
sorted, recursively); a .npy array of uint8 RGB images (N, 32, 32, 3) or one (32, 32, 3); a CIFAR-10
batch pickle (data_batch_1, test_batch: read by data.py's restricted unpickler, which runs no code).

How an image becomes the student's input (32 x 32 RGB, as CIFAR-10): decoded by torchvision.io in
RGB mode (grey is repeated into R, G and B; an alpha channel is dropped, not composited; 16-bit
images are scaled to 8 bits), then, if it is not 32 x 32, centre-cropped to a square on its shorter
side and resized to 32 x 32 (bilinear, antialiased), then normalised as in training (augment.MEAN /
STD). .npy and CIFAR inputs must already be 32 x 32 x 3 uint8.

Per image: the top-k classes with probabilities; for CdeiT the corruption token's most likely type
(data.TYPES: clean + the 10 training corruptions) with its probability and p(clean), and a shift
warning when the token is confident the image is corrupted: its most likely type is a corruption
with probability >= --shift-threshold (how well it detects each type: eval.py's confusion matrix).
A token unsure between types (a flat distribution) warns of nothing, even though 1 - p(clean) is
then large; p(clean) is in the JSON / CSV for a rule of your own. Class probabilities use the temperatures
eval.py --calibrate stored beside the checkpoint (CKPT.temperatures.json) when there are any: CdeiT
per predicted corruption type, other students one global temperature.

Bad inputs (unreadable image, wrong shape or channel count, empty folder, missing file) give one
line each on stderr naming the file; every other image is still predicted and written. Exit codes:
0 every input predicted; 1 some input failed (the rest were predicted and written); 2 nothing was
run (a bad option or checkpoint, refused before any work).
"""
import argparse
import csv
import io
import json
import os
import re
import sys
import time

import numpy as np
import torch

import augment
import data
import fileio
import model as model_lib
from metrics import scale_logits

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
SIZE = 32


class InputError(RuntimeError):
    """One input that cannot be predicted; the message names it."""


# ----------------------------------------------------------------------------- 1. reading inputs

def to_student_input(img):
    """(C, H, W) image tensor from torchvision.io in RGB mode -> (3, 32, 32) uint8 (module docstring)."""
    from torchvision.transforms.v2 import functional as TF
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    h, w = img.shape[-2:]
    if (h, w) != (SIZE, SIZE):
        s = min(h, w)
        img = TF.center_crop(img, [s, s])
        img = TF.resize(img, [SIZE, SIZE], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return img


def read_image(path):
    from torchvision.io import ImageReadMode, decode_image, read_file
    try:
        img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        why = re.sub(r"^\w+, \S+:\d+, ", "", " ".join(str(e).split()))  # drop torchvision's "func, file.cpp:N, "
        raise InputError(f"{path}: unreadable image ({why[:100]})") from None
    if img.ndim != 3 or img.shape[0] != 3:  # an animated GIF decodes to (frames, 3, H, W)
        raise InputError(f"{path}: decoded to shape {tuple(img.shape)}, expected one (3, H, W) image")
    return to_student_input(img)


def read_array(path):
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) uint8 tensor."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if x.ndim == 3:
        x = x[None]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:3] != (SIZE, SIZE) or x.shape[3] != 3:
        what = f"{x.shape[3]} channels" if x.ndim == 4 and x.shape[1:3] == (SIZE, SIZE) else "shape"
        raise InputError(f"{path}: {what}: expected uint8 RGB images (N, 32, 32, 3), got {x.dtype} {x.shape}")
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)  # a copy: the memory map is read-only


def expand(inputs):
    """Yield (name, image (3, 32, 32) uint8 or None, label or None, error or None) in input order."""
    for path in inputs:
        if os.path.isdir(path):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                           if f.lower().endswith(IMAGE_EXTS))
            if not files:
                yield path, None, None, f"{path}: empty folder (no {'/'.join(e[1:] for e in IMAGE_EXTS)} files in it)"
            for f in files:
                yield from expand([f])
            continue
        try:
            if not os.path.isfile(path):
                raise InputError(f"{path}: not found")
            if path.lower().endswith(IMAGE_EXTS):
                yield path, read_image(path), None, None
                continue
            if path.lower().endswith(".npy"):
                x, y = read_array(path), None
            else:  # a CIFAR-10 batch pickle, through data.py's restricted unpickler
                try:
                    x, y = data._read_batch(path)
                except data.DataError as e:
                    raise InputError(f"{path}: neither an image (by its extension) nor a CIFAR-10 batch ({e})") from None
                x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        except InputError as e:
            yield path, None, None, str(e)
            continue
        for i in range(len(x)):
            yield f"{path}[{i}]", x[i], None if y is None else int(y[i]), None


# ----------------------------------------------------------------------------- 2. predicting

class Predictor:
    """A student checkpoint ready to predict: model.Deployed on the device, the class and type
    names, and the calibration temperatures (model.load_temperatures) unless told not to."""

    def __init__(self, ckpt_path, device, calibrated=True):
        net, ck = model_lib.load_student(ckpt_path)
        self.path, self.model_name, self.device = ckpt_path, ck["model_name"], device
        self.deployed = model_lib.Deployed(net, augment.MEAN, augment.STD).to(device).eval()
        cfg = net.cfg
        self.classes = data.CLASSES if cfg.num_classes == len(data.CLASSES) else [f"class {i}" for i in range(cfg.num_classes)]
        self.types = (data.TYPES if cfg.num_types == len(data.TYPES) else [f"type {i}" for i in range(cfg.num_types)]) \
            if cfg.corruption_token else None
        self.temps = model_lib.load_temperatures(ckpt_path, cfg.num_types if cfg.corruption_token else None) \
            if calibrated else None
        if self.temps is None:
            self.calibration = "none"
        else:
            self.calibration = "per-type" if self.types and self.temps.get("per_type") else "global"

    @torch.no_grad()
    def __call__(self, images):
        """uint8 (B, 3, 32, 32) -> (class probabilities (B, C), type probabilities (B, T) or None,
        temperature used per image (B,)), all on the CPU."""
        out = self.deployed(images.to(self.device))
        logits, corr = (out if isinstance(out, tuple) else (out, None))
        logits = logits.float().cpu()
        corr = None if corr is None else corr.float().cpu()
        z, t = logits.double(), torch.ones(len(logits), dtype=torch.float64)
        if self.calibration == "per-type":  # the token's argmax picks the temperature: no label needed
            per_type, types = torch.tensor(self.temps["per_type"], dtype=torch.float64), corr.argmax(-1)
            z, t = scale_logits(z, per_type, types), per_type[types]
        elif self.calibration == "global":
            z, t = scale_logits(z, self.temps["global"]), t * self.temps["global"]
        probs = z.softmax(-1)
        return probs, None if corr is None else corr.double().softmax(-1), t


def record(name, label, probs, tprobs, temp, pred, top_k, threshold):
    """One image's prediction as a plain dict (the JSON / CSV row)."""
    p, i = probs.topk(min(top_k, len(probs)))
    r = {"input": name, "top": [{"class": pred.classes[j], "index": int(j), "p": float(q)} for q, j in zip(p, i)],
         "temperature": float(temp)}
    if label is not None:
        r["label"] = int(label)
    if tprobs is not None:
        t = int(tprobs.argmax())
        r["corruption"] = {"type": pred.types[t], "index": t, "p": float(tprobs[t]), "p_clean": float(tprobs[0]),
                           "shift_warning": t != 0 and float(tprobs[t]) >= threshold}  # type 0 = clean
    return r


def screen_line(r):
    s = f"{r['input']}  " + "  ".join(f"{c['class']} {c['p']:.3f}" for c in r["top"])
    if "corruption" in r:
        c = r["corruption"]
        s += f"  | corruption: {c['type']} {c['p']:.3f}" + (f" (clean {c['p_clean']:.3f})" if c["index"] else "")
        if c["shift_warning"]:
            s += f"  SHIFT: likely {c['type']}, class probabilities less reliable"
    return s


def predict(pred, inputs, batch_size, top_k, threshold, emit=print, warn=None):
    """Run every input through pred in batches of batch_size. emit(line) per image, warn(line) per
    bad input (both in input order). -> (records, errors [{input, error}])."""
    warn = warn or (lambda m: print(f"predict.py: {' '.join(m.split())}", file=sys.stderr))  # one line each
    records, errors, batch = [], [], []

    def flush():
        probs, tprobs, temps = pred(torch.stack([b[1] for b in batch]))
        for k, (name, _, label) in enumerate(batch):
            r = record(name, label, probs[k], None if tprobs is None else tprobs[k], temps[k], pred, top_k, threshold)
            records.append(r)
            emit(screen_line(r))
        batch.clear()

    for name, img, label, err in expand(inputs):
        if err is not None:
            flush() if batch else None  # keep screen lines in input order
            errors.append({"input": name, "error": " ".join(err.split())})
            warn(err)
            continue
        batch.append((name, img, label))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return records, errors


CSV_FIELDS = ["input", "label", "top1", "p_top1", "top_k", "temperature", "corruption", "p_corruption", "p_clean",
              "shift_warning"]


def to_csv(records):
    f = io.StringIO()
    w = csv.DictWriter(f, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in records:
        c = r.get("corruption") or {}
        w.writerow({"input": r["input"], "label": r.get("label", ""), "top1": r["top"][0]["class"],
                    "p_top1": f"{r['top'][0]['p']:.6f}", "temperature": f"{r['temperature']:.6g}",
                    "top_k": " ".join(f"{t['class']}:{t['p']:.6f}" for t in r["top"]),
                    "corruption": c.get("type", ""), "p_corruption": f"{c['p']:.6f}" if c else "",
                    "p_clean": f"{c['p_clean']:.6f}" if c else "", "shift_warning": c.get("shift_warning", "")})
    return f.getvalue()


# ----------------------------------------------------------------------------- command line

def check_options(args):
    """Refuse a bad option before any work: one line naming it."""
    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.shift_threshold <= 1:
        raise InputError(f"--shift-threshold must be in (0, 1], got {args.shift_threshold}")
    for flag, out in (("--json", args.json), ("--csv", args.csv)):
        if out and (os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out)))):
            raise InputError(f"{flag} {out}: not a writable file path (a folder, or its folder does not exist)")
    try:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise InputError(f"--device {args.device}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine")
    return dev


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Predict classes (and, for CdeiT, the corruption type) of your own images with a trained student.",
        epilog="Images that are not 32x32 are centre-cropped to a square on the shorter side and resized to 32x32 "
               "(bilinear, antialiased); grey is repeated to RGB, alpha dropped, 16-bit scaled to 8 bits. "
               "Exit 0: all predicted; 1: some input failed (the others predicted); 2: bad option or checkpoint.")
    p.add_argument("checkpoint", help="a student checkpoint (train.py's best.pt / ckpt.pt)")
    p.add_argument("inputs", nargs="+", help="image files, folders, .npy (N,32,32,3) uint8, CIFAR-10 batch files")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", help="write every prediction (and every failed input) here")
    p.add_argument("--csv", help="write every prediction here, one row per image")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--shift-threshold", type=float, default=0.5,
                   help="CdeiT: warn when the corruption token's most likely type is a corruption with at least "
                        "this probability (default 0.5)")
    p.add_argument("--no-calibration", action="store_true", help="ignore CKPT.temperatures.json (temperature 1)")
    args = p.parse_args(argv)
    try:
        device = check_options(args)
        pred = Predictor(args.checkpoint, device, calibrated=not args.no_calibration)
    except (InputError, model_lib.ModelFileError) as e:
        print("predict.py: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"predict.py: {args.checkpoint}: {pred.model_name} on {device}, calibration: {pred.calibration}"
          + ("" if pred.temps or args.no_calibration else f" (python eval.py {args.checkpoint} --calibrate fits it)"),
          file=sys.stderr)
    t0 = time.perf_counter()
    records, errors = predict(pred, args.inputs, args.batch_size, args.top_k, args.shift_threshold)
    dt = time.perf_counter() - t0
    flagged = sum(1 for r in records if r.get("corruption", {}).get("shift_warning"))
    print(f"predict.py: {len(records)} images predicted in {dt:.1f} s ({len(records) / max(dt, 1e-9):,.0f} img/s), "
          f"{len(errors)} input(s) failed" + (f", {flagged} with a shift warning" if pred.types else ""), file=sys.stderr)
    try:
        if args.json:
            blob = {"checkpoint": args.checkpoint, "model_name": pred.model_name, "calibration": pred.calibration,
                    "shift_threshold": args.shift_threshold, "predictions": records, "errors": errors}
            fileio.atomic_write(args.json, json.dumps(blob, indent=1) + "\n", "predictions JSON")
        if args.csv:
            fileio.atomic_write(args.csv, to_csv(records), "predictions CSV")
    except OSError as e:  # fileio.WriteError: one line
        print("predict.py: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
