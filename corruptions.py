"""
On-device CIFAR-10-C corruptions: the 15 benchmark corruptions of Hendrycks & Dietterich (2019) at
severities 1-5, as batched PyTorch ops on whatever device the batch lives on.

Standalone (torch + numpy; PIL or torchvision only to read the frost photographs and for the JPEG
codec), so you can copy this one file into another project.

    import corruptions
    y = corruptions.corrupt(x, "motion_blur", 3, generator=g)          # x: (B,32,32,3) uint8
    y = corruptions.corrupt_batch(x, types, severities, generator=g)  # per-sample type/severity

The parameters are the CIFAR ones of Hendrycks' generator (`make_cifar_c.py` in
hendrycks/robustness), not ImageNet-C's; see ../shared/reference/data-formats.md. Every function
works on x in [0, 1] (float32, (B,3,32,32)) and ends like the release: clip, x255, then `np.uint8`,
which truncates (floor). Where the release's last step was an 8-bit codec (ImageMagick's motion
blur PNG, PIL's resize, JPEG) the values are already integers, rounded as that codec rounds.

Randomness: every draw comes from `generator` (a torch.Generator), on the generator's device, and
is then moved to the images' device; a CPU generator therefore gives the same draws for CPU and
CUDA batches. Without a generator the global RNG of the images' device is used. The release set
no seed, so its files cannot be regenerated bit for bit; what we match is the algorithm.
"""

import functools
import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

# The benchmark's 15, in CIFAR-10-C's order.
CORRUPTIONS = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression"
]
# The thesis's 10 training corruptions (thesis 3.4): corruption-token types 1..10 (data.TYPES).
SEEN = [
    "brightness", "defocus_blur", "zoom_blur", "motion_blur", "fog", "frost", "snow", "shot_noise",
    "gaussian_noise", "jpeg_compression"
]
# The other 5 benchmark corruptions, never seen in training: type indices 11..15.
UNSEEN = ["impulse_noise", "glass_blur", "contrast", "elastic_transform", "pixelate"]
TYPE_NAMES = ["clean"] + SEEN + UNSEEN

SIZE = 32  # CIFAR's parameters (plasma map, elastic IMSIZE, glass scan range) assume 32x32


class CorruptionError(ValueError):
    """Bad input to corrupt()/corrupt_batch(), or a missing optional dependency."""


# ---------------------------------------------------------------------------------------------
# random draws: on the generator's device, then moved to the images' device


def _draw(fn, shape, gen, device, *args):
    """fn(*args, shape) (torch.rand/randn/randint) from gen, on gen's device, moved to device."""
    draw_device = gen.device if gen is not None else device
    return fn(*args, shape, generator=gen, device=draw_device).to(device)


def _to255(y01):
    return y01.clamp_(0, 1).mul_(255)  # in place: y01 is always a fresh temporary


# ---------------------------------------------------------------------------------------------
# shared building blocks


@functools.cache
def _gauss_matrix(sigma, truncate, mode, device):
    """(32,32) operator of scipy.ndimage's 1-D Gaussian filter along one axis, borders included:
    mode 'nearest' (edge repeated; skimage gaussian's default) or 'reflect' (half-sample
    symmetric, d c b a | a b c d). Taps exp(-t^2/2s^2), normalised, radius int(truncate*s+0.5).
    A separable filter of a batch is then G @ X @ G^T: two small batched matmuls."""
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2) if r > 0 else torch.ones(1, dtype=torch.float64)
    k = k / k.sum()
    G = torch.zeros(SIZE, SIZE, dtype=torch.float64)
    for o in range(SIZE):
        for t in range(-r, r + 1):
            i = o + t
            if mode == "nearest":
                i = min(max(i, 0), SIZE - 1)
            else:
                i = -i - 1 if i < 0 else (2 * SIZE - 1 - i if i >= SIZE else i)
            G[o, i] += k[t + r]
    return G.float().to(device)


def _sep_filter(x, G):
    return G @ x @ G.T  # (..., 32, 32): columns then rows


@functools.cache
def _zoom_matrix(z, device):
    """(32,32) 1-D operator of the release's clipped_zoom: crop the centre ceil(32/z), scale by z
    with scipy ndimage.zoom(order=1) (align-corners: out o samples in o*(in-1)/(out-1)), keep the
    top-left-centred 32. Row o of the matrix holds the linear-interpolation weights of output o."""
    ch = math.ceil(SIZE / z)
    top = (SIZE - ch) // 2
    out = round(ch * z)
    trim = (out - SIZE) // 2
    A = np.zeros((SIZE, SIZE))
    for o in range(SIZE):
        c = (o + trim) * (ch - 1) / (out - 1)
        i0 = math.floor(c)
        f = c - i0
        A[o, top + i0] += 1 - f
        if f > 0:
            A[o, top + i0 + 1] += f
    return torch.tensor(A, dtype=torch.float32, device=device)


def _motion_blur(x, radius, sigma, angles):
    """ImageMagick's MotionBlurImage on (B,C,H,W) float values 0..255, one angle (degrees) per
    sample. Width 2*ceil(radius)+1 one-sided taps exp(-i^2/2s^2), normalised; tap i reads pixel
    (x + ceil(i cos a - 0.5), y + ceil(i sin a - 0.5)), edge pixels repeated. Rounded to 8 bits
    like the PNG the release decoded. One batched gather per tap, no per-image loop."""
    B, C, H, W = x.shape
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float64)
    w = torch.exp(-i * i / (2 * sigma * sigma))
    w = (w / w.sum()).tolist()
    a = torch.deg2rad(angles.double().cpu())[:, None]  # (B,1), float64 as in C
    ox = torch.ceil(i[None] * torch.cos(a) - 0.5).long().to(x.device)  # (B,width)
    oy = torch.ceil(i[None] * torch.sin(a) - 0.5).long().to(x.device)
    # edge pixels repeated = replicate padding by the longest offset; then tap t of sample b is
    # the padded image read at base + (oy*Wp + ox): one broadcast add and one gather per tap
    P = width - 1
    Wp = W + 2 * P
    flat = F.pad(x, (P, P, P, P), mode="replicate").reshape(B, C, -1)
    base = (
        (torch.arange(H, device=x.device)[:, None] + P) * Wp
        + torch.arange(W, device=x.device)[None]
        + P
    ).view(1, H * W)
    shift = oy * Wp + ox  # (B, width)
    out = torch.zeros(B, C, H * W, device=x.device)
    for t in range(width):
        idx = (base + shift[:, t, None]).view(B, 1, H * W).expand(B, C, H * W)
        out.add_(flat.gather(2, idx), alpha=w[t])
    return out.add_(0.5).floor_().clamp_(0, 255).view(B, C, H, W)


# ---------------------------------------------------------------------------------------------
# the 15 corruptions: f(x in [0,1] (B,3,32,32) float32, severity, generator) -> values 0..255


def gaussian_noise(x, s, g):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return _to255(_draw(torch.randn, x.shape, g, x.device).mul_(c).add_(x))


def shot_noise(x, s, g):
    c = [500, 250, 100, 75, 50][s - 1]
    dev = g.device if g is not None else x.device
    return _to255(torch.poisson((x * c).to(dev), generator=g).to(x.device) / c)


def impulse_noise(x, s, g):
    # skimage random_noise(mode='s&p'): each element flipped with p=amount, salt or pepper 50/50.
    # (skimage <0.15 drew a fixed count of coordinates instead; same density, see the report.)
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    u = _draw(torch.rand, x.shape, g, x.device)  # one uniform: u < c/2 salt, c/2 <= u < c pepper
    y = torch.where(u < c / 2, 1.0, x)
    return _to255(torch.where((u >= c / 2) & (u < c), 0.0, y))


@functools.cache
def _defocus_kernel(s, device):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    L = np.arange(-8, 9)  # all CIFAR radii are <= 8: 17x17 grid, 3x3 alias blur
    X, Y = np.meshgrid(L, L)
    d = ((X**2 + Y**2) <= radius**2).astype(np.float32)
    d /= d.sum()
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias**2))  # OpenCV getGaussianKernel(3, alias)
    g /= g.sum()
    d = torch.tensor(d, dtype=torch.float64)[None, None]
    g = torch.tensor(g)
    d = F.conv2d(F.pad(d, (1, 1, 1, 1), mode="reflect"), g.view(1, 1, 1, 3))
    d = F.conv2d(d, g.view(1, 1, 3, 1))[0, 0]
    # the disk (r <= 1.5) plus the 3x3 blur fits in 5x5; everything outside is exactly 0
    nz = d.abs().sum(0).nonzero()
    r = int(max(8 - nz.min(), nz.max() - 8))
    return d[8 - r : 9 + r, 8 - r : 9 + r].float().to(device)


@functools.cache
def _defocus_operator(s, device):
    """OpenCV filter2D with the disk kernel, default border reflect-101 (= F.pad 'reflect'), as a
    dense (1024,1024) map: the responses to the 1024 one-pixel images. One matmul per batch beats
    a grouped 5x5 convolution on CPU and is exact (the filter is linear)."""
    k = _defocus_kernel(s, torch.device("cpu")).double()
    r = (k.shape[0] - 1) // 2
    eye = torch.eye(SIZE * SIZE, dtype=torch.float64).view(-1, 1, SIZE, SIZE)
    R = F.conv2d(F.pad(eye, (r, r, r, r), mode="reflect"), k[None, None])
    return R.view(SIZE * SIZE, SIZE * SIZE).float().to(device)  # row j: response to pixel j


def defocus_blur(x, s, g):
    R = _defocus_operator(s, x.device)
    return _to255((x.reshape(-1, SIZE * SIZE) @ R).view(x.shape))


def _glass_permutation(d, delta):
    """The release's swap loop as a permutation: d (iters, n*n, 2, B) offsets (dx, dy), scan
    position j = (31-h)*n + (31-w). Returns (B,1024): source pixel of each position. numpy,
    position-major, so each step touches one contiguous row (less per-call cost than torch)."""
    B = d.shape[-1]
    pos = [
        h * SIZE + w for h in range(SIZE - delta, delta, -1) for w in range(SIZE - delta, delta, -1)
    ]
    perm = np.tile(np.arange(SIZE * SIZE)[:, None], (1, B))
    cols = np.arange(B)
    for it in range(d.shape[0]):
        for j, a in enumerate(pos):
            b = a + d[it, j, 1] * SIZE + d[it, j, 0]
            pa = perm[a].copy()
            perm[a] = perm[b, cols]
            perm[b, cols] = pa
    return torch.from_numpy(perm.T.copy())


def glass_blur(x, s, g):
    levels = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)]
    sigma, delta, iters = levels[s - 1]
    B = x.shape[0]
    G = _gauss_matrix(sigma, 4.0, "nearest", x.device)  # skimage gaussian: truncate 4, 'nearest'
    u8 = torch.floor(_sep_filter(x, G) * 255)  # the release's np.uint8(...)
    # Local pixel swaps, scanning rows h and columns w from 31 down to 2; np.random.randint(-1, 1)
    # gives offsets in {-1, 0}. The swaps don't depend on pixel values, so we run them on a
    # per-sample permutation of the 1024 positions (one batched step per scan position) and
    # gather the pixels once at the end.
    n = SIZE - 2 * delta
    d = _draw(torch.randint, (iters, n * n, 2, B), g, "cpu", -delta, delta).numpy()  # (dx, dy)
    perm = _glass_permutation(d, delta).to(x.device).view(B, 1, -1).expand(B, 3, -1)
    y = u8.reshape(B, 3, -1).gather(2, perm).view_as(x) / 255
    return _to255(_sep_filter(y, G))


def motion_blur(x, s, g):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    angles = _draw(torch.rand, x.shape[0], g, x.device) * 90 - 45
    # the release went through an 8-bit PNG both ways: uint8 in, rounded 8-bit out
    return _motion_blur(torch.round(x * 255), radius, sigma, angles)


@functools.cache
def _zoom_blur_operator(s, device):
    # np.arange's float quirk: arange(1, 1.16, 0.01) has 16 factors (not 17): keep numpy's.
    E = [1.06, 1.11, 1.16, 1.21, 1.26][s - 1]
    zs = np.arange(1, E, 0.01)
    M = torch.eye(SIZE * SIZE, dtype=torch.float64)
    for z in zs:
        A = _zoom_matrix(float(z), torch.device("cpu")).double()
        M += torch.kron(A, A)  # separable zoom as one (1024,1024) linear map
    return (M / (len(zs) + 1)).float().to(device)


def zoom_blur(x, s, g):
    M = _zoom_blur_operator(s, x.device)
    return _to255((x.reshape(-1, SIZE * SIZE) @ M.T).view_as(x))


def snow(x, s, g):
    loc, scale, z, thr, mb_r, mb_s, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][s - 1]
    B = x.shape[0]
    layer = loc + scale * _draw(torch.randn, (B, SIZE, SIZE), g, x.device)
    A = _zoom_matrix(float(z), x.device)
    layer = A @ layer @ A.T
    layer = torch.where(layer < thr, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255)[:, None]  # the release's uint8 'L' PNG
    angles = _draw(torch.rand, B, g, x.device) * 90 - 135
    layer = _motion_blur(layer, mb_r, mb_s, angles) / 255
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # cv2 RGB2GRAY
    x = blend * x + (1 - blend) * torch.maximum(x, gray * 1.5 + 0.5)
    return _to255(x + layer + layer.flip(-1, -2))  # + the layer rotated 180 degrees


def frost_dir():
    """Folder of Hendrycks' frost photographs inside the `imagecorruptions` package. Located
    without importing it (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise CorruptionError(
            "frost needs the frost photographs shipped by the imagecorruptions "
            "package: pip install imagecorruptions"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), "frost")


def _read_rgb(path):
    try:
        from PIL import Image

        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB")))  # alpha dropped, like cv2
    except ImportError:
        from torchvision.io import ImageReadMode, read_image

        return read_image(path, mode=ImageReadMode.RGB).permute(1, 2, 0)


def _resize_linear(img, factor):
    """OpenCV resize(fx=fy=factor, INTER_LINEAR) of (H,W,3) uint8: output size round(n*factor),
    half-pixel centres, source (d+0.5)/factor-0.5, clamped; rounded. At factor 0.2 the sources
    land on whole pixels (5d+2), so this is an exact subsample, as OpenCV's is."""
    out = img.double()
    for dim in (0, 1):
        n = img.shape[dim]
        m = round(n * factor)
        src = ((torch.arange(m, dtype=torch.float64) + 0.5) / factor - 0.5).clamp(0, n - 1)
        i0 = src.floor().long()
        f = (src - i0).view([-1, 1, 1] if dim == 0 else [1, -1, 1])
        i1 = (i0 + 1).clamp(max=n - 1)
        out = out.index_select(dim, i0) * (1 - f) + out.index_select(dim, i1) * f
    return torch.floor(out + 0.5)


@functools.cache
def _frost_textures(device):
    """frost1..frost5 (the release draws randint(5), so frost6 is never used), resized by 0.2,
    zero-padded into one (5,Hmax,Wmax,3) tensor, plus each texture's (H, W)."""
    folder = frost_dir()
    texs = []
    for i in range(1, 6):
        name = [f for f in sorted(os.listdir(folder)) if f.startswith(f"frost{i}.")]
        if not name:
            raise CorruptionError(
                f"{folder}: frost{i} photograph missing; reinstall imagecorruptions"
            )
        texs.append(_resize_linear(_read_rgb(os.path.join(folder, name[0])), 0.2).float())
    H = max(t.shape[0] for t in texs)
    W = max(t.shape[1] for t in texs)
    out = torch.zeros(5, H, W, 3)
    for i, t in enumerate(texs):
        out[i, : t.shape[0], : t.shape[1]] = t
    sizes = torch.tensor([t.shape[:2] for t in texs])
    return out.to(device), sizes.to(device)


def frost(x, s, g):
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    tex, sizes = _frost_textures(x.device)
    B = x.shape[0]
    idx = _draw(torch.randint, (B,), g, x.device, 0, 5)
    hw = sizes[idx] - SIZE  # randint(0, H-32): exclusive
    start = (_draw(torch.rand, (B, 2), g, x.device) * hw).long()  # (row, col) per sample
    ar = torch.arange(SIZE, device=x.device)
    r = (start[:, 0, None] + ar)[:, :, None]
    c = (start[:, 1, None] + ar)[:, None, :]
    crop = tex[idx[:, None, None], r, c].permute(0, 3, 1, 2)  # (B,3,32,32) RGB
    # frost works on 0..255 values: clip(a x + b frost, 0, 255)
    return (a * torch.round(x * 255) + b * crop).clamp(0, 255)


def _plasma_fractal(B, decay, g, device):
    """Diamond-square heightmap (B,32,32) normalised to [0,1], all samples at once. numpy axis 0
    is dim 1 here. Each wibble adds wibble * U(-wibble, wibble) (the release's quirk)."""
    m = torch.zeros(B, SIZE, SIZE, device=device)  # float32: normalised at the end anyway
    step, wibble = SIZE, 100.0

    def wibbled(a):
        u = _draw(torch.rand, a.shape, g, device).mul_(2 * wibble * wibble).sub_(wibble * wibble)
        return u.add_(a, alpha=0.25)

    while step >= 2:
        h = step // 2
        corner = m[:, 0::step, 0::step]  # fill the squares
        sq = corner + corner.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, h::step, h::step] = wibbled(sq)
        dr = m[:, h::step, h::step]  # fill the diamonds
        ul = m[:, 0::step, 0::step]
        m[:, 0::step, h::step] = wibbled(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, h::step, 0::step] = wibbled(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def fog(x, s, g):
    c, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    mx = x.amax(dim=(1, 2, 3), keepdim=True)
    x = x + c * _plasma_fractal(x.shape[0], decay, g, x.device)[:, None]
    return _to255(x * mx / (mx + c))


def brightness(x, s, g):
    # skimage rgb2hsv -> V += c (clipped) -> hsv2rgb keeps hue and saturation, so it is exactly
    # rgb * V'/V (and V' gray where V = 0): one pointwise op instead of the HSV round trip.
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(max=1)
    y = torch.where(v > 0, x * (v2 / v.clamp(min=1e-12)), v2.expand_as(x))
    return _to255(y)


def contrast(x, s, g):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    m = x.mean(dim=(2, 3), keepdim=True)
    return _to255(torch.add(m * (1 - c), x, alpha=c))  # (x - m) c + m in one pass


def _reflect101(c, n):
    """Reflect coordinates about pixel centres 0 and n-1 (OpenCV BORDER_REFLECT_101)."""
    c = torch.remainder(c, 2 * (n - 1))
    return torch.where(c > n - 1, 2 * (n - 1) - c, c)


def _reflect_half(c, n):
    """scipy map_coordinates mode='reflect' for order 1: half-sample symmetric about -0.5 and
    n-0.5; a coordinate in the outer half pixel reads the edge pixel, i.e. clamp."""
    c = torch.remainder(c + 0.5, 2 * n)
    c = torch.where(c >= n, 2 * n - c, c) - 0.5
    return c.clamp(0, n - 1)


def _bilinear(x, rows, cols):
    """Sample (B,C,H,W) at per-sample pixel coordinates rows/cols (B,H,W), already in range."""
    n = SIZE - 1
    grid = torch.stack([cols / n * 2 - 1, rows / n * 2 - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def elastic_transform(x, s, g):
    alpha, sigma, aff = [
        (0, 0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    ][s - 1]
    alpha, sigma, aff = SIZE * alpha, SIZE * sigma, SIZE * aff
    B, dev = x.shape[0], x.device
    # random affine: three points (x, y) moved by U(-aff, aff); uniform fields for dx, dy
    shift = (_draw(torch.rand, (B, 3, 2), g, dev).double().cpu() * 2 - 1) * aff
    ux = _draw(torch.rand, (B, SIZE, SIZE), g, dev) * 2 - 1
    uy = _draw(torch.rand, (B, SIZE, SIZE), g, dev) * 2 - 1
    return _to255(_elastic(x, alpha, sigma, shift, ux, uy))


def _elastic(x, alpha, sigma, shift, ux, uy):
    """The deterministic part of elastic_transform: affine of shifted points, then the field."""
    B, dev = x.shape[0], x.device
    # cv2.getAffineTransform(p1, p2) with p2 = p1 + shift, then warpAffine (reflect-101 borders)
    p1 = torch.tensor([[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]], dtype=torch.float64)
    p2 = p1 + shift
    P = torch.cat([p1, torch.ones(3, 1, dtype=torch.float64)], 1)  # (3,3)
    # warpAffine reads src at M^-1 (dst): solve the inverse map p2 -> p1 directly
    Q = torch.cat([p2, torch.ones(B, 3, 1, dtype=torch.float64)], 2)  # (B,3,3)
    Minv = torch.linalg.solve(Q, P.expand(B, 3, 3)).transpose(1, 2)  # (B,2,3)
    Minv = Minv.float().to(dev)
    yy, xx = torch.meshgrid(
        torch.arange(SIZE, device=dev, dtype=torch.float32),
        torch.arange(SIZE, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    sx = Minv[:, 0, 0, None, None] * xx + Minv[:, 0, 1, None, None] * yy + Minv[:, 0, 2, None, None]
    sy = Minv[:, 1, 0, None, None] * xx + Minv[:, 1, 1, None, None] * yy + Minv[:, 1, 2, None, None]
    # exact coordinates, as scipy and OpenCV 5's warpAffine here (OpenCV 3/4 rounded them to 1/32
    # px, INTER_BITS = 5: at most 1/64 px apart)
    x = _bilinear(x, _reflect101(sy, SIZE), _reflect101(sx, SIZE))
    # smoothed random displacement (dx on columns, dy on rows), map_coordinates mode='reflect'
    if alpha > 0:
        # skimage gaussian(mode='reflect', truncate=3)
        G = _gauss_matrix(sigma, 3.0, "reflect", dev)
        dx = _sep_filter(ux, G) * alpha
        dy = _sep_filter(uy, G) * alpha
        x = _bilinear(x, _reflect_half(yy + dy, SIZE), _reflect_half(xx + dx, SIZE))
    return x


@functools.cache
def _pil_box_matrix(n_in, n_out, device):
    """Pillow's BOX resample weights (precompute_coeffs): window centre (o+0.5)*scale, support
    0.5*max(scale,1), candidate inputs [int(centre-support+0.5), int(centre+support+0.5)),
    box(t) = 1 for -0.5 <= t < 0.5 on (x - centre + 0.5)/filterscale, normalised per output."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    support = 0.5 * fs
    A = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        for i in range(lo, hi):
            t = (i - centre + 0.5) / fs
            if -0.5 <= t < 0.5:
                A[o, i] = 1.0
        A[o] /= A[o].sum()
    return torch.tensor(A, dtype=torch.float32, device=device)


def _pil_resize(x255, n):
    """PIL resize(BOX) of (B,C,H,W) 0..255 values to n x n: horizontal pass then vertical, each
    rounded to 8 bits like Pillow's uint8 intermediate."""
    A = _pil_box_matrix(x255.shape[-1], n, x255.device)
    # box weights are >= 0 and sum to 1, so values stay in 0..255: no clamp needed
    y = (x255 @ A.T).add_(0.5).floor_()  # horizontal
    return (A @ y).add_(0.5).floor_()  # vertical


def pixelate(x, s, g):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    y = _pil_resize(torch.round(x * 255), int(SIZE * c))
    return _pil_resize(y, SIZE)


def jpeg_compression(x, s, g):
    import warnings

    q = [80, 65, 58, 50, 40][s - 1]
    u8 = torch.round(x * 255).to(torch.uint8).contiguous()  # the codecs want dense CHW images
    with warnings.catch_warnings():  # torchvision 0.29 flags its codecs as moving to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, encode_jpeg

        # a list in, a list out: on CUDA tensors torchvision batches through nvjpeg (GPU codec);
        # on CPU it is libjpeg, one image after another (the codec's loop, not ours)
        dec = decode_jpeg(encode_jpeg(list(u8), quality=q), device=x.device)
    return torch.stack(dec).float()


_FUNCS = {
    f.__name__: f
    for f in (
        gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur,
        snow, frost, fog, brightness, contrast, elastic_transform, pixelate, jpeg_compression
    )
}
assert list(_FUNCS) == CORRUPTIONS


# ---------------------------------------------------------------------------------------------
# public API


def _check_images(images):
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        raise CorruptionError(
            "images must be a uint8 tensor (B,32,32,3) or (B,3,32,32), got "
            f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[1:] == (SIZE, SIZE, 3):
        return True
    if images.shape[1:] == (3, SIZE, SIZE):
        return False
    raise CorruptionError(f"images must be (B,32,32,3) or (B,3,32,32), got {tuple(images.shape)}")


def corrupt(images, name, severity, generator=None):
    """Apply one corruption at one severity (1..5) to a uint8 batch (B,32,32,3) or (B,3,32,32) on
    any device. Returns the same shape, dtype and device."""
    hwc = _check_images(images)
    if name not in _FUNCS:
        raise CorruptionError(f"unknown corruption {name!r}; expected one of {CORRUPTIONS}")
    if int(severity) != severity or not 1 <= severity <= 5:
        raise CorruptionError(f"severity must be an integer 1..5, got {severity!r}")
    if images.shape[0] == 0:
        return images.clone()
    # (B,32,32,3) permuted is a channels_last (B,3,32,32): no copy; conv and pointwise ops keep
    # that layout, so the permute back at the end is free as well
    x = images.permute(0, 3, 1, 2) if hwc else images
    x = x.float().div_(255)
    y = _FUNCS[name](x, int(severity), generator)
    # the release's np.uint8 truncation: float -> uint8 truncates, and y >= 0 after the clamp
    y = y.clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous() if hwc else y


def corrupt_batch(images, types, severities, generator=None):
    """Per-sample corruption: types (B,) index TYPE_NAMES (0 = clean passes through unchanged,
    1..10 = the thesis's SEEN, 11..15 = UNSEEN), severities (B,) in 1..5 (ignored for clean).
    Samples are grouped by (type, severity) and each group is one corrupt() call, groups taken
    in ascending (type, severity) order with the same generator; so the result equals those
    corrupt() calls made in that order."""
    _check_images(images)
    types = torch.as_tensor(types, device=images.device).long().view(-1)
    sev = torch.as_tensor(severities, device=images.device).long().view(-1)
    if types.numel() != images.shape[0] or sev.numel() != images.shape[0]:
        raise CorruptionError(
            f"types ({types.numel()}) and severities ({sev.numel()}) must have "
            f"one entry per image ({images.shape[0]})"
        )
    if types.numel() and (types.min() < 0 or types.max() >= len(TYPE_NAMES)):
        raise CorruptionError(f"type indices must be in 0..{len(TYPE_NAMES) - 1} (TYPE_NAMES)")
    sev = torch.where(types == 0, torch.zeros_like(sev), sev)
    bad = (types > 0) & ((sev < 1) | (sev > 5))
    if bad.any():
        raise CorruptionError("severities must be in 1..5 for every corrupted sample")
    out = images.clone()
    keys = types * 8 + sev
    for key in torch.unique(keys).tolist():  # sorted ascending
        t, s = divmod(key, 8)
        if t == 0:
            continue
        idx = (keys == key).nonzero().squeeze(1)
        out[idx] = corrupt(images[idx], TYPE_NAMES[t], s, generator)
    return out
