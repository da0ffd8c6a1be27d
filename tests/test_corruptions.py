"""Tests of corruptions.py against per-image numpy/scipy/PIL references written here from the
published CIFAR-10-C algorithm (make_cifar_c.py in hendrycks/robustness; parameters in
../shared/reference/data-formats.md). The references are also the baseline of
`python bench.py corruptions`.

Tolerances (why): the release computes in float64 and truncates with np.uint8; we compute in
float32. A value within ~1e-5 of an integer can floor to either side, so deterministic
corruptions must agree to within 1 level everywhere and exactly on >= 99% of pixels. Random
corruptions cannot agree pixel for pixel (different RNGs); we compare residual statistics.
"""

import importlib.util
import io
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corruptions as C

HAS_FROST = importlib.util.find_spec("imagecorruptions") is not None
RANDOM = [
    "gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost",
    "fog", "elastic_transform"
]
DETERMINISTIC = [n for n in C.CORRUPTIONS if n not in RANDOM]


def photos():
    """12 real 32x32 photographs: 4 crops of each of scikit-image's astronaut, chelsea, coffee,
    box-downsampled like CIFAR's 32x32 thumbnails."""
    import skimage.data as d

    out = []
    for f in (d.astronaut, d.chelsea, d.coffee):
        im = f()
        H, W = im.shape[:2]
        s = min(H, W)
        for t, l, z in [
            (0, 0, s),
            (H - s // 2, W - s // 2, s // 2),
            (0, W - s // 2, s // 2),
            ((H - s) // 2, (W - s) // 2, s),
        ]:
            crop = Image.fromarray(np.ascontiguousarray(im[t : t + z, l : l + z]))
            out.append(np.array(crop.resize((32, 32), Image.BOX)))
    return np.stack(out)


PHOTOS = photos()


# ---------------------------------------------------------------------------------------------
# per-image references: f(img (32,32,3) uint8, severity, rng np.random.Generator) -> uint8


def _u8(y):
    return y  # the references return the float values the release cast with np.uint8 (floor)


def ref_gaussian_noise(x, s, rng):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    x = x / 255.0
    return _u8(np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255)


def ref_shot_noise(x, s, rng):
    c = [500, 250, 100, 75, 50][s - 1]
    x = x / 255.0
    return _u8(np.clip(rng.poisson(x * c) / c, 0, 1) * 255)


def ref_impulse_noise(x, s, rng):
    from skimage.util import random_noise

    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    y = random_noise(x / 255.0, mode="s&p", amount=c, rng=int(rng.integers(2**31)))
    return _u8(np.clip(y, 0, 1) * 255)


def ref_defocus_blur(x, s, rng=None):
    r, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    L = np.arange(-8, 9)
    X, Y = np.meshgrid(L, L)
    disk = ((X**2 + Y**2) <= r**2).astype(np.float32)
    disk /= disk.sum()
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias**2))
    g /= g.sum()
    # cv2.GaussianBlur(ksize 3) and cv2.filter2D: correlation with reflect-101 ('mirror') borders
    k = ndimage.correlate(disk.astype(np.float64), np.outer(g, g), mode="mirror")
    x = x / 255.0
    y = np.stack([ndimage.correlate(x[..., d], k, mode="mirror") for d in range(3)], -1)
    return _u8(np.clip(y, 0, 1) * 255)


def _sk_gauss(x, sigma):  # skimage.filters.gaussian(multichannel): scipy, truncate 4, 'nearest'
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def ref_glass_blur(x, s, rng, offsets=None):
    sigma, d, it = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    x = np.uint8(_sk_gauss(x / 255.0, sigma) * 255)
    n = 32 - 2 * d
    if offsets is None:  # randint(-1, 1): {-1, 0}; (dx, dy) per scan position, drawn at once
        offsets = rng.integers(-d, d, size=(it, n, n, 2))
    for i in range(it):
        for h in range(32 - d, d, -1):
            for w in range(32 - d, d, -1):
                dx, dy = offsets[i, 32 - d - h, 32 - d - w]
                hp, wp = h + dy, w + dx
                x[h, w], x[hp, wp] = x[hp, wp], x[h, w].copy()
    return _u8(np.clip(_sk_gauss(x / 255.0, sigma), 0, 1) * 255)


def ref_magick_motion(img, radius, sigma, angle):
    """ImageMagick MotionBlurImage on a (H,W) or (H,W,C) uint8 image: one-sided Gaussian taps,
    tap i at (x + ceil(i cos a - .5), y + ceil(i sin a - .5)), edge virtual pixels, 8-bit out."""
    width = 2 * math.ceil(radius) + 1
    k = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma * sigma))
    k /= k.sum()
    a = math.radians(angle)
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.zeros(img.shape)
    for i in range(width):
        ox, oy = math.ceil(i * math.cos(a) - 0.5), math.ceil(i * math.sin(a) - 0.5)
        out += k[i] * img[np.clip(yy + oy, 0, H - 1), np.clip(xx + ox, 0, W - 1)]
    return np.uint8(np.clip(np.floor(out + 0.5), 0, 255))


def ref_motion_blur(x, s, rng, angle=None):
    r, sg = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    return ref_magick_motion(x, r, sg, rng.uniform(-45, 45) if angle is None else angle)


def ref_clipped_zoom(img, z):
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
    t = (img.shape[0] - h) // 2
    return img[t : t + h, t : t + h]


def ref_zoom_blur(x, s, rng=None):
    zs = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][s - 1], 0.01)
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for z in zs:
        out += ref_clipped_zoom(x, z)
    return _u8(np.clip((x + out) / (len(zs) + 1), 0, 1) * 255)


def ref_snow(x, s, rng):
    c = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][s - 1]
    x = np.array(x, dtype=np.float32) / 255.0
    layer = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    layer = ref_clipped_zoom(layer[..., None], c[2])
    layer[layer < c[3]] = 0
    layer = (np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8)
    layer = ref_magick_motion(layer, c[4], c[5], rng.uniform(-135, -45)) / 255.0
    layer = layer[..., None]
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return _u8(np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255)


_FROST = {}


def ref_frost_textures():
    if not _FROST:
        folder = C.frost_dir()
        for i in range(1, 6):
            f = next(n for n in sorted(os.listdir(folder)) if n.startswith(f"frost{i}."))
            im = np.array(Image.open(os.path.join(folder, f)).convert("RGB"))
            try:
                import cv2

                im = cv2.resize(im, (0, 0), fx=0.2, fy=0.2)  # the release's resize
            except ImportError:  # INTER_LINEAR at x0.2 samples pixel 5d+2 exactly
                im = im[2::5, 2::5][: round(im.shape[0] * 0.2), : round(im.shape[1] * 0.2)]
            _FROST[i - 1] = im
    return _FROST


def ref_frost(x, s, rng):
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    fr = ref_frost_textures()[int(rng.integers(5))]
    r0, c0 = rng.integers(0, fr.shape[0] - 32), rng.integers(0, fr.shape[1] - 32)
    return _u8(np.clip(a * x + b * fr[r0 : r0 + 32, c0 : c0 + 32].astype(np.float64), 0, 255))


def ref_plasma(rng, decay, n=32):
    m = np.zeros((n, n))
    step, wib = n, 100.0

    def wibbled(a):
        return a / 4 + wib * rng.uniform(-wib, wib, a.shape)

    while step >= 2:
        h = step // 2
        cr = m[0:n:step, 0:n:step]
        sq = cr + np.roll(cr, -1, 0)
        sq += np.roll(sq, -1, 1)
        m[h:n:step, h:n:step] = wibbled(sq)
        dr, ul = m[h:n:step, h:n:step], m[0:n:step, 0:n:step]
        m[0:n:step, h:n:step] = wibbled(dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1))
        m[h:n:step, 0:n:step] = wibbled(dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0))
        step //= 2
        wib /= decay
    m -= m.min()
    return m / m.max()


def ref_fog(x, s, rng):
    c, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    x = x / 255.0
    mv = x.max()
    x = x + c * ref_plasma(rng, decay)[..., None]
    return _u8(np.clip(x * mv / (mv + c), 0, 1) * 255)


def ref_brightness(x, s, rng=None):
    from skimage.color import hsv2rgb, rgb2hsv

    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    h = rgb2hsv(x / 255.0)
    h[..., 2] = np.clip(h[..., 2] + c, 0, 1)
    return _u8(np.clip(hsv2rgb(h), 0, 1) * 255)


def ref_contrast(x, s, rng=None):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    x = x / 255.0
    m = x.mean(axis=(0, 1), keepdims=True)
    return _u8(np.clip((x - m) * c + m, 0, 1) * 255)


# CIFAR-10-C's elastic_transform (alpha, sigma, affine) per severity, in units of the 32 px side
ELASTIC = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
           (0.1, 0.03, 0.03)]


def ref_elastic_transform(x, s, rng, shift=None, ux=None, uy=None, use_cv2=False):
    """use_cv2: the release's own cv2.getAffineTransform + warpAffine (whose coordinates are
    quantised to 1/32 px); otherwise scipy's affine_transform with exact coordinates."""
    from skimage.filters import gaussian

    alpha, sigma, aff = [32 * v for v in ELASTIC[s - 1]]
    img = x.astype(np.float32) / 255.0
    p1 = np.float32([[26, 26], [26, 6], [6, 6]])  # (x, y) points
    if shift is None:
        shift = rng.uniform(-aff, aff, size=p1.shape)
    p2 = p1 + shift.astype(np.float32)
    if use_cv2:
        import cv2

        M = cv2.getAffineTransform(p1, p2)
        img = cv2.warpAffine(img, M, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
    else:  # warpAffine reads src at M^-1(dst)
        A = np.linalg.solve(np.c_[p2, np.ones(3)], np.c_[p1, np.ones(3)]).T  # p2 -> p1, (x, y)
        mat = np.array([[A[1, 1], A[1, 0]], [A[0, 1], A[0, 0]]])  # to (row, col) order
        off = np.array([A[1, 2], A[0, 2]])
        img = np.stack(
            [
                ndimage.affine_transform(img[..., d], mat, off, order=1, mode="mirror")
                for d in range(3)
            ],
            -1,
        )
    ux = rng.uniform(-1, 1, size=(32, 32)) if ux is None else ux
    uy = rng.uniform(-1, 1, size=(32, 32)) if uy is None else uy
    dx = gaussian(ux, sigma, mode="reflect", truncate=3) * alpha if alpha else np.zeros((32, 32))
    dy = gaussian(uy, sigma, mode="reflect", truncate=3) * alpha if alpha else np.zeros((32, 32))
    yy, xx = np.mgrid[0:32, 0:32]
    y = np.stack(
        [
            ndimage.map_coordinates(img[..., d], (yy + dy, xx + dx), order=1, mode="reflect")
            for d in range(3)
        ],
        -1,
    )
    return _u8(np.clip(y, 0, 1) * 255)


def ref_pixelate(x, s, rng=None):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    im = Image.fromarray(x).resize((int(32 * c), int(32 * c)), Image.BOX)
    return np.array(im.resize((32, 32), Image.BOX))


def ref_jpeg_compression(x, s, rng=None):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=[80, 65, 58, 50, 40][s - 1])
    return np.array(Image.open(buf))


REFERENCE = {n: globals()["ref_" + n] for n in C.CORRUPTIONS}


def reference(name, images, s, rng, cast=True):
    """The reference over a batch; cast=False keeps the float values before the release's
    np.uint8 truncation, so a test can tell a real difference from a float tie at an integer."""
    y = np.stack([np.asarray(REFERENCE[name](im, s, rng), dtype=np.float64) for im in images])
    return np.uint8(y) if cast else y


# ---------------------------------------------------------------------------------------------
# tests


def test_names():
    assert len(C.CORRUPTIONS) == 15 and len(set(C.CORRUPTIONS)) == 15
    assert sorted(C.SEEN + C.UNSEEN) == sorted(C.CORRUPTIONS)
    assert C.TYPE_NAMES[:11] == [
        "clean", "brightness", "defocus_blur", "zoom_blur", "motion_blur", "fog", "frost", "snow",
        "shot_noise", "gaussian_noise", "jpeg_compression"
    ]
    assert C.TYPE_NAMES[11:] == [
        "impulse_noise", "glass_blur", "contrast", "elastic_transform", "pixelate"
    ]


def _skip_frost(name):
    if name == "frost" and not HAS_FROST:
        pytest.skip("frost needs the frost photographs: pip install imagecorruptions")


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_contract(name):
    """Shape, dtype, range, layouts, determinism for a seed."""
    _skip_frost(name)
    x = torch.from_numpy(PHOTOS[:6])
    for s in (1, 5):
        y = C.corrupt(x, name, s, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
        y2 = C.corrupt(x, name, s, torch.Generator().manual_seed(1))
        assert torch.equal(y, y2), "same seed must give the same output"
        # CHW layout gives the same images
        y3 = C.corrupt(x.permute(0, 3, 1, 2), name, s, torch.Generator().manual_seed(1))
        assert torch.equal(y3.permute(0, 2, 3, 1), y)
        if name in RANDOM:
            y4 = C.corrupt(x, name, s, torch.Generator().manual_seed(2))
            assert not torch.equal(y, y4), "another seed must give other noise"
        assert not torch.equal(y, x) or name == "pixelate"


# Mean |corrupted - clean| per severity on the photographs, with the same seed for every
# severity (common random numbers). Exceptions: properties of CIFAR-10-C's published parameters,
# not bugs here; the per-image references below show them too (96 images, mean |change| in levels
# for severities 1..5, reference / ours):
#  glass_blur  16.37 16.29 15.15 21.24 19.62 / 16.38 16.30 15.17 21.09 19.50: severity 1 (sigma
#    0.05: no blur, raw pixel swaps) changes as much as 2 and more than 3 (sigma 0.25/0.4 smooth
#    the swaps); 4 (2 swap passes, sigma 0.25) more than 5 (sigma 0.4).
#  elastic_transform  23.10 21.15 19.17 17.76 14.80 / 22.80 20.91 18.90 17.46 14.57: the random
#    affine shrinks with severity (2.56 -> 0.96 px) and dominates the small smoothed field, so the
#    pixel change *falls* with severity at every step.
#  frost  31.96 47.48 52.99 48.32 47.42 / 31.50 46.83 52.12 47.37 46.31: 0.9x+0.4f -> 0.85x+0.4f
#    -> 0.75x+0.45f: darkening the image cancels part of the added frost.
#  motion_blur: severities 3 (radius 6, sigma 2) and 4 (radius 8, sigma 2) differ only in taps of
#    weight exp(-13^2/8) < 1e-9, so for the same angle they give identical 8-bit images.
NON_MONOTONE = {
    "glass_blur": {(1, 2), (2, 3), (4, 5)},
    "elastic_transform": {(1, 2), (2, 3), (3, 4), (4, 5)},
    "frost": {(3, 4), (4, 5)},
}
EQUAL = {"motion_blur": {(3, 4)}}


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_severity_monotone(name):
    _skip_frost(name)
    x = torch.from_numpy(PHOTOS).repeat(4, 1, 1, 1)
    change = [
        (C.corrupt(x, name, s, torch.Generator().manual_seed(0)).float() - x.float())
        .abs()
        .mean()
        .item()
        for s in range(1, 6)
    ]
    for s in range(1, 5):
        if (s, s + 1) in NON_MONOTONE.get(name, ()):
            continue
        if (s, s + 1) in EQUAL.get(name, ()):
            assert change[s] == change[s - 1], f"{name}: change by severity {change}"
            continue
        assert change[s] > change[s - 1], f"{name}: change by severity {change}"


def test_corrupt_batch_mixed():
    """Per-sample types/severities: clean rows untouched, every group equals corrupt() of that
    group with the generator consumed in ascending (type, severity) order."""
    x = torch.from_numpy(PHOTOS).repeat(3, 1, 1, 1)  # 36
    B = x.shape[0]
    types = torch.arange(B) % 16
    if not HAS_FROST:
        types[types == C.TYPE_NAMES.index("frost")] = 0
    sev = torch.arange(B) % 5 + 1
    y = C.corrupt_batch(x, types, sev, torch.Generator().manual_seed(3))
    assert torch.equal(y[types == 0], x[types == 0])
    g = torch.Generator().manual_seed(3)
    keys = types * 8 + sev
    for key in torch.unique(keys).tolist():
        t, s = divmod(key, 8)
        if t == 0:
            continue
        m = keys == key
        assert torch.equal(y[m], C.corrupt(x[m], C.TYPE_NAMES[t], s, g)), (C.TYPE_NAMES[t], s)
    # a deterministic corruption of a sample does not depend on its batch mates
    m = types == C.TYPE_NAMES.index("contrast")
    assert torch.equal(
        y[m],
        torch.stack(
            [C.corrupt(x[i : i + 1], "contrast", int(sev[i]))[0] for i in m.nonzero().flatten()]
        ),
    )


def test_bad_input():
    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(C.CorruptionError, match="unknown corruption"):
        C.corrupt(x, "blur", 1)
    with pytest.raises(C.CorruptionError, match="severity"):
        C.corrupt(x, "contrast", 6)
    with pytest.raises(C.CorruptionError, match="uint8"):
        C.corrupt(x.float(), "contrast", 1)
    with pytest.raises(C.CorruptionError, match="32"):
        C.corrupt(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), "contrast", 1)
    with pytest.raises(C.CorruptionError, match="severities"):
        C.corrupt_batch(x, torch.tensor([1, 2]), torch.tensor([0, 3]))
    with pytest.raises(C.CorruptionError, match="type indices"):
        C.corrupt_batch(x, torch.tensor([1, 16]), torch.tensor([1, 3]))


def _agree(ours, ref, name):
    d = np.abs(ours.astype(int) - ref.astype(int))
    assert d.max() <= 1 and (d == 0).mean() >= 0.99, (
        f"{name}: max diff {d.max()}, exact {(d == 0).mean():.4f}"
    )


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_parity_deterministic(name):
    """Pixel agreement with the reference on real photographs, every severity: our uint8 must be
    the floor of the reference's float value, where a reference value within 1e-3 of an integer
    may floor to either side (float32 here vs float64 there; many values land exactly on
    integers, e.g. flat regions under a normalised blur, or V + c on the max channel)."""
    for s in range(1, 6):
        ours = C.corrupt(torch.from_numpy(PHOTOS), name, s).numpy().astype(int)
        ref = reference(name, PHOTOS, s, None, cast=False)
        lo, hi = np.floor(ref - 1e-3), np.floor(ref + 1e-3)
        bad = (ours < lo) | (ours > hi)
        assert not bad.any(), (
            f"{name} s{s}: {bad.sum()} pixels off, max diff {np.abs(ours - np.floor(ref)).max()}"
        )


def test_parity_motion_blur_kernel():
    """ImageMagick's motion blur at given angles (the random part fixed), incl. steep ones."""
    angles = torch.tensor(
        [-45.0, -30.0, -7.5, 0.0, 12.0, 33.0, 45.0, -90.0, -120.0, 60.0, 1.0, -44.9]
    )
    for r, sg in [(6, 1), (9, 2.5), (14, 12)]:
        x = torch.from_numpy(PHOTOS).permute(0, 3, 1, 2).float()
        ours = C._motion_blur(x, r, sg, angles).permute(0, 2, 3, 1).numpy().astype(np.uint8)
        ref = np.stack([ref_magick_motion(im, r, sg, float(a)) for im, a in zip(PHOTOS, angles)])
        _agree(ours, ref, f"motion r{r} s{sg}")


def test_parity_glass_blur_given_offsets():
    """The swap scan, fed the same random offsets as the reference: pixel agreement."""
    x = torch.from_numpy(PHOTOS)
    for s, it in [(1, 1), (3, 1), (4, 2)]:
        d = np.random.default_rng(s).integers(-1, 1, size=(it, 900, 2, len(PHOTOS)))
        perm = C._glass_permutation(d, 1)
        sigma = [0.05, 0.25, 0.4, 0.25, 0.4][s - 1]
        G = C._gauss_matrix(sigma, 4.0, "nearest", torch.device("cpu"))
        xf = x.permute(0, 3, 1, 2).float() / 255
        u8 = torch.floor(C._sep_filter(xf, G) * 255).reshape(len(x), 3, -1)
        y = u8.gather(2, perm[:, None].expand(-1, 3, -1)).view_as(xf) / 255
        ours = torch.floor(C._sep_filter(y, G).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
        ref = np.stack(
            [
                ref_glass_blur(im, s, None, offsets=d[..., b].reshape(it, 30, 30, 2))
                for b, im in enumerate(PHOTOS)
            ]
        )
        # float ties at the *first* np.uint8 (inside the algorithm) carry through the swaps and
        # the second blur: at sigma 0.25, 2% of the first blur's float64 values on these photos
        # are exact integers (flat regions), and ~1% floor to the other side in float32. So
        # here: within 1 level, exact on >= 98% of pixels.
        d = np.abs(ours - np.floor(ref))
        assert d.max() <= 1 and (d == 0).mean() >= 0.98, f"glass s{s}: {d.max()} {(d == 0).mean()}"


@pytest.mark.parametrize("use_cv2", [False, True])
def test_parity_elastic_given_draws(use_cv2):
    """Affine + smoothed field, fed the same random numbers as the reference, with the affine
    warp by scipy or by the release's own cv2 call: within 1 level, exact on >= 99% (float
    ties at the final floor; measured >= 99.97% exact)."""
    if use_cv2 and importlib.util.find_spec("cv2") is None:
        pytest.skip("cv2 (opencv-python, installed with imagecorruptions) not installed")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(PHOTOS).permute(0, 3, 1, 2).float() / 255
    B = len(PHOTOS)
    for s in range(1, 6):
        alpha, sigma, aff = [32 * v for v in ELASTIC[s - 1]]
        shift = rng.uniform(-aff, aff, size=(B, 3, 2))
        ux, uy = rng.uniform(-1, 1, size=(2, B, 32, 32))
        y = C._elastic(
            x,
            alpha,
            sigma,
            torch.from_numpy(shift),
            torch.from_numpy(ux).float(),
            torch.from_numpy(uy).float(),
        )
        ours = torch.floor(y.clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
        ref = np.stack(
            [
                ref_elastic_transform(im, s, None, shift[b], ux[b], uy[b], use_cv2)
                for b, im in enumerate(PHOTOS)
            ]
        ).astype(np.float64)
        d = np.abs(ours - np.floor(ref))
        assert d.max() <= 1 and (d == 0).mean() >= 0.99, f"s{s}: {d.max()} {(d == 0).mean()}"


def test_parity_plasma_given_draws():
    """Our batched diamond-square equals the reference fed the same uniforms."""
    g = torch.Generator().manual_seed(0)
    ours = C._plasma_fractal(1, 2.5, g, torch.device("cpu"))[0].numpy()
    g2 = torch.Generator().manual_seed(0)

    class Shim:  # rng.uniform(lo, hi, shape) from the same torch draws, in the same order
        def uniform(self, lo, hi, shape):
            return (
                lo + (hi - lo) * torch.rand((1,) + tuple(shape), generator=g2)[0].double().numpy()
            )

    ref = ref_plasma(Shim(), 2.5)
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.skipif(
    not HAS_FROST, reason="frost needs imagecorruptions: pip install imagecorruptions"
)
def test_frost_textures_match_release_resize():
    tex, sizes = C._frost_textures(torch.device("cpu"))
    for i, ref in ref_frost_textures().items():
        h, w = sizes[i].tolist()
        assert (h, w) == ref.shape[:2]
        assert np.array_equal(tex[i, :h, :w].numpy().astype(np.uint8), ref)


# Residual statistics of corrupted - clean, per image (mean, std, mean |.|), ours vs the
# reference on the same photographs: the difference of the two means in units of its standard
# error must stay within 4.5 (with 0.2 level of slack for float ties). Measured |z| were all
# below 2. Power, measured by comparing our severity s+1 with the reference's s (max z over the
# three statistics, s = 1..4): gaussian 58/38/14/13, shot 18/24/8/11, impulse 22/21/33/23, snow
# 41/5/15/12, fog 24/9/6/7, frost 13/13/3.5/8, glass 34/0.8/2.4/0.9, motion 3.3/1.8/0.6/1.3,
# elastic 1.2/0.8/0.2/1.6. So these statistics cannot tell adjacent severities of glass, motion
# and elastic apart; motion's kernel is checked exactly at fixed angles above.
N_STAT = {"glass_blur": 24, "snow": 48, "motion_blur": 48, "elastic_transform": 48}


@pytest.mark.parametrize("name", RANDOM)
def test_parity_random_statistics(name):
    _skip_frost(name)
    x = np.concatenate([PHOTOS] * (N_STAT.get(name, 96) // len(PHOTOS))).astype(float)
    rng = np.random.default_rng(0)
    for s in range(1, 6):
        ours = (
            C.corrupt(
                torch.from_numpy(x.astype(np.uint8)), name, s, torch.Generator().manual_seed(s)
            ).numpy()
            - x
        )
        ref = reference(name, x.astype(np.uint8), s, rng) - x
        for label, stat in (
            ("mean", lambda r: r.mean((1, 2, 3))),
            ("std", lambda r: r.reshape(len(r), -1).std(1)),
            ("mean|.|", lambda r: np.abs(r).mean((1, 2, 3))),
        ):
            a, b = stat(ours), stat(ref)
            se = math.sqrt(a.var() / len(a) + b.var() / len(b))
            assert abs(a.mean() - b.mean()) <= 4.5 * se + 0.2, (
                f"{name} s{s} {label}: ours {a.mean():.3f} vs reference {b.mean():.3f} "
                f"(se {se:.3f})"
            )

