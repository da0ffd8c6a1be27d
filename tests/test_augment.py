"""augment.py: crop + flip, RandAugment, Random Erasing, Mixup / CutMix, normalize and the
teacher's view, on random uint8 batches, against torchvision (the thesis's implementations) or
direct per-image references. CPU only, no files."""

import math

import pytest
import torch
import torch.nn.functional as F

import augment

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n,), generator=g),
        torch.randint(0, 11, (n,), generator=g),
    )


def test_normalize_and_teacher_view():
    x, _, _ = _batch(4)
    mean = torch.tensor(augment.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.STD).view(1, 3, 1, 1)
    ref = (x.float() / 255 - mean) / std
    assert torch.allclose(augment.normalize(x), ref, atol=1e-5)
    for mode in ("bicubic", "bilinear"):
        up = F.interpolate(
            x.float(), size=(224, 224), mode=mode, align_corners=False, antialias=False
        )
        up = up.clamp(0, 255) if mode == "bicubic" else up
        got = augment.teacher_view(x, 224, mode)
        assert got.shape == (4, 3, 224, 224) and got.dtype == torch.float32
        assert torch.allclose(got, (up / 255 - mean) / std, atol=1e-5)
    assert augment.teacher_view(x, 224, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_flip_against_direct(mode):
    x, _, _ = _batch(20)
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 9, (20,), generator=g), torch.randint(0, 9, (20,), generator=g)
    flip = torch.rand(20, generator=g) < 0.5
    got = augment.crop_flip(x, dy, dx, flip, 4, mode)
    padded = F.pad(x.float(), (4, 4, 4, 4), mode=mode).to(torch.uint8)
    for i in range(20):
        ref = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(got[i], ref.flip(-1) if flip[i] else ref)


def test_augment_crop_flip_outputs_are_crops():
    x, y, t = _batch(32)
    aug = augment.Augment(crop_padding=4, flip=True, mixup_prob=0, erase_prob=0)
    out, y2, t2 = aug(x, y, t, torch.Generator().manual_seed(0))
    assert (
        out.dtype == torch.float32
        and out.shape == x.shape
        and torch.equal(y2, y)
        and torch.equal(t2, t)
    )
    padded = augment.normalize(F.pad(x, (4, 4, 4, 4)))
    flips = 0
    for i in range(32):
        cands = [
            (f, a, b)
            for f in (0, 1)
            for a in range(9)
            for b in range(9)
            if torch.allclose(
                out[i],
                padded[i, :, a : a + 32, b : b + 32].flip(-1)
                if f
                else padded[i, :, a : a + 32, b : b + 32],
            )
        ]
        assert cands, f"sample {i} is not a crop/flip of its input"
        flips += cands[0][0]
    assert 4 <= flips <= 28


def test_defaults_are_the_thesis_recipe():
    """No crop, flip, CutMix or RandAugment; the unmixed, unerased batch is just normalised."""
    x, y, t = _batch(64)
    aug = augment.Augment(mixup_prob=0, erase_prob=0)
    out, y2, t2 = aug(x, y, t, torch.Generator().manual_seed(0))
    assert torch.equal(out, augment.normalize(x)) and torch.equal(y2, y) and torch.equal(t2, t)
    d = augment.Augment()
    assert (d.mixup_prob, d.mixup_alpha, d.erase_prob, d.erase_mode) == (0.3, 1.0, 0.25, "zero")
    assert (d.cutmix_prob, d.randaug_ops, d.crop_padding, d.flip, d.per_batch) == (
        0.0,
        0,
        0,
        False,
        True,
    )


@pytest.mark.parametrize("draw_per", ["batch", "image"])
def test_augment_deterministic_with_generator(draw_per):
    x, y, t = _batch(64)
    aug = augment.Augment(
        mixup_prob=0.5, cutmix_prob=0.5, randaug_ops=2, erase_prob=0.5, draw_per=draw_per
    )
    a = aug(x, y, t, torch.Generator().manual_seed(5))
    b = aug(x, y, t, torch.Generator().manual_seed(5))
    c = aug(x, y, t, torch.Generator().manual_seed(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_mixup_matches_torchvision():
    """Same lambda -> the same images (before the uint8 cast) and labels as torchvision's MixUp; the
    type targets stay hard unless mix_types, then they share the labels' lambda."""
    from torchvision.transforms import v2

    x, y, t = _batch(64)
    aug = augment.Augment(erase_prob=0, mixup_prob=1.0)
    out, ys, ts = aug(x, y, t, torch.Generator().manual_seed(0))
    assert ys.shape == (64, 10) and ys.dtype == torch.float32 and torch.equal(ts, t)
    i = int((y != y.roll(1, 0)).nonzero()[0])
    lam = float(ys[i, y[i]])
    ref = v2.MixUp(num_classes=10)
    params = {"lam": lam, "labels": y, "batch_size": 64}
    want_x = ref.transform(x.float(), params).floor()
    std = torch.tensor(augment.STD).view(1, 3, 1, 1)
    levels = (out - augment.normalize(want_x)).abs() * 255 * std
    # lam read back from float32 targets: the uint8 cast may round a pixel on an integer the other
    # way
    assert levels.max() < 1.01 and (levels > 1e-3).float().mean() < 1e-3
    assert torch.allclose(ys, ref.transform(y, params), atol=1e-6)
    mix_types = augment.Augment(erase_prob=0, mixup_prob=1.0, mix_types=True)
    _, ys2, ts2 = mix_types(x, y, t, torch.Generator().manual_seed(0))
    want_t = v2.MixUp(num_classes=11).transform(t, dict(params, labels=t))
    assert torch.equal(ys2, ys) and torch.allclose(ts2, want_t)
    # with probability 0.3 only some batches mix; unmixed batches keep int64 targets
    aug = augment.Augment(mixup_prob=0.3)
    g = torch.Generator().manual_seed(0)
    kinds = [aug(x, y, t, g)[1].dtype for _ in range(40)]
    assert 3 <= kinds.count(torch.float32) <= 22 and torch.int64 in kinds


def test_cutmix_targets_and_both_mixes():
    x, y, t = _batch(64)
    aug = augment.Augment(erase_prob=0, mixup_prob=0, cutmix_prob=1.0)
    out, ys, ts = aug(x, y, t, torch.Generator().manual_seed(2))
    assert torch.allclose(ys.sum(1), torch.ones(64)) and torch.equal(ts, t)
    same = (out == augment.normalize(x)).all(1)  # (B, H, W) pixels kept
    pasted = (out == augment.normalize(x.roll(1, 0))).all(1)
    assert torch.equal(same | pasted, torch.ones_like(same))  # every pixel from i or i-1
    box = (~same).any(0)  # one box, shared by the batch
    rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
    assert box.sum() == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    i = int((y != y.roll(1, 0)).nonzero()[0])
    assert abs(float(ys[i, y[i]]) - (1 - float(box.float().mean()))) < 1e-6
    # the thesis draws Mixup and CutMix independently: both may fire on one batch
    aug = augment.Augment(erase_prob=0, mixup_prob=1.0, cutmix_prob=1.0)
    out, ys, _ = aug(x, y, t, torch.Generator().manual_seed(2))
    # labels of i, i-1, i-2
    assert torch.allclose(ys.sum(1), torch.ones(64)) and int((ys > 0).sum(1).max()) == 3


def _erased(out, x):
    return (out != augment.normalize(x)).any(1)  # (B, H, W) erased pixels


def test_random_erasing_boxes_per_image():
    x, y, t = _batch(400)
    aug = augment.Augment(mixup_prob=0, erase_prob=1.0, draw_per="image")
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    diff, zero = _erased(out, x), augment.normalize(torch.zeros(1, 3, 1, 1))
    erased, areas, aspects = 0, [], []
    for i in range(400):
        if not diff[i].any():
            continue
        erased += 1
        rows, cols = diff[i].any(1).nonzero()[:, 0], diff[i].any(0).nonzero()[:, 0]
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert diff[i].sum() == h * w and h < 32 and w < 32  # one filled rectangle
        box = out[i, :, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert torch.allclose(box, zero[0].expand_as(box), atol=1e-5)  # fill 0 before normalising
        areas.append(h * w / 1024)
        aspects.append(h / w)
    assert erased >= 390
    # torchvision's scale (0.02, 0.33) and ratio (0.3, 3.3), up to rounding h and w to pixels
    assert (
        0.02 * 0.7 <= min(areas)
        and max(areas) <= 0.33 * 1.2
        and 0.1 < sum(areas) / len(areas) < 0.25
    )
    assert 0.3 / 1.6 <= min(aspects) and max(aspects) <= 3.3 * 1.6
    aug = augment.Augment(mixup_prob=0, erase_prob=0.25, draw_per="image")
    frac = (
        _erased(aug(x, y, t, torch.Generator().manual_seed(0))[0], x)
        .flatten(1)
        .any(1)
        .float()
        .mean()
    )
    assert 0.17 <= frac <= 0.33
    aug = augment.Augment(mixup_prob=0, erase_prob=1.0, erase_mode="pixel", draw_per="image")
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    noise = out[_erased(out, x).unsqueeze(1).expand_as(out)]
    assert 0.9 < float(noise.std()) < 1.1 and abs(float(noise.mean())) < 0.1  # timm: N(0, 1) noise


def test_random_erasing_per_batch_as_the_thesis():
    """torchvision's RandomErasing called on a batch: one decision and one rectangle for all
    images."""
    x, y, t = _batch(16)
    aug = augment.Augment(mixup_prob=0, erase_prob=0.25)
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(60):
        d = _erased(aug(x, y, t, g)[0], x)
        assert (d == d[0]).all()
        hits += bool(d.any())
    assert 6 <= hits <= 26


# ----------------------------------------------------------------------------------- RandAugment


def _torchvision_op(name, img, m):
    """torchvision.transforms.autoaugment._apply_op with NEAREST and fill None, via
    v2.functional."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    near = InterpolationMode.NEAREST
    shear = [math.degrees(math.atan(m)), 0.0]
    calls = {
        "Identity": lambda: img,
        "ShearX": lambda: TF.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=shear,
            interpolation=near,
            fill=None,
            center=[0, 0],
        ),
        "ShearY": lambda: TF.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=shear[::-1],
            interpolation=near,
            fill=None,
            center=[0, 0],
        ),
        "TranslateX": lambda: TF.affine(
            img,
            angle=0.0,
            translate=[int(m), 0],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=near,
            fill=None,
        ),
        "TranslateY": lambda: TF.affine(
            img,
            angle=0.0,
            translate=[0, int(m)],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=near,
            fill=None,
        ),
        "Rotate": lambda: TF.rotate(img, m, interpolation=near, fill=None),
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
        "Posterize": lambda: TF.posterize(img, int(m)),
        "Solarize": lambda: TF.solarize(img, m),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
    }
    return calls[name]()


# Per-op tolerance: (largest |difference| in uint8 levels, largest fraction of differing pixels).
# Pixel ops repeat torchvision's float32 arithmetic and truncations: exact. Geometric ops sample
# the nearest pixel; an ulp of difference in the inverse map (another BLAS for the batched grid
# product) could move a sample sitting on a pixel boundary to its neighbour, so they may differ
# on 0.2% of pixels (2 of a 32x32 image). Measured: every op exact on CPU.
GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
TOLERANCE = {name: (255, 0.002) if name in GEOMETRIC else (0, 0.0) for name in augment.RANDAUG_OPS}


def _op_images():
    x, _, _ = _batch(16, seed=3)
    smooth = F.avg_pool2d(x.float(), 5, 1, 2).round().to(torch.uint8)  # narrow histograms, flat
    return torch.cat(
        [x, smooth, smooth // 2 + 60, torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)]
    )


def test_randaugment_magnitudes_are_torchvision():
    from torchvision.transforms import RandAugment

    space = RandAugment()._augmentation_space(31, (32, 32))
    for magnitude in (0, 9, 30):
        ours = augment.randaug_magnitudes(magnitude)
        assert list(ours) == list(space) == list(augment.RANDAUG_OPS)
        for name, (table, signed) in space.items():
            want = float(table[magnitude]) if table.ndim > 0 else 0.0
            assert ours[name] == (want, signed), name
    m9 = augment.randaug_magnitudes(9)
    assert m9["Rotate"][0] == pytest.approx(9.0) and m9["Solarize"][0] == pytest.approx(178.5)
    assert m9["Posterize"][0] == 7 and int(m9["TranslateX"][0]) == 4


@pytest.mark.parametrize("name", list(augment.RANDAUG_OPS))
def test_randaugment_op_against_torchvision(name):
    x = _op_images()
    max_diff, max_frac = TOLERANCE[name]
    for magnitude in (9, 30):
        mag, signed = augment.randaug_magnitudes(magnitude)[name]
        for sign in (1, -1) if signed else (1,):
            m = mag * sign
            ref = torch.stack([_torchvision_op(name, img, m) for img in x]).float()
            got = augment.RANDAUG_OPS[name](
                x.float(), torch.full((len(x),), m, dtype=torch.float64)
            )
            diff = (got - ref).abs()
            assert diff.max() <= max_diff and (diff > 0).float().mean() <= max_frac, (name, m)
            assert torch.equal(got, got.round()) and got.min() >= 0 and got.max() <= 255


def test_randaugment_dispatch_and_every_drawn_op_applied():
    # the sorted-chunk dispatch equals applying each sample's op to it alone
    g = torch.Generator().manual_seed(0)
    x, _, _ = _batch(40)
    n = len(augment.RANDAUG_OPS)
    k = torch.randint(0, n + 1, (40,), generator=g)
    v = torch.where(torch.rand(40, generator=g) < 0.5, -1.0, 1.0).double() * 0.27
    got = augment._apply_ops(x.float(), k, v)
    fns = list(augment.RANDAUG_OPS.values()) + [lambda u, w: u]
    for i in range(40):
        assert torch.equal(got[i], fns[k[i]](x[i : i + 1].float(), v[i : i + 1])[0])
    # one layer, per image: every output is one op's output (with either sign); no skip
    # probability, so the identity shows up ~1/14 of the time, not ~1/2 (timm's p=0.5)
    x, y, t = _batch(280)
    aug = augment.Augment(mixup_prob=0, erase_prob=0, randaug_ops=1, draw_per="image")
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(1))
    table = augment.randaug_magnitudes(9)
    cands = [
        fn(x.float(), torch.full((280,), s * table[nm][0], dtype=torch.float64))
        for nm, fn in augment.RANDAUG_OPS.items()
        for s in (1, -1)
    ]
    cands = torch.stack([augment.normalize(c) for c in cands])  # (28, B, C, H, W)
    match = (cands - out).abs().flatten(2).amax(2) < 1e-4  # (28, B)
    assert match.any(0).all()
    unchanged = (out - augment.normalize(x)).abs().flatten(1).amax(1) < 1e-4
    assert unchanged.float().mean() < 0.2


def test_randaugment_per_batch_and_prob():
    x, y, t = _batch(32)
    aug = augment.Augment(mixup_prob=0, erase_prob=0, randaug_ops=1)  # draw_per batch: the thesis
    g = torch.Generator().manual_seed(0)
    table = augment.randaug_magnitudes(9)
    for _ in range(6):
        out, _, _ = aug(x, y, t, g)
        outs = [
            augment.normalize(
                fn(x.float(), torch.full((32,), s * table[nm][0], dtype=torch.float64))
            )
            for nm, fn in augment.RANDAUG_OPS.items()
            for s in (1, -1)
        ]
        assert any(torch.allclose(o, out, atol=1e-4) for o in outs)  # one op for the whole batch
    aug = augment.Augment(mixup_prob=0, erase_prob=0, randaug_ops=2, randaug_prob=0.0)
    assert torch.equal(aug(x, y, t, g)[0], augment.normalize(x))
