"""Classify your own images with a trained student; CdeiT also names each image's corruption.

    python predict.py out/cdeit-hard-paper-s0/best.pt photos/ cat.jpg more.npy test_batch
    python predict.py best.pt photos/ --top-k 3 --json preds.json --csv preds.csv

Inputs, in the order given: PNG / JPEG / WebP / GIF files; folders (every such file under them,
sorted); .npy arrays of uint8 RGB images (N, 32, 32, 3) or (32, 32, 3); CIFAR-10 batch pickles
(read by data.py's restricted unpickler, which runs no code).

An image's size is read from its header first: one of more than --max-pixels pixels is refused
undecoded (a decompression bomb). It is then decoded in RGB (grey repeated, alpha dropped, 16 bits
scaled to 8), centre-cropped to a square and resized to 32 x 32 (bilinear, antialiased) unless it
is 32 x 32 already, and normalised as in training (augment.MEAN / STD).

Per image: the top-k classes; for CdeiT the corruption token's most likely type (data.TYPES) with
its probability and p(clean), and a shift warning when that type is a corruption with probability
>= --shift-threshold (a flat, unsure token warns of nothing; p(clean) is in the JSON / CSV for a
rule of your own). Class probabilities use the temperatures of eval.py --calibrate
(CKPT.temperatures.json) when there are any: CdeiT's per predicted type, else one global.

A bad input is one line on stderr naming it; the other images are still predicted and written.
Exit 0: every input predicted; 1: some input failed; 2: a bad option or checkpoint, nothing run.
"""
import csv
import io
import json
import os
import re
import struct
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

import augment
import data
import fileio
import model as model_lib
from cli import FlagError, Parser, bounded, check_device, check_writable_file, positive_int
from metrics import scale_logits

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
SIZE = 32
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # 89,478,485: PIL's Image.MAX_IMAGE_PIXELS


class InputError(RuntimeError):
    """One input that cannot be predicted; the message names it."""


class Item(NamedTuple):
    """One entry of the inputs: an image (3, 32, 32) uint8, or why there is none."""
    name: str
    image: torch.Tensor | None = None
    label: int | None = None
    error: str | None = None  # a failed input (exit 1)
    note: str | None = None   # a skipped empty sub-folder (not a failure)


def plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------- 1. reading inputs

def _png_size(head, f):
    if head[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk first")
    return (*struct.unpack(">II", head[16:24]), 1)


def _webp_size(head, f):
    chunk = head[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code 9d 01 2a
        if head[23:26] != b"\x9d\x01\x2a":
            raise ValueError("no VP8 start code")
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF, 1
    if chunk == b"VP8L":  # lossless: signature 2f, then width - 1 and height - 1 in 14 bits each
        if head[20] != 0x2F:
            raise ValueError("no VP8L signature")
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1
    if chunk == b"VP8X":  # extended: canvas width - 1 and height - 1 in 24 bits each
        if len(head) < 30:
            raise ValueError("cut")
        w, h = int.from_bytes(head[24:27], "little"), int.from_bytes(head[27:30], "little")
        return w + 1, h + 1, 1
    raise ValueError(f"unknown chunk {chunk!r}")


_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}


def _jpeg_size(head, f):
    """Walk the marker segments to the first frame header (SOFn): precision, height, width."""
    f.seek(2)
    while True:
        if f.read(1) != b"\xff":
            raise ValueError("no marker")
        m = f.read(1)
        while m == b"\xff":  # fill bytes
            m = f.read(1)
        if not m or m[0] in (0xD9, 0xDA):  # end of file or image, start of scan: no frame header
            raise ValueError("no frame header")
        if m[0] == 0x01 or 0xD0 <= m[0] <= 0xD7:  # markers without a length
            continue
        (n,) = struct.unpack(">H", f.read(2))
        if m[0] in _SOF:
            _, h, w = struct.unpack(">BHH", f.read(5))
            return w, h, 1
        f.seek(n - 2, os.SEEK_CUR)


def _gif_size(head, f):
    """The logical screen's size (or a larger frame's) and the number of frames, counted by walking
    the blocks without decompressing them."""
    def skip_table(packed):
        if packed & 0x80:
            f.seek(3 << ((packed & 7) + 1), os.SEEK_CUR)

    def skip_sub_blocks():
        while n := f.read(1)[0]:  # IndexError at the end of the file: cut
            f.seek(n, os.SEEK_CUR)

    w, h, packed = struct.unpack("<HHB", head[6:11])
    f.seek(13)
    skip_table(packed)
    frames = 0
    while (block := f.read(1)) != b";":  # the trailer
        if block == b"!":  # an extension: its label, then sub-blocks
            f.read(1)
            skip_sub_blocks()
        elif block == b",":  # an image descriptor: position, size, packed; its table; LZW data
            fw, fh, packed = struct.unpack("<4xHHB", f.read(9))
            w, h = max(w, fw), max(h, fh)
            skip_table(packed)
            f.read(1)  # LZW minimum code size
            skip_sub_blocks()
            frames += 1
        else:
            raise ValueError(f"unexpected block {block!r}")
    return w, h, frames


_FORMATS = ((b"\x89PNG\r\n\x1a\n", "PNG", _png_size), (b"\xff\xd8\xff", "JPEG", _jpeg_size),
            (b"GIF87a", "GIF", _gif_size), (b"GIF89a", "GIF", _gif_size),
            (b"RIFF", "WebP", _webp_size))


def image_size(path):
    """(width, height, frames) from a PNG, JPEG, WebP or GIF file's header, without decoding a
    pixel; InputError when the content is none of these or its header is cut or malformed."""
    with open(path, "rb") as f:
        head = f.read(32)
        for magic, fmt, reader in _FORMATS:
            if head.startswith(magic) and (fmt != "WebP" or head[8:12] == b"WEBP"):
                try:
                    return reader(head, f)
                except (ValueError, IndexError, struct.error):
                    raise InputError(f"{path}: a cut or malformed {fmt} header") from None
    if not head:
        raise InputError(f"{path}: an empty file, not an image")
    raise InputError(f"{path}: not a PNG, JPEG, WebP or GIF image (by its content)")


def to_student_input(img):
    """(C, H, W) image from torchvision.io in RGB mode -> (3, 32, 32) uint8 (module docstring)."""
    from torchvision.transforms.v2 import functional as TF
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    h, w = img.shape[-2:]
    if (h, w) != (SIZE, SIZE):
        s = min(h, w)
        img = TF.center_crop(img, [s, s])
        img = TF.resize(img, [SIZE, SIZE], interpolation=TF.InterpolationMode.BILINEAR,
                        antialias=True)
    return img


def read_image(path, max_pixels=MAX_PIXELS):
    """An image file -> (3, 32, 32) uint8; one larger than max_pixels is refused undecoded."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    w, h, frames = image_size(path)
    if frames != 1:
        raise InputError(f"{path}: a GIF of {frames} frames; expected one image")
    if w * h > max_pixels:
        raise InputError(f"{path}: {w} x {h} = {w * h:,} pixels, more than --max-pixels "
                         f"{max_pixels:,}; not decoded")
    try:
        img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        why = re.sub(r"^[^,]*, \S+:\d+, ", "", str(e))  # drop torchvision's "func, file.cpp:N, "
        raise InputError(f"{path}: unreadable image ({' '.join(why.split())})") from None
    if img.ndim != 3 or img.shape[0] != 3:
        raise InputError(f"{path}: decoded to shape {tuple(img.shape)}, expected (3, H, W)")
    return to_student_input(img)


def read_array(path):
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) uint8 tensor."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if x.ndim == 3:
        x = x[None]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:3] != (SIZE, SIZE) or x.shape[3] != 3:
        ours = x.ndim == 4 and x.shape[1:3] == (SIZE, SIZE)
        what = f"{x.shape[3]} channels" if ours else "shape"
        raise InputError(f"{path}: {what}: expected uint8 RGB images (N, 32, 32, 3), "
                         f"got {x.dtype} {x.shape}")
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)  # a copy: the map is read-only


def folder_images(path):
    """-> (the image files under path, sorted; its sub-folders without any, outermost only)."""
    files, dirs = [], []
    for d, subs, fs in os.walk(path):
        files += [os.path.join(d, f) for f in fs if f.lower().endswith(IMAGE_EXTS)]
        dirs += [os.path.join(d, s) for s in subs]
    empty = {d for d in dirs if not any(f.startswith(d + os.sep) for f in files)}
    return sorted(files), sorted(d for d in empty if os.path.dirname(d) not in empty)


def expand(inputs, max_pixels=MAX_PIXELS):
    """Yield an Item per image, failed input or skipped sub-folder, in input order."""
    exts = "/".join(e[1:] for e in IMAGE_EXTS)
    for path in inputs:
        if os.path.isdir(path):
            files, empty = folder_images(path)
            if not files:
                yield Item(path, error=f"{path}: empty folder (no {exts} files in it)")
            for d in empty:
                yield Item(d, note=f"{d}: no {exts} files in it, skipped")
            for f in files:
                yield from expand([f], max_pixels)
            continue
        try:
            if not os.path.isfile(path):
                raise InputError(f"{path}: not found")
            if path.lower().endswith(IMAGE_EXTS):
                yield Item(path, read_image(path, max_pixels))
                continue
            if path.lower().endswith(".npy"):
                x, y = read_array(path), None
            else:  # a CIFAR-10 batch pickle, through data.py's restricted unpickler
                try:
                    x, y = data._read_batch(path)
                except data.DataError as e:
                    raise InputError(f"{path}: neither an image (by its extension) nor a CIFAR-10 "
                                     f"batch ({e})") from None
                x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        except InputError as e:
            yield Item(path, error=str(e))
            continue
        for i in range(len(x)):
            yield Item(f"{path}[{i}]", x[i], None if y is None else int(y[i]))


# ----------------------------------------------------------------------------- 2. predicting

class Predictor:
    """A student checkpoint ready to predict: model.Deployed on the device, the class and type
    names, and the calibration temperatures (model.load_temperatures) unless told not to."""

    def __init__(self, ckpt_path, device, calibrated=True):
        net, ck = model_lib.load_student(ckpt_path)
        self.path, self.model_name, self.device = ckpt_path, ck["model_name"], device
        self.deployed = model_lib.Deployed(net, augment.MEAN, augment.STD).to(device).eval()
        cfg = net.cfg
        self.classes = (data.CLASSES if cfg.num_classes == len(data.CLASSES)
                        else [f"class {i}" for i in range(cfg.num_classes)])
        self.types = None
        if cfg.corruption_token:
            self.types = (data.TYPES if cfg.num_types == len(data.TYPES)
                          else [f"type {i}" for i in range(cfg.num_types)])
        num_types = cfg.num_types if cfg.corruption_token else None
        self.temps = model_lib.load_temperatures(ckpt_path, num_types) if calibrated else None
        if self.temps is None:
            self.calibration = "none"
        else:
            per_type = self.types and self.temps.get("per_type")
            self.calibration = "per-type" if per_type else "global"

    @torch.no_grad()
    def __call__(self, images):
        """uint8 (B, 3, 32, 32) -> (class probabilities (B, C), type probabilities (B, T) or None,
        temperature used per image (B,)), all on the CPU."""
        out = self.deployed(images.to(self.device))
        logits, corr = (out if isinstance(out, tuple) else (out, None))
        logits = logits.float().cpu()
        corr = None if corr is None else corr.float().cpu()
        z, t = logits.double(), torch.ones(len(logits), dtype=torch.float64)
        if self.calibration == "per-type":  # the token's argmax picks the temperature: no label
            per_type = torch.tensor(self.temps["per_type"], dtype=torch.float64)
            types = corr.argmax(-1)  # (B,)
            z, t = scale_logits(z, per_type, types), per_type[types]
        elif self.calibration == "global":
            z, t = scale_logits(z, self.temps["global"]), t * self.temps["global"]
        probs = z.softmax(-1)
        return probs, None if corr is None else corr.double().softmax(-1), t


def record(name, label, probs, tprobs, temp, pred, top_k, threshold):
    """One image's prediction as a plain dict (the JSON / CSV row)."""
    p, i = probs.topk(min(top_k, len(probs)))
    top = [{"class": pred.classes[j], "index": int(j), "p": float(q)}
           for q, j in zip(p, i, strict=True)]
    r = {"input": name, "top": top, "temperature": float(temp)}
    if label is not None:
        r["label"] = int(label)
    if tprobs is not None:
        t = int(tprobs.argmax())
        r["corruption"] = {"type": pred.types[t], "index": t, "p": float(tprobs[t]),
                           "p_clean": float(tprobs[0]),  # type 0 = clean
                           "shift_warning": t != 0 and float(tprobs[t]) >= threshold}
    return r


def screen_line(r):
    s = f"{r['input']}  " + "  ".join(f"{c['class']} {c['p']:.3f}" for c in r["top"])
    if "corruption" in r:
        c = r["corruption"]
        s += f"  | corruption: {c['type']} {c['p']:.3f}"
        s += f" (clean {c['p_clean']:.3f})" if c["index"] else ""
        if c["shift_warning"]:
            s += f"  SHIFT: likely {c['type']}, class probabilities less reliable"
    return s


def _stderr(line):
    print(f"predict.py: {' '.join(line.split())}", file=sys.stderr)  # one line each


def predict(pred, inputs, batch_size, top_k, threshold, emit=print, warn=_stderr,
            max_pixels=MAX_PIXELS):
    """Run every input through pred in batches of batch_size. emit(line) per image, warn(line) per
    bad input or skipped sub-folder (both in input order). -> (records, errors [{input, error}])."""
    records, errors, batch = [], [], []

    def flush():
        probs, tprobs, temps = pred(torch.stack([b.image for b in batch]))
        for k, b in enumerate(batch):
            tp = None if tprobs is None else tprobs[k]
            r = record(b.name, b.label, probs[k], tp, temps[k], pred, top_k, threshold)
            records.append(r)
            emit(screen_line(r))
        batch.clear()

    for item in expand(inputs, max_pixels):
        if item.image is None:
            if batch:
                flush()  # keep screen lines in input order
            if item.error is not None:
                errors.append({"input": item.name, "error": " ".join(item.error.split())})
            warn(item.error or item.note)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return records, errors


CSV_FIELDS = ["input", "label", "top1", "p_top1", "top_k", "temperature", "corruption",
              "p_corruption", "p_clean", "shift_warning"]


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
                    "p_clean": f"{c['p_clean']:.6f}" if c else "",
                    "shift_warning": c.get("shift_warning", "")})
    return f.getvalue()


# ----------------------------------------------------------------------------- command line

def check_options(args):
    """The device and the output paths, before any work (each flag's own range is its argparse
    type in main). -> the torch device. Raises cli.FlagError."""
    check_device("--device", args.device)
    for flag, out in (("--json", args.json), ("--csv", args.csv)):
        if out:
            check_writable_file(flag, out)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv=None):
    p = Parser(prog="predict.py",
               description="Predict classes (and, for CdeiT, the corruption type) of your own\n"
                           "images with a trained student.",
               epilog="Images not 32x32 are centre-cropped to a square on the shorter side and\n"
                      "resized to 32x32 (bilinear, antialiased); grey is repeated to RGB, alpha\n"
                      "dropped, 16-bit scaled to 8 bits.\n"
                      "Exit 0: all predicted; 1: some input failed (the others predicted);\n"
                      "2: bad option or checkpoint.\n")
    a = p.add_argument
    a("checkpoint", help="a student checkpoint (train.py's best.pt / ckpt.pt)")
    a("inputs", nargs="+", help="image files, folders, .npy (N,32,32,3) uint8, CIFAR-10 batches")
    a("--top-k", type=positive_int, default=3, help="classes shown per image")
    a("--json", help="write every prediction (and every failed input) here")
    a("--csv", help="write every prediction here, one row per image")
    a("--batch-size", type=positive_int, default=256, help="images per forward pass")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--shift-threshold", type=bounded(float, 0, 1, lo_open=True), default=0.5,
      help="CdeiT: warn when the corruption token's most likely type is a corruption with at "
           "least this probability")
    a("--max-pixels", type=positive_int, default=MAX_PIXELS,
      help="refuse, undecoded, an image of more pixels (width x height) than this")
    a("--no-calibration", action="store_true", help="ignore CKPT.temperatures.json (T = 1)")
    args = p.parse_args(argv)  # a bad value: one line from cli.Parser, exit 2
    try:
        device = check_options(args)
        pred = Predictor(args.checkpoint, device, calibrated=not args.no_calibration)
    except (FlagError, model_lib.ModelFileError) as e:
        print("predict.py: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    fit = "" if pred.temps or args.no_calibration else \
        f" (python eval.py {args.checkpoint} --calibrate fits it)"
    _stderr(f"{args.checkpoint}: {pred.model_name} on {device}, calibration: "
            f"{pred.calibration}{fit}")
    if args.top_k > len(pred.classes):
        _stderr(f"--top-k {args.top_k}: this checkpoint has {len(pred.classes)} classes; "
                f"showing all {len(pred.classes)}")
    t0 = time.perf_counter()
    records, errors = predict(pred, args.inputs, args.batch_size, args.top_k,
                              args.shift_threshold, max_pixels=args.max_pixels)
    dt = time.perf_counter() - t0
    flagged = sum(1 for r in records if r.get("corruption", {}).get("shift_warning"))
    _stderr(f"{plural(len(records), 'image')} predicted in {dt:.1f} s "
            f"({len(records) / max(dt, 1e-9):,.0f} img/s), "
            f"{plural(len(errors), 'input')} failed"
            + (f", {flagged:,} with a shift warning" if pred.types else ""))
    try:
        if args.json:
            blob = {"checkpoint": args.checkpoint, "model_name": pred.model_name,
                    "calibration": pred.calibration, "shift_threshold": args.shift_threshold,
                    "predictions": records, "errors": errors}
            fileio.atomic_write(args.json, json.dumps(blob, indent=1) + "\n", "predictions JSON")
        if args.csv:
            fileio.atomic_write(args.csv, to_csv(records), "predictions CSV")
    except OSError as e:  # fileio.WriteError: one line
        print("predict.py: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
