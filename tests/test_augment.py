"""augment.py: crop + flip, RandAugment, Random Erasing, Mixup / CutMix, normalize and the
teacher's view, on random uint8 batches, against direct per-image references (torchvision where it
has the op). CPU only, no files."""
import pytest
import torch
import torch.nn.functional as F

import augment


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g), torch.randint(0, 11, (n,), generator=g))


def test_normalize_and_teacher_view():
    x, _, _ = _batch(4)
    mean = torch.tensor(augment.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.STD).view(1, 3, 1, 1)
    ref = (x.float() / 255 - mean) / std
    assert torch.allclose(augment.normalize(x), ref, atol=1e-5)
    for mode in ("bicubic", "bilinear"):
        up = F.interpolate(x.float(), size=(224, 224), mode=mode, align_corners=False, antialias=False)
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
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(got[i], ref.flip(-1) if flip[i] else ref)


def test_augment_crop_flip_outputs_are_crops():
    x, y, t = _batch(32)
    aug = augment.Augment(mixup_prob=0, erase_prob=0)
    out, y2, t2 = aug(x, y, t, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.equal(y2, y) and torch.equal(t2, t)
    padded = augment.normalize(F.pad(x, (4, 4, 4, 4)))
    flips = 0
    for i in range(32):
        cands = [(f, a, b) for f in (0, 1) for a in range(9) for b in range(9)
                 if torch.allclose(out[i], padded[i, :, a:a + 32, b:b + 32].flip(-1) if f else padded[i, :, a:a + 32, b:b + 32])]
        assert cands, f"sample {i} is not a crop/flip of its input"
        flips += cands[0][0]
    assert 4 <= flips <= 28


def test_augment_deterministic_with_generator():
    x, y, t = _batch(64)
    aug = augment.Augment(mixup_prob=0.5, randaug_ops=2)
    a = aug(x, y, t, torch.Generator().manual_seed(5))
    b = aug(x, y, t, torch.Generator().manual_seed(5))
    c = aug(x, y, t, torch.Generator().manual_seed(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_mixup_targets():
    x, y, t = _batch(64)
    aug = augment.Augment(crop_padding=0, flip=False, erase_prob=0, mixup_prob=1.0)
    out, ys, ts = aug(x, y, t, torch.Generator().manual_seed(0))
    assert ys.shape == (64, 10) and ts.shape == (64, 11) and ys.dtype == torch.float32
    assert torch.allclose(ys.sum(1), torch.ones(64)) and torch.allclose(ts.sum(1), torch.ones(64))
    i = int(((y != y.flip(0)) & (t != t.flip(0))).nonzero()[0])
    lam = float(ys[i, y[i]])
    assert abs(float(ts[i, t[i]]) - lam) < 1e-6   # labels and types share lambda
    ref = augment.normalize(x) * lam + augment.normalize(x.flip(0)) * (1 - lam)
    assert torch.allclose(out, ref, atol=1e-4)
    # with probability 0.3 only some batches mix; unmixed batches keep int64 targets
    aug = augment.Augment(mixup_prob=0.3)
    g = torch.Generator().manual_seed(0)
    kinds = [aug(x, y, t, g)[1].dtype for _ in range(40)]
    assert 3 <= kinds.count(torch.float32) <= 22 and torch.int64 in kinds


def test_cutmix_targets():
    x, y, t = _batch(64)
    aug = augment.Augment(crop_padding=0, flip=False, erase_prob=0, mixup_prob=0, cutmix_prob=1.0)
    out, ys, ts = aug(x, y, t, torch.Generator().manual_seed(2))
    assert torch.allclose(ys.sum(1), torch.ones(64)) and torch.allclose(ts.sum(1), torch.ones(64))
    same = (out == augment.normalize(x)).all(1).float().mean((1, 2))   # fraction of pixels kept
    i = int(((y != y.flip(0)) & (x != x.flip(0)).any()).nonzero()[0])
    assert abs(float(ys[i, y[i]]) - float(same[i])) < 1e-6


def test_random_erasing_areas():
    x, y, t = _batch(400)
    aug = augment.Augment(crop_padding=0, flip=False, mixup_prob=0, erase_prob=1.0)
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    diff = (out != augment.normalize(x)).any(1)                        # (B, H, W) erased pixels
    erased = 0
    for i in range(400):
        if not diff[i].any():
            continue
        erased += 1
        rows, cols = diff[i].any(1).nonzero()[:, 0], diff[i].any(0).nonzero()[:, 0]
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert diff[i].sum() == h * w                                # one filled rectangle
        assert 0.02 * 1024 * 0.7 <= h * w <= 1024 / 3 * 1.2 and h < 32 and w < 32
        assert 0.3 / 1.6 <= h / w <= 1.6 / 0.3
    assert erased >= 390
    aug = augment.Augment(crop_padding=0, flip=False, mixup_prob=0, erase_prob=0.25)
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    frac = (out != augment.normalize(x)).flatten(1).any(1).float().mean()
    assert 0.17 <= frac <= 0.33


def test_randaugment_runs_batched():
    x, y, t = _batch(256)
    aug = augment.Augment(crop_padding=0, flip=False, mixup_prob=0, erase_prob=0, randaug_ops=2)
    out, _, _ = aug(x, y, t, torch.Generator().manual_seed(0))
    lo = (0 - torch.tensor(augment.MEAN)) / torch.tensor(augment.STD)
    hi = (1 - torch.tensor(augment.MEAN)) / torch.tensor(augment.STD)
    assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()
    changed = (out - augment.normalize(x)).abs().flatten(1).amax(1) > 1e-4
    assert 0.5 <= changed.float().mean() <= 0.95     # p(no op applied twice) = 1/4


def test_randaugment_ops_against_torchvision_and_dispatch():
    import torchvision.transforms.functional as TF
    x, _, _ = _batch(8)
    xf, one = x.float(), torch.ones(8)
    m = 0.9
    f = 1 + 0.9 * m
    refs = {"Invert": TF.invert(x), "Posterize": TF.posterize(x, 8 - int(4 * m)),
            "Solarize": TF.solarize(x, 256 - 256 * m), "Brightness": TF.adjust_brightness(x, f),
            "Color": TF.adjust_saturation(x, f), "Contrast": TF.adjust_contrast(x, f),
            "Sharpness": TF.adjust_sharpness(x, f), "AutoContrast": TF.autocontrast(x)}
    for name, ref in refs.items():
        got = augment.RANDAUG_OPS[name](xf, m, one).round()
        assert (got - ref.float()).abs().max() <= 1, name        # uint8 rounding in torchvision
    # the sorted-chunk dispatch equals applying each sample's op to it alone
    g = torch.Generator().manual_seed(0)
    x, _, _ = _batch(40)
    k = torch.randint(0, len(augment.RANDAUG_OPS) + 1, (40,), generator=g)
    s = torch.where(torch.rand(40, generator=g) < 0.5, -1.0, 1.0)
    got = augment._apply_ops(x.float(), k, s, m)
    fns = list(augment.RANDAUG_OPS.values()) + [lambda v, m, s: v]
    for i in range(40):
        assert torch.allclose(got[i], fns[k[i]](x[i:i + 1].float(), m, s[i:i + 1])[0], atol=1e-3)
