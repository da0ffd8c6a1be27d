"""Augment: the student's batched, on-device augmentation, and the teacher's view of a batch.

Every transform is a batch tensor op on the images' device (airbench style: no per-image Python,
no DataLoader workers), deterministic given a torch.Generator. Top to bottom:
  1. normalisation with the teacher's statistics (cached per device) and the teacher's 224px
     view (thesis 3.4: the teacher sees the un-augmented image, resized, normalised alike);
  2. random crop + horizontal flip as one gather (ours, opt-in: the thesis uses neither);
  3. torchvision's RandAugment (thesis 3.1: 2 ops, magnitude 9 of 31 bins), batched by sorting the
     batch by op;
  4. Random Erasing, Mixup / CutMix, and Augment: the whole pipeline in the thesis's order.

The defaults are the thesis's recipe (the recipe table in docs/): Table 1 / Table 4's best row
(Mixup p 0.3, Random Erasing p 0.25; CutMix and RandAugment off) and, where the thesis is silent,
its public code (`MyAugments`: torchvision's MixUp / CutMix / RandAugment / RandomErasing with
their default arguments, called on the whole batch, so each draws one set of parameters per
batch).

Depends on torch only, plus numpy for the Beta draws of Mixup / CutMix (seeded from the torch
generator); nothing else from this project.
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


def _stats(device):  # (1 / (255 std), mean / std), cached per device: no host copy per batch
    key = str(device)
    if key not in _STATS:
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        _STATS[key] = ((1 / (255 * std)).to(device), (mean / std).to(device))
    return _STATS[key]


def normalize(images):
    """uint8 (or float in [0, 255]) NCHW -> float32 (x/255 - mean) / std, ImageNet statistics
    (thesis 3.4: student and teacher inputs are normalised alike)."""
    return _normalize_(images.float() if images.dtype != torch.float32 else images.clone())


def _normalize_(x):
    scale, shift = _stats(x.device)
    return x.mul_(scale).sub_(shift)


def teacher_view(images, size=224, mode="bilinear", dtype=torch.float32):
    """The teacher's input (thesis 3.4): the un-augmented uint8 batch resized on the device to
    size x size (bilinear as the thesis's code; bicubic as timm's deit3 config), normalised."""
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    x = F.interpolate(
        images.float(), size=(size, size), mode=mode, align_corners=False, antialias=False
    )
    if mode == "bicubic":
        x = x.clamp_(0, 255)  # bicubic overshoots; a uint8 image could not
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
        rows = dy[:, None] + torch.arange(H)  # rows of the padded image
        cols = dx[:, None] + torch.arange(W)
        cols = torch.where(f[:, None] == 1, cols.flip(1), cols)  # mirrored crop
        Wp = W + 2 * padding
        if mode == "reflect":  # back into the image, mirroring at the borders (no padded copy)
            rows, cols = (rows - padding).abs(), (cols - padding).abs()
            rows = torch.where(rows > H - 1, 2 * (H - 1) - rows, rows)
            cols = torch.where(cols > W - 1, 2 * (W - 1) - cols, cols)
            Wp = W
        _CROP_INDEX[key] = (
            (rows[:, :, None] * Wp + cols[:, None, :]).view(2, n, n, H * W).to(device)
        )
    return _CROP_INDEX[key]


def crop_flip(images, dy, dx, flip, padding=4, mode="constant"):
    """out[b] = pad(images[b])[dy:dy+H, dx:dx+W], mirrored where flip[b], as one gather.
    mode "constant" pads with zeros (torchvision RandomCrop's default), "reflect" mirrors."""
    B, C, H, W = images.shape
    table = _crop_index(H, W, padding, mode, images.device)
    n = 2 * padding + 1
    idx = table.view(-1, H * W).index_select(0, (flip.long() * n + dy) * n + dx)  # (B, H*W)
    src = images if mode == "reflect" else F.pad(images, (padding,) * 4)
    return (
        src.reshape(B, C, -1).gather(2, idx.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)
    )


# ----------------------------------------------------------------------------------------------
# 3. RandAugment: torchvision's RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31), the
#    thesis's `T.RandAugment()` (thesis 3.1). Each op takes x: float (n, C, H, W) holding uint8
#    values and v: (n,) float64 signed magnitudes, and repeats torchvision's uint8 arithmetic
#    (float32 math, truncating casts, rounding where it rounds), so it equals v2.functional's op.


def randaug_magnitudes(magnitude, num_bins=31, size=(32, 32)):
    """{op: (magnitude, signed)} at bin `magnitude`, as torchvision's
    RandAugment._augmentation_space (its order is the op numbering). At 9 of 31 bins: shear 0.09,
    translate 4 px of 32, rotate 9 degrees, enhance factors 1 +- 0.27, posterize 7 bits, solarize
    threshold 178.5."""
    H, W = size
    lin = lambda hi: float(torch.linspace(0.0, hi, num_bins)[magnitude])
    bits = 8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()
    return {
        "Identity": (0.0, False),
        "ShearX": (lin(0.3), True),
        "ShearY": (lin(0.3), True),
        "TranslateX": (lin(150.0 / 331.0 * W), True),
        "TranslateY": (lin(150.0 / 331.0 * H), True),
        "Rotate": (lin(30.0), True),
        "Brightness": (lin(0.9), True),
        "Color": (lin(0.9), True),
        "Contrast": (lin(0.9), True),
        "Sharpness": (lin(0.9), True),
        "Posterize": (float(bits[magnitude]), False),
        "Solarize": (float(torch.linspace(255.0, 0.0, num_bins)[magnitude]), False),
        "AutoContrast": (0.0, False),
        "Equalize": (0.0, False),
    }


def _col(v):  # (n,) -> (n, 1, 1, 1) float32
    return v.float().view(-1, 1, 1, 1)


def _blend(x, other, f):
    """torchvision's _blend: f x + (1 - f) other, clamped to [0, 255], truncated to uint8. Its
    `add_(other, alpha=1 - f)` rounds once (a fused multiply-add on CPU); float64, where the product
    of two float32 values is exact, rounds the same (separate float32 ops were off by one level on
    ~0.3% of Color's pixels)."""
    fx = x.mul(_col(f)).double()
    return fx.add_(other.double() * _col(1.0 - f).double()).float().clamp_(0, 255).floor_()


def _gray(x):  # torchvision's rgb_to_grayscale weights, floored for uint8 inputs
    return x[:, 0:1].mul(0.2989).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114).floor_()


def _sharpness(x, v):
    """adjust_sharpness: blend with the 3x3 smoothing kernel (1s around a 5, /13), blur rounded,
    the one-pixel border kept."""
    k = torch.full((3, 3), 1.0 / 13.0, device=x.device)
    k[1, 1] = 5.0 / 13.0
    blur = F.conv2d(x, k.expand(x.shape[1], 1, 3, 3), groups=x.shape[1]).round_()
    out = x.clone()
    inner = out[:, :, 1:-1, 1:-1]
    inner.add_(blur.sub_(inner).mul_(_col(-v)))  # factor 1 + v: inner + (1 - factor) (blur - inner)
    return out.clamp_(0, 255).floor_()


def _autocontrast(x):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = hi == lo
    inv_scale = (hi - lo).mul_(1.0 / 255)
    lo, inv_scale = lo.masked_fill(flat, 0.0), inv_scale.masked_fill(flat, 1.0)
    return (x - lo).div_(inv_scale).clamp_(0, 255).floor_()


def _equalize(x):
    """Per-channel histogram equalisation with PIL's lookup table (as torchvision's equalize)."""
    n, C, H, W = x.shape
    flat = x.reshape(n * C, H * W).long()
    hist = torch.zeros(n * C, 256, dtype=torch.long, device=x.device).scatter_add_(
        1, flat, torch.ones_like(flat)
    )
    cum = hist.cumsum(1)
    top = hist.gather(1, cum.argmax(1, keepdim=True))  # count of the largest value present
    step = (H * W - top) // 255
    lut = ((cum[:, :-1] + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)  # lut[0] = 0
    # step 0 (< 255 pixels off the top value): unchanged
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.view(n, C, H, W).to(x.dtype)


_GRID = {}


def _base_grid(H, W, device):
    """(1, H*W, 3) pixel centres relative to the image centre, homogeneous (torchvision's
    _affine_grid), and the (2,) half sizes that map pixels to grid_sample's [-1, 1]; made once per
    size and device."""
    key = (H, W, str(device))
    if key not in _GRID:
        g = torch.empty(1, H, W, 3, device=device)
        g[..., 0].copy_(torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, steps=W, device=device))
        rows = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, steps=H, device=device)
        g[..., 1].copy_(rows.unsqueeze(-1))
        g[..., 2].fill_(1)
        _GRID[key] = g.view(1, H * W, 3), torch.tensor([0.5 * W, 0.5 * H], device=device)
    return _GRID[key]


def _warp(x, angle, shear_x, shear_y, tx, ty, center):
    """Per-sample affine_image(NEAREST, fill 0): torchvision's inverse map
    (_get_inverse_affine_matrix, scale 1) in float64 from per-sample angles / shears in degrees and
    translations in pixels, about `center` (pixels from the image centre), then its pixel-centre
    grid and grid_sample."""
    n, _, H, W = x.shape
    d2r = math.pi / 180.0
    rot, sx, sy = angle * d2r, shear_x * d2r, shear_y * d2r
    cx, cy = center
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    e = cx - d * (cx + tx) + b * (cy + ty)
    f = cy + c * (cx + tx) - a * (cy + ty)
    theta = torch.stack([d, -b, e, -c, a, f], 1).float().view(n, 2, 3)
    base, half = _base_grid(H, W, x.device)
    # theta^T: (n, 3, 2)
    grid = base.expand(n, -1, -1).bmm(theta.transpose(1, 2).div_(half)).view(n, H, W, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _shear(x, v, axis):  # torchvision: shear = degrees(atan(m)) about the top-left corner
    z, s = torch.zeros_like(v), torch.atan(v) * (180.0 / math.pi)
    H, W = x.shape[2:]
    return _warp(x, z, s if axis == 0 else z, z if axis == 0 else s, z, z, (-0.5 * W, -0.5 * H))


def _translate(x, v, axis):  # torchvision: translate by int(m) pixels
    z, t = torch.zeros_like(v), v.trunc()
    return _warp(x, z, z, z, t if axis == 0 else z, z if axis == 0 else t, (0.0, 0.0))


RANDAUG_OPS = {  # name -> op(x, v), in torchvision's order
    "Identity": lambda x, v: x,
    "ShearX": lambda x, v: _shear(x, v, 0),
    "ShearY": lambda x, v: _shear(x, v, 1),
    "TranslateX": lambda x, v: _translate(x, v, 0),
    "TranslateY": lambda x, v: _translate(x, v, 1),
    "Rotate": lambda x, v: _warp(x, -v.remainder(360.0), *[torch.zeros_like(v)] * 4, (0.0, 0.0)),
    "Brightness": lambda x, v: x.mul(_col(1.0 + v)).clamp_(0, 255).floor_(),
    "Color": lambda x, v: _blend(x, _gray(x), 1.0 + v),  # saturation
    "Contrast": lambda x, v: _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), 1.0 + v),
    "Sharpness": _sharpness,
    "Posterize": lambda x, v: x.div(_col(2.0 ** (8 - v))).floor_().mul_(_col(2.0 ** (8 - v))),
    "Solarize": lambda x, v: torch.where(x >= _col(v), 255 - x, x),
    "AutoContrast": lambda x, v: _autocontrast(x),
    "Equalize": lambda x, v: _equalize(x),
}


def _apply_ops(x, k, v):
    """x[i] <- RANDAUG_OPS[k[i]](x[i], v[i]) (k[i] == len(ops): unchanged). The batch is sorted by
    op, each op runs once on its contiguous chunk, the chunks are scattered back: one host sync (the
    chunk sizes), no per-image loop, no op computed for samples that did not draw it."""
    fns = list(RANDAUG_OPS.values())
    order = torch.argsort(k, stable=True)
    counts = torch.bincount(k, minlength=len(fns) + 1).tolist()
    xs, vs = x[order].split(counts), v[order].split(counts)
    out = [fn(xc, vc) if len(xc) else xc for fn, xc, vc in zip(fns, xs, vs)] + [xs[-1]]
    return torch.empty_like(x).index_copy_(0, order, torch.cat(out))


_MAGS = {}


def _randaugment(x, num_ops, magnitude, num_bins, prob, per_batch, g):
    """RandAugment on float NCHW holding uint8 values: each of `num_ops` layers draws an op
    uniformly over the 14 and, for signed ops, a sign with p 0.5, and applies it (no skip
    probability). The thesis's code applies RandAugment to a sample with probability `prob` and
    calls it on the batch, so by default (per_batch) one op and sign per layer serve the whole
    batch."""
    B, dev = x.shape[0], x.device
    key = (magnitude, num_bins, tuple(x.shape[2:]), str(dev))
    if key not in _MAGS:
        table = randaug_magnitudes(magnitude, num_bins, x.shape[2:])
        _MAGS[key] = (
            torch.tensor([m for m, _ in table.values()], dtype=torch.float64, device=dev),
            torch.tensor([s for _, s in table.values()], device=dev),
        )
    mags, signed = _MAGS[key]
    n, draws = len(mags), 1 if per_batch else B
    skip = torch.rand(B, generator=g, device=dev) >= prob
    for _ in range(num_ops):
        k = torch.randint(0, n, (draws,), generator=g, device=dev).expand(B)
        neg = (torch.rand(draws, generator=g, device=dev) < 0.5).expand(B) & signed[k]
        x = _apply_ops(x, torch.where(skip, n, k), torch.where(neg, -mags[k], mags[k]))
    return x


# ----------------------------------------------------------------------------------------------
# 4. Random Erasing, Mixup / CutMix, and Augment: the whole pipeline (thesis 3.1, Table 1 / Table 4)

_NOISE = {}


def _noise(n, device, g):
    """n N(0, 1) values. On CPU a window at a random offset of a fixed bank of 2^22 normals (made
    once): fresh normals were the costliest step of the CPU pipeline, and erased patches only need
    noise, not independence across batches."""
    if device.type != "cpu" or n > 1 << 22:  # accelerators: fresh normals are cheap
        return torch.randn(n, generator=g, device=device)
    if "cpu" not in _NOISE:
        _NOISE["cpu"] = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
    start = int(torch.randint(0, (1 << 22) - n + 1, (1,), generator=g))
    return _NOISE["cpu"][start : start + n]


def _erase_boxes(n, H, W, scale, ratio, g, device):
    """n draws of torchvision RandomErasing.get_params: area U(scale) x HW, aspect log-uniform in
    ratio, h = round(sqrt(area aspect)), w = round(sqrt(area / aspect)), the first of 10 tries with
    h < H and w < W, top / left uniform over the positions that fit. fits False: no try fitted (a
    no-op in torchvision)."""
    u = torch.rand(n, 22, generator=g, device=device)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, 10:20])
    h, w = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
    ok = (h < H) & (w < W)
    first = ok.int().argmax(1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = (u[:, 20] * (H - h + 1)).long()  # randint(0, H - h + 1)
    left = (u[:, 21] * (W - w + 1)).long()
    return ok.any(1), top, left, h, w


class Augment:
    """The student's batch augmentation; the defaults are the thesis's recipe (thesis Table 1):
    Mixup (alpha 1, p 0.3 per batch) and Random Erasing (p 0.25, torchvision's scale, ratio and
    fill 0 in pixel space) on; CutMix, RandAugment, crop and flip off.
    __call__(uint8 NCHW, labels, types, generator) -> (x float32 normalised, y, t): y is int64 (B,)
    when no mix fired for this batch, else soft targets (B, num_classes); t stays the int64 types
    (the thesis mixes only the labels) unless mix_types. No smoothing here: the loss's
    label_smoothing applies on top.
    Order (the thesis's `MyAugments`): [crop / flip,] Mixup then CutMix (independent draws, each
    pairing sample i with sample i-1 as torchvision's MixUp / CutMix), the mixed image cast to
    uint8 values, RandAugment, Random Erasing, normalise (erase_mode "pixel": timm's per-pixel
    noise after normalising instead). draw_per "batch" (the thesis's code, which calls torchvision's
    per-image transforms on the whole batch): one RandAugment op sequence and one erasing decision
    and rectangle per batch; "image": drawn per sample.
    Deterministic given a torch.Generator on the images' device. Host syncs per batch: one for the
    mix decision, one for the erased pixels, one per RandAugment layer."""

    def __init__(
        self,
        num_classes=10,
        num_types=11,
        crop_padding=0,
        flip=False,
        crop_mode="constant",
        mixup_alpha=1.0,
        mixup_prob=0.3,
        cutmix_alpha=1.0,
        cutmix_prob=0.0,
        mix_types=False,
        randaug_ops=0,
        randaug_magnitude=9,
        randaug_bins=31,
        randaug_prob=1.0,
        erase_prob=0.25,
        erase_mode="zero",
        erase_scale=(0.02, 0.33),
        erase_ratio=(0.3, 3.3),
        draw_per="batch",
    ):
        if erase_mode not in ("zero", "pixel"):
            raise ValueError(f"erase_mode must be 'zero' or 'pixel', got {erase_mode!r}")
        if draw_per not in ("batch", "image"):
            raise ValueError(f"draw_per must be 'batch' or 'image', got {draw_per!r}")
        if randaug_ops and not 0 <= randaug_magnitude < randaug_bins:
            raise ValueError(
                f"RandAugment magnitude must be in [0, {randaug_bins - 1}], got {randaug_magnitude}"
            )
        self.num_classes, self.num_types, self.mix_types = num_classes, num_types, mix_types
        self.crop_padding, self.flip, self.crop_mode = crop_padding, flip, crop_mode
        self.mixup_alpha, self.mixup_prob = mixup_alpha, mixup_prob
        self.cutmix_alpha, self.cutmix_prob = cutmix_alpha, cutmix_prob
        self.randaug_ops, self.randaug_magnitude = randaug_ops, randaug_magnitude
        self.randaug_bins, self.randaug_prob = randaug_bins, randaug_prob
        self.erase_prob, self.erase_mode = erase_prob, erase_mode
        self.erase_scale, self.erase_ratio = erase_scale, erase_ratio
        self.per_batch = draw_per == "batch"

    def __call__(self, images, labels, types, generator=None):
        g, dev, B = generator, images.device, images.shape[0]
        x = images
        if self.crop_padding or self.flip:
            p = self.crop_padding
            dy = torch.randint(0, 2 * p + 1, (B,), generator=g, device=dev)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=g, device=dev)
            flip = torch.rand(B, generator=g, device=dev) < (0.5 if self.flip else 0.0)
            x = crop_flip(x, dy, dx, flip, p, self.crop_mode)
        x = x.float() if x.dtype != torch.float32 else x.clone()
        x, labels, types = self._mix(x, labels, types, g)
        if self.randaug_ops:
            x = _randaugment(x, self.randaug_ops, self.randaug_magnitude, self.randaug_bins,
                             self.randaug_prob, self.per_batch, g)
        if self.erase_prob and self.erase_mode == "zero":
            x = self._erase(x, g)  # torchvision RandomErasing(value=0) on the uint8 image
        x = _normalize_(x)
        if self.erase_prob and self.erase_mode == "pixel":
            x = self._erase(x, g)  # timm: N(0, 1) noise in normalised units
        return x, labels, types

    def _erase(self, x, g):
        """Random Erasing (Zhong et al.; torchvision's RandomErasing, one rectangle per image with
        prob erase_prob), filled with 0 ("zero") or per-pixel N(0, 1) noise ("pixel")."""
        B, C, H, W = x.shape
        dev = x.device
        n = 1 if self.per_batch else B
        ok, top, left, h, w = _erase_boxes(n, H, W, self.erase_scale, self.erase_ratio, g, dev)
        ok &= torch.rand(n, generator=g, device=dev) < self.erase_prob
        ok, top, left, h, w = (t.expand(B) for t in (ok, top, left, h, w))
        sel = ok.nonzero()[:, 0]
        if len(sel):  # write only the erased pixels: enumerate each rectangle's h*w positions
            ws, counts = w[sel], h[sel] * w[sel]
            base = (sel * C * H + top[sel]) * W + left[sel]  # flat index of each top-left
            owner = torch.repeat_interleave(torch.arange(len(sel), device=dev), counts)  # (m,)
            pos = torch.arange(len(owner), device=dev) - (counts.cumsum(0) - counts).index_select(
                0, owner
            )
            w_o = ws.index_select(0, owner)
            flat = base.index_select(0, owner) + pos // w_o * W + pos % w_o  # channel 0
            flat = (flat[:, None] + torch.arange(C, device=dev) * (H * W)).view(-1)
            x = x.contiguous()
            if self.erase_mode == "zero":
                x.view(-1).index_fill_(0, flat, 0.0)
            else:
                x.view(-1).index_copy_(0, flat, _noise(len(flat), dev, g))
        return x

    def _mix(self, x, labels, types, g):
        """The thesis's batch mixing: Mixup with prob mixup_prob, then CutMix with prob cutmix_prob,
        drawn independently (both may fire), as torchvision's MixUp / CutMix: one Beta(alpha, alpha)
        lambda per batch, sample i paired with sample i-1 (roll by one), CutMix's box centred
        uniformly, its lambda the area kept. Mixed pixels are truncated to uint8 values as the
        thesis's cast before RandAugment."""
        mixup = self.mixup_prob > 0 and self.mixup_alpha > 0
        cutmix = self.cutmix_prob > 0 and self.cutmix_alpha > 0
        if not (mixup or cutmix):
            return x, labels, types
        # One host sync per batch: the decision changes the target's type. The draws come from a
        # numpy generator seeded from `g`, so everything stays deterministic given `g`.
        rng = np.random.default_rng(
            int(torch.randint(0, 2**62, (1,), generator=g, device=x.device))
        )
        fired = []
        if mixup and rng.random() < self.mixup_prob:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            x = x.roll(1, 0).mul_(1 - lam).add_(x, alpha=lam).floor_()  # lam x + (1 - lam) x[i - 1]
            fired.append(lam)
        if cutmix and rng.random() < self.cutmix_prob:
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            H, W = x.shape[2:]
            r = 0.5 * math.sqrt(1.0 - lam)
            rw, rh = int(r * W), int(r * H)
            cx, cy = int(rng.integers(0, W)), int(rng.integers(0, H))
            x0, y0, x1, y1 = max(cx - rw, 0), max(cy - rh, 0), min(cx + rw, W), min(cy + rh, H)
            x[:, :, y0:y1, x0:x1] = x.roll(1, 0)[:, :, y0:y1, x0:x1]  # right side is a copy
            fired.append(1.0 - (x1 - x0) * (y1 - y0) / (W * H))  # the area actually kept
        if not fired:
            return x, labels, types

        def soft(v, n):
            v = F.one_hot(v, n).float() if v.dim() == 1 else v.float()
            for lam in fired:
                v = v.roll(1, 0).mul_(1 - lam).add_(v, alpha=lam)
            return v

        return (
            x,
            soft(labels, self.num_classes),
            soft(types, self.num_types) if self.mix_types else types,
        )
