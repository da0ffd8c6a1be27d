"""Augment: the student's batched, on-device augmentation, and the teacher's view of a batch.

Every transform is a batch tensor op on the images' device (airbench style: no per-image Python,
no DataLoader workers), deterministic given a torch.Generator. Top to bottom:
  1. normalisation with the teacher's statistics (cached per device) and the teacher's 224px
     view (seed 3.4: the teacher sees the un-augmented image, resized, normalised like the student);
  2. random crop + horizontal flip as one gather;
  3. RandAugment's ops (seed 3.1: magnitude 9, 2 ops), run batched by sorting the batch by op;
  4. Augment: crop / flip / RandAugment, normalise, Random Erasing, then Mixup / CutMix.

Which augmentations, and how often (seed 3.1, after DeiT / Touvron et al. 2020): Mixup, CutMix
and RandAugment augment, Random Erasing regularises. The defaults are seed Table 1's column
"Ours" (Mixup prob 0.3, Erasing prob 0.25), i.e. Table 4's best row: crop, flip, Mixup and
Random Erasing on; CutMix off (it "significantly degrades accuracy, even at low application
probabilities") and RandAugment off (comparable accuracy for ~10% more training time); both
stay available for the Table 4 ablation.

Depends on torch only, plus numpy for the one Beta draw per batch of Mixup / CutMix (seeded
from the torch generator); nothing else from this project. data.py re-exports the public names.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

# The teacher's pretrained config (timm deit3_small): ImageNet statistics; students use them too.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# 1. Normalisation and the teacher's view

_STATS = {}


def _stats(device):   # (1 / (255 std), mean / std), cached per device: no host copy per batch
    key = str(device)
    if key not in _STATS:
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        _STATS[key] = ((1 / (255 * std)).to(device), (mean / std).to(device))
    return _STATS[key]


def normalize(images):
    """uint8 (or float in [0, 255]) NCHW -> float32 (x/255 - mean) / std, ImageNet statistics
    (seed 3.4: student and teacher inputs are normalised alike)."""
    return _normalize_(images.float() if images.dtype != torch.float32 else images.clone())


def _normalize_(x):
    scale, shift = _stats(x.device)
    return x.mul_(scale).sub_(shift)


def teacher_view(images, size=224, mode="bicubic", dtype=torch.float32):
    """The teacher's input (seed 3.4): the un-augmented uint8 batch resized on the device to
    size x size (timm's deit3 config: bicubic; bilinear as an option), normalised."""
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    x = F.interpolate(images.float(), size=(size, size), mode=mode, align_corners=False, antialias=False)
    if mode == "bicubic":
        x = x.clamp_(0, 255)   # bicubic overshoots; a uint8 image could not
    return normalize(x).to(dtype)


# ----------------------------------------------------------------------------------------------
# 2. Random crop + horizontal flip, one gather

_CROP_INDEX = {}


def _crop_index(H, W, padding, mode, device):
    """(2, 2p+1, 2p+1, H*W) int64: for each (flip, dy, dx), the flat source index of every output
    pixel, in the zero-padded image ("constant") or in the image itself ("reflect"). Built once."""
    key = (H, W, padding, mode, str(device))
    if key not in _CROP_INDEX:
        n = 2 * padding + 1
        grid = torch.meshgrid(torch.arange(2), torch.arange(n), torch.arange(n), indexing="ij")
        f, dy, dx = (t.reshape(-1) for t in grid)
        rows = dy[:, None] + torch.arange(H)                           # rows of the padded image
        cols = dx[:, None] + torch.arange(W)
        cols = torch.where(f[:, None] == 1, cols.flip(1), cols)        # mirrored crop
        Wp = W + 2 * padding
        if mode == "reflect":   # back into the image, mirroring at the borders (no padded copy)
            rows, cols = (rows - padding).abs(), (cols - padding).abs()
            rows = torch.where(rows > H - 1, 2 * (H - 1) - rows, rows)
            cols = torch.where(cols > W - 1, 2 * (W - 1) - cols, cols)
            Wp = W
        _CROP_INDEX[key] = (rows[:, :, None] * Wp + cols[:, None, :]).view(2, n, n, H * W).to(device)
    return _CROP_INDEX[key]


def crop_flip(images, dy, dx, flip, padding=4, mode="constant"):
    """out[b] = pad(images[b])[dy:dy+H, dx:dx+W], mirrored where flip[b], as one gather.
    mode "constant" pads with zeros (torchvision RandomCrop's default), "reflect" mirrors."""
    B, C, H, W = images.shape
    table = _crop_index(H, W, padding, mode, images.device)
    n = 2 * padding + 1
    idx = table.view(-1, H * W).index_select(0, (flip.long() * n + dy) * n + dx)   # (B, H*W)
    src = images if mode == "reflect" else F.pad(images, (padding,) * 4)
    return src.reshape(B, C, -1).gather(2, idx.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)


# ----------------------------------------------------------------------------------------------
# 3. RandAugment (seed 3.1: magnitude 9, 2 ops per image)

def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])   # PIL's "L" weights


def _sharpness(x, f):
    """PIL ImageEnhance.Sharpness: blend with the SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13),
    border pixels kept as PIL does."""
    blur = x.clone()
    blur[:, :, 1:-1, 1:-1] = (F.avg_pool2d(x, 3, stride=1) * 9 + 4 * x[:, :, 1:-1, 1:-1]) / 13
    return (blur + f * (x - blur)).clamp(0, 255)


def _affine(x, a, b, c, d, tx, ty):
    """Per-sample affine warp (output -> input map, normalised coordinates), bilinear, fill 128."""
    theta = torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1)   # (n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 128, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 128


def _minmax(x):
    return x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)


# RandAugment ops, timm's "rand" set minus Equalize (a per-image histogram); increasing variants
# (stronger with m). m = magnitude / 10; s = a random sign per sample, shape (n,). x: float [0,255].
_one, _zero = torch.ones_like, torch.zeros_like
RANDAUG_OPS = {
    "AutoContrast": lambda x, m, s: ((x - _minmax(x)[0]) * 255 / (_minmax(x)[1] - _minmax(x)[0]).clamp(min=1)),
    "Invert": lambda x, m, s: 255 - x,
    "Posterize": lambda x, m, s: torch.floor(x / 2 ** int(4 * m)) * 2 ** int(4 * m),   # keeps 8 - int(4m) bits
    "Solarize": lambda x, m, s: torch.where(x >= 256 - 256 * m, 255 - x, x),
    "SolarizeAdd": lambda x, m, s: torch.where(x < 128, (x + int(110 * m)).clamp(max=255), x),
    "Color": lambda x, m, s: (_gray(x) + (1 + 0.9 * m * s).view(-1, 1, 1, 1) * (x - _gray(x))).clamp(0, 255),
    "Contrast": lambda x, m, s: (_gray(x).mean((2, 3), keepdim=True) + (1 + 0.9 * m * s).view(-1, 1, 1, 1)
                                 * (x - _gray(x).mean((2, 3), keepdim=True))).clamp(0, 255),
    "Brightness": lambda x, m, s: (x * (1 + 0.9 * m * s).view(-1, 1, 1, 1)).clamp(0, 255),
    "Sharpness": lambda x, m, s: _sharpness(x, (1 + 0.9 * m * s).view(-1, 1, 1, 1)),
    "Rotate": lambda x, m, s: _affine(x, torch.cos(math.radians(30 * m) * s), -torch.sin(math.radians(30 * m) * s),
                                      torch.sin(math.radians(30 * m) * s), torch.cos(math.radians(30 * m) * s),
                                      _zero(s), _zero(s)),                               # +-27 degrees at m9
    "ShearX": lambda x, m, s: _affine(x, _one(s), 0.3 * m * s, _zero(s), _one(s), _zero(s), _zero(s)),
    "ShearY": lambda x, m, s: _affine(x, _one(s), _zero(s), 0.3 * m * s, _one(s), _zero(s), _zero(s)),
    "TranslateX": lambda x, m, s: _affine(x, _one(s), _zero(s), _zero(s), _one(s), 0.9 * m * s, _zero(s)),
    "TranslateY": lambda x, m, s: _affine(x, _one(s), _zero(s), _zero(s), _one(s), _zero(s), 0.9 * m * s),
}   # translate 0.9 m in normalised units = 45% m of the width, timm's translate_pct 0.45


def _apply_ops(x, k, s, m):
    """x[i] <- RANDAUG_OPS[k[i]](x[i]) (k[i] == len(ops): unchanged). The batch is sorted by op,
    each op runs once on its contiguous chunk, the chunks are scattered back: one host sync (the
    chunk sizes), no per-image loop, no op computed for samples that did not draw it."""
    fns = list(RANDAUG_OPS.values())
    order = torch.argsort(k, stable=True)
    counts = torch.bincount(k, minlength=len(fns) + 1).tolist()
    xs, ss = x[order].split(counts), s[order].split(counts)
    out = [fn(xc, m, sc) if len(xc) else xc for fn, xc, sc in zip(fns, xs, ss)] + [xs[-1]]
    return torch.empty_like(x).index_copy_(0, order, torch.cat(out))


def _randaugment(x, ops, magnitude, g):
    """RandAugment (Cubuk et al.; timm rand-m9-n2: `ops` ops per sample drawn uniformly, each
    applied with p=0.5 and a random sign) on float [0,255] NCHW."""
    B, dev, n = x.shape[0], x.device, len(RANDAUG_OPS)
    for _ in range(ops):
        k = torch.randint(0, n, (B,), generator=g, device=dev)
        k = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, k, n)   # n: this layer skipped
        s = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, -1.0, 1.0)
        x = _apply_ops(x, k, s, magnitude / 10)
    return x.round_()


# ----------------------------------------------------------------------------------------------
# 4. Random Erasing's noise, and Augment: the whole pipeline (seed Table 1 / Table 4)

_NOISE = {}


def _noise(n, device, g):
    """n N(0, 1) values. On CPU a window at a random offset of a fixed bank of 2^22 normals (made
    once): fresh normals were the costliest step of the CPU pipeline, and erased patches only need
    noise, not independence across batches."""
    if device.type != "cpu" or n > 1 << 22:    # accelerators: fresh normals are cheap
        return torch.randn(n, generator=g, device=device)
    if "cpu" not in _NOISE:
        _NOISE["cpu"] = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
    start = int(torch.randint(0, (1 << 22) - n + 1, (1,), generator=g))
    return _NOISE["cpu"][start:start + n]


class Augment:
    """The student's batch augmentation, seed Table 1 / Table 4 best row by default: random crop
    (zero padding 4, as torchvision's RandomCrop(32, padding=4)), horizontal flip, Random Erasing
    p=0.25, Mixup alpha 0.8 with p=0.3; RandAugment(n, m) and CutMix available, off.
    __call__(uint8 NCHW, labels, types, generator) -> (x float32 normalised, y, t): y, t are int64
    (B,) when no mix fired for this batch, else soft targets (B, num_classes) / (B, num_types) mixed
    with one lambda (Mixup mixes the type targets like the labels; no smoothing here: the loss's
    label_smoothing applies on top). Order as timm/DeiT: per-sample transforms, normalise, erase,
    then the batch mix (pairs each sample with the flipped batch, timm's convention).
    Deterministic given a torch.Generator on the images' device. Host syncs per batch: one for the
    mix decision, one for the number of erased samples (and one per RandAugment layer)."""

    def __init__(self, num_classes=10, num_types=11, crop_padding=4, flip=True, mixup_alpha=0.8, mixup_prob=0.3,
                 cutmix_alpha=1.0, cutmix_prob=0.0, erase_prob=0.25, randaug_ops=0, randaug_magnitude=9,
                 crop_mode="constant"):
        self.num_classes, self.num_types = num_classes, num_types
        self.crop_padding, self.flip, self.crop_mode = crop_padding, flip, crop_mode
        self.mixup_alpha, self.mixup_prob = mixup_alpha, mixup_prob
        self.cutmix_alpha, self.cutmix_prob = cutmix_alpha, cutmix_prob
        self.erase_prob, self.randaug_ops, self.randaug_magnitude = erase_prob, randaug_ops, randaug_magnitude

    def __call__(self, images, labels, types, generator=None):
        g, dev, B = generator, images.device, images.shape[0]
        x = images
        if self.crop_padding or self.flip:
            p = self.crop_padding
            dy = torch.randint(0, 2 * p + 1, (B,), generator=g, device=dev)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=g, device=dev)
            flip = torch.rand(B, generator=g, device=dev) < (0.5 if self.flip else 0.0)
            x = crop_flip(x, dy, dx, flip, p, self.crop_mode)
        x = x.float()
        if self.randaug_ops:
            x = _randaugment(x, self.randaug_ops, self.randaug_magnitude, g)
        x = _normalize_(x)                 # x is already a fresh float tensor
        if self.erase_prob:
            x = self._erase(x, g)
        return self._mix(x, labels, types, g)

    def _erase(self, x, g):
        """Random Erasing (Zhong et al.; timm's mode='pixel', count 1): per sample with prob p, a
        rectangle of area U(0.02, 1/3) x HW and log-uniform aspect in (0.3, 1/0.3), first of 10
        tries that fits, filled with per-pixel N(0, 1) noise in normalised units."""
        B, C, H, W = x.shape
        dev = x.device
        u = torch.rand(B, 23, generator=g, device=dev)   # one draw: 10 areas, 10 ratios, top, left, apply
        area = H * W * (0.02 + (1 / 3 - 0.02) * u[:, :10])
        ratio = torch.exp(math.log(0.3) + 2 * math.log(1 / 0.3) * u[:, 10:20])
        h = torch.sqrt(area * ratio).round().long()
        w = torch.sqrt(area / ratio).round().long()
        ok = (h < H) & (w < W)
        first = ok.int().argmax(1, keepdim=True)
        h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
        top = (u[:, 20] * (H - h + 1)).long()             # randint(0, H - h), inclusive
        left = (u[:, 21] * (W - w + 1)).long()
        sel = ((u[:, 22] < self.erase_prob) & ok.any(1)).nonzero()[:, 0]
        if len(sel):   # write only the erased pixels: enumerate each rectangle's h*w positions
            ws, counts = w[sel], h[sel] * w[sel]
            base = (sel * C * H + top[sel]) * W + left[sel]          # flat index of each top-left
            owner = torch.repeat_interleave(torch.arange(len(sel), device=dev), counts)       # (m,)
            pos = torch.arange(len(owner), device=dev) - (counts.cumsum(0) - counts).index_select(0, owner)
            w_o = ws.index_select(0, owner)
            flat = base.index_select(0, owner) + pos // w_o * W + pos % w_o                   # channel 0
            flat = (flat[:, None] + torch.arange(C, device=dev) * (H * W)).view(-1)
            x = x.contiguous()
            x.view(-1).index_copy_(0, flat, _noise(len(flat), dev, g))
        return x

    def _mix(self, x, labels, types, g):
        """Mixup / CutMix at batch level (timm Mixup mode='batch'): with prob mixup_prob mix the
        batch with its flip, else with prob cutmix_prob paste a box of the flipped batch."""
        if not ((self.mixup_prob > 0 and self.mixup_alpha > 0) or (self.cutmix_prob > 0 and self.cutmix_alpha > 0)):
            return x, labels, types
        # One host sync per batch: the decision changes the target's type. The draws come from a
        # numpy generator seeded from `g`, so everything stays deterministic given `g`.
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g, device=x.device)))
        u = rng.random()
        if u < self.mixup_prob and self.mixup_alpha > 0:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            x = x.flip(0).mul_(1 - lam).add_(x, alpha=lam)   # lam x + (1 - lam) x.flip(0)
        elif u < self.mixup_prob + self.cutmix_prob and self.cutmix_alpha > 0:
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            H, W = x.shape[2:]
            ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]   # right side is a copy
            lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)   # the area actually pasted
        else:
            return x, labels, types

        def soft(v, n):
            v = F.one_hot(v, n).float() if v.dim() == 1 else v.float()
            return v * lam + v.flip(0) * (1 - lam)
        return x, soft(labels, self.num_classes), soft(types, self.num_types)
