"""Benchmarks outside the test suite: `python bench.py data|train|corruptions|predict`.

Each section is one function, owned by the file it measures; imports happen inside them so one
section's dependencies never slow down or break another.
"""

import argparse
import sys
import time


def bench_data(args):
    """Images/s of data.py's on-device pipeline (DeviceLoader + augment.Augment with its defaults:
    Mixup alpha 1.0 with p 0.3, Random Erasing p 0.25 zero-fill, no crop or flip) against
    torchvision's per-image transforms (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor,
    Normalize, RandomErasing(0.25)) through a DataLoader with 2 workers, plus the same Mixup on the
    collated batches. Same images, same batch size; best of a few epochs each. Also printed: the
    load average around the runs and a 1-thread figure (other processes on the cores slow
    multi-threaded ops most). On CUDA also the full pipeline with the teacher view."""
    import os

    import numpy as np
    import torch

    n, bs, reps = args.images, args.batch_size, 3
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # (n, 32, 32, 3): CIFAR's HWC
    labels = rng.integers(0, 10, n)
    types = rng.integers(0, 11, n)
    load0 = os.getloadavg()[0]
    split = {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "labels": torch.from_numpy(labels),
        "types": torch.from_numpy(types),
        "severities": torch.zeros(n, dtype=torch.long),
    }

    threads = torch.get_num_threads()
    ours = _data_ours(split, bs, reps, torch.device("cpu"))
    torch.set_num_threads(1)
    ours1 = _data_ours(split, bs, reps, torch.device("cpu"))
    torch.set_num_threads(threads)
    # second: its workers cannot slow the runs above
    tv = _data_torchvision(images, labels, types, bs, reps)

    print(
        f"data pipeline: {n} images, batch {bs}, best of {reps} epochs; "
        f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"  torchvision per-image + DataLoader(2 workers) + mixup: {tv:9.0f} img/s")
    ours_line = "  data.py DeviceLoader + Augment, CPU, "
    print(f"{ours_line}{threads} threads:      {ours:9.0f} img/s  ({ours / tv:.1f}x)")
    print(f"{ours_line}1 thread:        {ours1:9.0f} img/s  ({ours1 / tv:.1f}x)")
    print("  goal: >= 20x")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        plain = _data_ours(split, bs, reps, dev)
        with_view = _data_ours(split, bs, reps, dev, teacher=True)
        print(
            f"  data.py on {torch.cuda.get_device_name()}: augment {plain:.0f} img/s, "
            f"augment + teacher view (224px bf16) {with_view:.0f} img/s"
        )


def _data_ours(split, bs, reps, device, teacher=False):
    """Best images/s over reps epochs (after one warm-up) of DeviceLoader + Augment's defaults."""
    import torch

    import augment
    import data

    aug = augment.Augment()
    dl = data.DeviceLoader(split, bs, device)
    gen = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for epoch in range(reps + 1):  # epoch 0 warms up
        dl.set_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, k = time.perf_counter(), 0
        for b in dl:
            x, _, _ = aug(b["images"], b["labels"], b["types"], gen)
            if teacher:
                augment.teacher_view(b["images"], dtype=torch.bfloat16)
            k += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, k / (time.perf_counter() - t0)) if epoch else 0.0
    return best


def _data_torchvision(images, labels, types, bs, reps):
    """Best images/s over reps epochs of torchvision's per-image transforms on PIL images (as
    torchvision.datasets.CIFAR10 hands them out) through a 2-worker DataLoader, then Augment's
    Mixup."""
    import torch
    import torchvision.transforms as T
    from PIL import Image

    import augment

    tf = T.Compose([
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(augment.MEAN, augment.STD),
        T.RandomErasing(p=0.25, value="random"),
    ])


    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(Image.fromarray(images[i])), int(labels[i]), int(types[i])

    loader = torch.utils.data.DataLoader(
        DS(), batch_size=bs, shuffle=True, num_workers=2, drop_last=True, persistent_workers=True
    )
    mix = augment.Augment(erase_prob=0.0)  # only its batch Mixup
    g = torch.Generator().manual_seed(0)

    def epoch_tv():
        t0, k = time.perf_counter(), 0
        for x, y, t in loader:
            x, y, t = mix._mix(x, y, t, g)
            k += len(x)
        return k / (time.perf_counter() - t0)

    epoch_tv()  # warm-up: worker start-up is not counted
    return max(epoch_tv() for _ in range(reps))


def bench_train(args):
    """Student train-step images/s and MFU for the paper configuration (B=1024, 32px, patch 4,
    DeiT-Tiny sizes, hard distillation, teacher logits cached: random logits stand in), through
    train.py's own step (DeviceLoader + Augment with the recipe's defaults + train_step: bf16
    autocast, fused AdamW and the Triton loss on CUDA). Side by side, the way DeiT's reference code
    trains: timm's deit_tiny_distilled_patch16_224(img_size=32, patch_size=4, num_classes=10), an
    eager DeiT-style hard-distillation loss, and a live timm deit3_small_patch16_224 teacher (random
    weights) on the 224px view of every batch. On CPU the batch and step count are small (about a
    minute)."""
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="bench.py train")
    ap.add_argument("--batch", type=int, default=1024 if cuda else 32, help="global batch")
    ap.add_argument(
        "--steps", type=int, default=20 if cuda else 3, help="timed steps (after 2 warm-up)"
    )
    ap.add_argument("--model", default="deit", choices=["deit", "cdeit"])
    ap.add_argument(
        "--compile", nargs="?", const="default", default="off",
        choices=["off", "default", "reduce-overhead"],
        help="torch.compile our student and loss as train.py --compile does "
        "(reduce-overhead: CUDA graphs)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    opts, _ = ap.parse_known_args(sys.argv[2:])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dev = torch.device("cuda" if cuda else "cpu")
    amp = torch.bfloat16 if cuda else None
    torch.manual_seed(0)
    n = opts.batch * (opts.steps + 2)
    split = {
        "images": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
        "labels": torch.randint(0, 10, (n,)),
        "types": torch.randint(0, 11, (n,)),
    }
    ours_ips = _train_ours(opts, split, dev, amp)
    timm_ips = _train_timm(opts, split, dev, amp)
    _print_train(opts, dev, ours_ips, timm_ips)


def _timed_steps(opts, split, dev, step_fn):
    """Images/s of step_fn(batch, x, y, t) on Augment's batches, after two warm-up steps
    (allocator, autotuning, compile)."""
    import torch

    import augment
    import data

    aug = augment.Augment()  # the recipe's defaults (thesis Table 1)
    loader = data.DeviceLoader(split, opts.batch, dev, seed=0)
    gen = torch.Generator(device=dev).manual_seed(0)
    for i, batch in enumerate(loader):
        if i == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        step_fn(batch, *aug(batch["images"], batch["labels"], batch["types"], generator=gen))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return opts.steps * opts.batch / (time.perf_counter() - t0)


def _train_ours(opts, split, dev, amp):
    """Exactly train.py's step, on cached teacher logits (random ones stand in)."""
    import torch

    import train
    from model import create_model, param_groups

    targs = train.get_args(["--model", opts.model, "--distill", "hard"])
    ours = create_model(opts.model, drop_path=0.1).to(dev)
    opt = torch.optim.AdamW(
        param_groups(ours, 0.05), lr=1e-3, fused=True if dev.type == "cuda" else None
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    targs.compile = opts.compile
    model, loss_fn = train.compile_step(ours, train.pick_loss(targs, dev), opts.compile)
    cached = torch.randn(len(split["labels"]), 10, device=dev)  # (n, 10) stand-in teacher logits

    def step(b, x, y, t):
        train.train_step(model, opt, scaler, loss_fn, x, y, t, cached[b["index"]], targs, amp)

    return _timed_steps(opts, split, dev, step)


def _train_timm(opts, split, dev, amp):
    """DeiT's reference style: timm student, eager loss, live teacher at 224px."""
    import timm
    import torch
    import torch.nn.functional as F

    import augment

    student = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, num_classes=10,
        drop_path_rate=0.1,
    ).to(dev)
    student.set_distilled_training(True)  # train mode returns (cls, dist) logits
    teacher = timm.create_model("deit3_small_patch16_224", num_classes=10)
    teacher = teacher.to(dev).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.05)

    def deit_step(b, x, y, t):
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                t_logits = teacher(augment.teacher_view(b["images"], 224, "bilinear"))
            cls, dist_ = student(x)
        # facebookresearch/deit DistillationLoss('hard'): base on cls (soft targets with smoothing,
        # as timm's Mixup hands them over) + CE(dist, teacher argmax), averaged
        y1 = F.one_hot(y, 10).float() if y.dim() == 1 else y
        y1 = y1 * 0.9 + 0.1 / 10
        base = torch.sum(-y1 * F.log_softmax(cls.float(), dim=-1), dim=-1).mean()
        loss = 0.5 * base + 0.5 * F.cross_entropy(dist_.float(), t_logits.argmax(dim=1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed_steps(opts, split, dev, deit_step)


def _print_train(opts, dev, ours_ips, timm_ips):
    """The table: images/s and MFU (achieved FLOP/s on CPU, where there is no defined peak)."""
    import os
    from dataclasses import replace

    import torch

    from model import MODELS, count_params, create_model, flops_per_image

    cuda = dev.type == "cuda"
    f_student = flops_per_image(replace(MODELS[opts.model], num_classes=10), train=True)
    f_teacher = flops_per_image(replace(MODELS["deit3_small"], num_classes=10), train=False)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    # dense bf16 peak FLOP/s
    peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
    peak = next((v for k, v in peaks.items() if k in name), None) if cuda else None
    precision = "bf16 autocast" if cuda else f"fp32, {torch.get_num_threads()} threads"
    print(
        f"train step on {name} ({precision}), global batch {opts.batch}, {opts.steps} timed "
        f"steps; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"FLOPs assumed (model.flops_per_image, matmuls, 2/MAC): student {opts.model} train "
        f"{f_student / 1e9:.3f} GFLOP/img (fwd+bwd = 3x fwd); teacher forward at 224px "
        f"{f_teacher / 1e9:.2f} GFLOP/img"
    )
    if peak:
        assumed = f"{peak / 1e12:.0f} TFLOP/s dense bf16 ({name})"
    elif not cuda:
        assumed = "none: MFU is not meaningful on CPU (no defined peak); achieved GFLOP/s shown"
    else:
        assumed = f"unknown for {name}; achieved TFLOP/s shown"
    print("peak assumed: " + assumed)

    def line(label, ips, flops):
        achieved = ips * flops
        mfu = f"MFU {100 * achieved / peak:5.1f}%" if peak else f"{achieved / 1e9:8.1f} GFLOP/s"
        print(f"  {label:62s} {ips:10.0f} img/s  {mfu}")

    params = count_params(create_model(opts.model))
    label = f"ours: {opts.model} ({params:,} params), cached teacher"
    label += f", compile {opts.compile}" if opts.compile != "off" else ""
    line(label, ours_ips, f_student)
    line("timm deit_tiny_distilled + eager loss + live deit3_small teacher", timm_ips, f_student)
    both = timm_ips * (f_student + f_teacher)  # FLOP/s
    print(
        f"  (timm row counting the teacher's forward too: {both / 1e9:.1f} GFLOP/s"
        + (f", MFU {100 * both / peak:.1f}%" if peak else "")
        + ")"
    )
    print(f"  ratio ours / timm: {ours_ips / timm_ips:.1f}x")


def bench_corruptions(args):
    """Images/s of corruptions.corrupt on batches (B=1024 by default, every severity in turn)
    against the per-image numpy/scipy/PIL reference pipeline of tests/test_corruptions.py (the
    published CIFAR-10-C algorithm, one image at a time), on real 32x32 photographs. On CUDA
    (when present) the batched numbers are printed for the GPU as well."""
    import importlib.util
    import os

    import numpy as np
    import torch

    import corruptions as C

    ap = argparse.ArgumentParser(prog="bench.py corruptions")
    ap.add_argument("--batch", type=int, default=1024, help="images per corrupt() call")
    ap.add_argument("--ref-images", type=int, default=60, help="images through the reference")
    ap.add_argument("--only", default="", help="comma-separated corruption names")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    opts, _ = ap.parse_known_args(sys.argv[2:])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "test_corruptions.py")
    spec = importlib.util.spec_from_file_location("test_corruptions", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    names = opts.only.split(",") if opts.only else C.CORRUPTIONS
    photos = ref.PHOTOS
    batch = np.concatenate([photos] * (opts.batch // len(photos) + 1))[: opts.batch]
    batch = torch.from_numpy(batch)
    rng = np.random.default_rng(0)

    def ours(x, device):
        x = x.to(device)
        g = torch.Generator(device=device).manual_seed(0)
        for s in range(1, 6):  # warm-up: kernels, operators, frost textures, codec
            C.corrupt(x[:32], name, s, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(1, 6):
            C.corrupt(x, name, s, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 5 * len(x) / (time.perf_counter() - t0)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(
        f"corruptions.py, batches of {opts.batch}, vs the per-image reference "
        f"({opts.ref_images} images per severity); torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    head = f"{'corruption':18s} {'reference img/s':>16s} {'ours cpu img/s':>15s} {'ratio':>7s}"
    if len(devices) > 1:
        head += "  {:>15s} {:>8s}".format("ours cuda img/s", "ratio")
    print(head)
    ratios = []
    for name in names:
        n = opts.ref_images if name != "glass_blur" else max(opts.ref_images // 4, 1)
        imgs = photos[np.arange(n) % len(photos)]
        t0 = time.perf_counter()
        for s in range(1, 6):
            ref.reference(name, imgs, s, rng)
        r = 5 * n / (time.perf_counter() - t0)
        o = [ours(batch, d) for d in devices]
        ratios.append(o[0] / r)
        line = f"{name:18s} {r:16.0f} {o[0]:15.0f} {o[0] / r:6.1f}x"
        if len(o) > 1:
            line += f"  {o[1]:15.0f} {o[1] / r:7.1f}x"
        print(line, flush=True)
    gm = float(np.exp(np.mean(np.log(ratios))))
    worst = names[int(np.argmin(ratios))]
    print(f"cpu ratio: geometric mean {gm:.1f}x, min {min(ratios):.1f}x ({worst})")


def bench_predict(args):
    """Images/s of predict.py on a folder of PNGs (real 32x32 photographs,
    tests/test_corruptions.py's PHOTOS, shifted per file so no two are equal) with a full-size CdeiT
    (untrained: speed does not depend on the weights): reading + decoding alone, the model alone
    (model.Deployed on uint8 batches) and the whole of predict.predict (read, batch, predict, one
    record per image)."""

    import importlib.util
    import os
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    import model as model_lib
    import predict

    ap = argparse.ArgumentParser(prog="bench.py predict")
    ap.add_argument("--n", type=int, default=3000, help="PNG files in the folder")
    ap.add_argument("--png-size", type=int, default=32, help="side of the PNGs (32: no resize)")
    ap.add_argument("--batch", type=int, default=256, help="predict.py --batch-size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    opts, _ = ap.parse_known_args(sys.argv[2:])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "test_corruptions.py")
    spec = importlib.util.spec_from_file_location("test_corruptions", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    photos = ref.PHOTOS  # (P, 32, 32, 3) uint8
    with tempfile.TemporaryDirectory() as d:
        folder = os.path.join(d, "images")
        os.makedirs(folder)
        for i in range(opts.n):
            img = Image.fromarray(np.roll(photos[i % len(photos)], i // len(photos), axis=1))
            if opts.png_size != 32:
                img = img.resize((opts.png_size, opts.png_size), Image.BICUBIC)
            img.save(os.path.join(folder, f"{i:05d}.png"))
        ckpt = os.path.join(d, "cdeit.pt")
        weights = model_lib.create_model("cdeit").state_dict()
        torch.save({"kind": model_lib.STUDENT_KIND, "version": 1, "model_name": "cdeit",
                    "model_args": {"layout": "thesis"}, "model": weights, "data_args": {}}, ckpt)
        pred = predict.Predictor(ckpt, torch.device(opts.device))
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        t0 = time.perf_counter()
        x = torch.stack([predict.read_image(f) for f in files])
        t_read = time.perf_counter() - t0
        pred(x[: opts.batch])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), opts.batch):
            pred(x[i : i + opts.batch])
        t_model = time.perf_counter() - t0
        t0 = time.perf_counter()
        records, errors = predict.predict(pred, [folder], opts.batch, 3, 0.5, emit=lambda _: None)
        t_all = time.perf_counter() - t0
    assert len(records) == opts.n and not errors
    print(
        f"predict.py: {opts.n} PNGs {opts.png_size}x{opts.png_size}, cdeit (5.4M params), "
        f"batch {opts.batch}, {opts.device}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    resize = " + resize" if opts.png_size != 32 else ""
    print(f"  read + decode{resize}: {opts.n / t_read:8,.0f} img/s")
    print(f"  model (Deployed + softmax): {opts.n / t_model:8,.0f} img/s")
    print(f"  predict.predict, end to end: {opts.n / t_all:8,.0f} img/s ({t_all:.1f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("what", choices=["data", "train", "corruptions", "predict"])
    ap.add_argument("--images", type=int, default=20480, help="data: images per timed epoch")
    ap.add_argument("--batch-size", type=int, default=512, help="data: batch size")
    args, _ = ap.parse_known_args()
    fn = getattr(sys.modules[__name__], f"bench_{args.what}", None)
    if fn is None:
        sys.exit(f"bench.py: section {args.what!r} is not written yet")
    fn(args)


if __name__ == "__main__":
    main()
