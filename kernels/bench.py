"""Benchmark of the Triton kernels against PyTorch: `python -m kernels.bench [--json PATH]`.

Attention forward+backward against SDPA with each backend this build offers (flash, efficient,
cudnn, math) at the student shape (B=1024, H=3, N=67, D=64) and the teacher shape (B=256, H=6,
N=197, D=64); the fused loss forward+backward against eager `losses.distillation_loss` and
against it under torch.compile, at B=1024 for each model kind. Median milliseconds from
triton.testing.do_bench, achieved TFLOP/s (attention) or GB/s (loss), and ratios.
Goals (issue 6): attention >= 1.3x the fastest SDPA backend at the student shape; loss >= 5x eager.
Needs a CUDA GPU: on CPU it says so and exits 0 (the interpreter runs the kernels' logic, not
their speed).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import kernels


def _bench(fn, params):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=params, return_mode="median")


def bench_attention(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for B, H, N, D in [(1024, 3, 67, 64), (256, 6, 197, 64)]:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        go = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
        qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=True)
        go_packed = go.transpose(1, 2).reshape(B, N, H * D)
        # Useful FLOPs: forward 2 matmuls, backward 4 (FlashAttention's count, recompute excluded).
        flops = 12 * B * H * N * N * D

        def run(fn):
            return lambda: fn(q, k, v).backward(go)

        def packed_sdpa(qkv):  # what model.py does with the kernels off
            q_, k_, v_ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q_, k_, v_).transpose(1, 2).reshape(B, N, H * D)

        shape = f"B{B} H{H} N{N} D{D}"
        results = {}
        for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]:
            try:
                with sdpa_kernel(backend):
                    fn = run(F.scaled_dot_product_attention)
                    fn()
                    results[f"sdpa[{name}]"] = _bench(fn, [q, k, v])
            except RuntimeError as e:  # backend not available for this shape/dtype/GPU
                results[f"sdpa[{name}]"] = None
                print(f"  sdpa[{name}] unavailable at {shape}: {str(e).splitlines()[0][:100]}")
        results["triton"] = _bench(run(kernels.attention), [q, k, v])
        results["triton packed"] = _bench(lambda: kernels.attention_packed(qkv).backward(go_packed), [qkv])
        results["sdpa packed (model, kernels off)"] = _bench(lambda: packed_sdpa(qkv).backward(go_packed), [qkv])
        fastest = min(ms for n, ms in results.items() if n.startswith("sdpa[") and ms is not None)
        for name, ms in results.items():
            rows.append({"bench": "attention fwd+bwd", "shape": shape, "impl": name, "ms": ms,
                         "rate": None if ms is None else flops / ms / 1e9, "unit": "TFLOP/s",
                         "speedup": None if ms is None else fastest / ms})
    return rows


def bench_loss(dtype):
    import losses
    from model import Logits
    B, C, T = 1024, 10, 11
    rows = []
    compiled = torch.compile(losses.distillation_loss)
    for kind, distill in [("vit", "none"), ("deit", "hard"), ("deit", "soft"), ("cdeit", "hard"), ("cdeit", "soft")]:
        def logits(n):
            return torch.randn(B, n, device="cuda", dtype=dtype, requires_grad=True)

        out = Logits(logits(C), logits(C) if kind != "vit" else None, logits(T) if kind == "cdeit" else None,
                     logits(C) if kind == "cdeit" else None)  # cdeit: strategy 2
        params = [x for x in out if x is not None]
        labels = torch.randint(0, C, (B,), device="cuda")
        teacher = torch.randn(B, C, device="cuda") if kind != "vit" else None
        types = torch.randint(0, T, (B,), device="cuda") if kind == "cdeit" else None
        # Bytes that must move: logits in + their gradients out, teacher logits and targets in.
        nbytes = 2 * sum(x.numel() for x in params) * params[0].element_size() + \
            (teacher.numel() * 4 if teacher is not None else 0) + B * 8 * (2 if types is not None else 1)
        results = {}
        for name, fn in [("eager", losses.distillation_loss), ("torch.compile", compiled),
                         ("triton fused", kernels.distillation_loss)]:
            def step(fn=fn):
                fn(out, labels, teacher, types, distill=distill)[0].backward()
            step()
            results[name] = _bench(step, params)
        for name, ms in results.items():
            rows.append({"bench": "loss fwd+bwd", "shape": f"{kind} {distill} B{B}", "impl": name, "ms": ms,
                         "rate": nbytes / ms / 1e6, "unit": "GB/s", "speedup": results["eager"] / ms})
    return rows


def print_table(rows):
    print(f"{'bench':<18} {'shape':<22} {'impl':<34} {'median ms':>10} {'rate':>14} {'vs ref':>7}")
    for r in rows:
        ms = "n/a" if r["ms"] is None else f"{r['ms']:.4f}"
        rate = "" if r["rate"] is None else f"{r['rate']:.1f} {r['unit']}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['bench']:<18} {r['shape']:<22} {r['impl']:<34} {ms:>10} {rate:>14} {sp:>7}")
    print("vs ref: attention rows against the fastest SDPA backend at that shape; loss rows against eager.")


def main():
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="attention inputs and loss logits (training runs bf16 autocast)")
    ap.add_argument("--only", choices=["attention", "loss"], help="run one of the two benchmarks")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU and this machine has none: nothing measured. "
              "(The CPU tests check the kernels' numerics through the Triton interpreter.)")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    rows = []
    if args.only in (None, "attention"):
        rows += bench_attention(dtype)
    if args.only in (None, "loss"):
        rows += bench_loss(dtype)
    print_table(rows)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, f, indent=1)
            f.flush()
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
