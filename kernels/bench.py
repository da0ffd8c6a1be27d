"""Benchmark of the Triton kernels against PyTorch: `python -m kernels.bench [--json PATH]`.

Attention forward+backward against SDPA with each backend this build offers (flash, efficient,
cudnn, math) at the student shape (B=1024, H=3, N=67, D=64) and the teacher shape (B=256, H=6,
N=197, D=64); the fused loss forward+backward against eager `losses.distillation_loss` and
against it under torch.compile, at B=1024 for each model kind. Median milliseconds from
triton.testing.do_bench, achieved TFLOP/s (attention) or GB/s (loss), and ratios.
Goals (issue 6): attention >= 1.3x the fastest SDPA backend at the student shape; loss >= 5x eager.
Needs a CUDA GPU: on CPU it says so and exits 0 (the interpreter runs the kernels' logic, not
their speed). `--compile-check` needs no GPU: it compiles the attention kernels for sm_90 at the
launchers' block sizes and prints ptxas register, spill and shared-memory counts.
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


def compile_check(arch=90):
    """Compile every attention kernel at the launcher's block sizes for sm_<arch> and report
    ptxas registers, spills and shared memory. No GPU needed (Triton ships ptxas)."""
    import re
    import subprocess
    import tempfile
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    A = importlib.import_module("kernels.attention")
    if A.INTERPRETED:
        print("compile check: unset TRITON_INTERPRET first")
        return 1
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    names = {"fwd": A._attn_fwd_kernel, "dq": A._attn_bwd_dq_kernel, "dkdv": A._attn_bwd_dkdv_kernel}
    print(f"{'kernel':<6} {'dtype':<6} {'D':>4} {'BLOCK_M,N,warps':<16} {'regs':>5} {'spill B':>8} {'smem B':>7} mma")
    for dtype, tname in [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")]:
        for D in (32, 64, 128):
            for kname, fn in names.items():
                BM, BN, warps = A._config(kname, D, dtype)
                consts = {"BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_D": A._pow2(D), "DOT_PREC": A._dot_prec(dtype)}
                sig = {}
                for arg in fn.arg_names:
                    tensor = arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
                    sig[arg] = ("constexpr" if arg in consts else "*fp32" if arg == "LSE" else
                                f"*{tname}" if tensor else "fp32" if "scale" in arg else "i32")
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                   target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 2})
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                    f.write(k.asm["ptx"])
                    f.flush()
                    log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                                         capture_output=True, text=True).stderr
                regs = re.search(r"Used (\d+) registers", log)
                spill = re.search(r"(\d+) bytes spill stores", log)
                mma = "wgmma" if "wgmma" in k.asm["ptx"] else "mma" if "mma.sync" in k.asm["ptx"] else "fma"
                print(f"{kname:<6} {tname:<6} {D:>4} {f'{BM},{BN},{warps}':<16} {regs[1] if regs else '?':>5} "
                      f"{spill[1] if spill else '?':>8} {k.metadata.shared:>7} {mma}", flush=True)
    return 0


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
    ap.add_argument("--compile-check", action="store_true",
                    help="no GPU needed: compile the attention kernels for sm_90, print registers/spills")
    args = ap.parse_args()
    if args.compile_check:
        return compile_check()
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
