"""Benchmarks and checks of the Triton kernels: `python -m kernels.bench [--json PATH] | --bytes |
--compile-check | --self-check | --overhead`.

GPU (the default): median ms of each implementation launched from Python each call (eager,
triton.testing.do_bench) and replayed from a CUDA graph (do_bench_cudagraph: GPU time alone), at
the students' training shape (H=3, N=67, D=64, forward + backward) at 1024 and 128 images per GPU,
and the teacher's (B=1024, H=6, N=197, D=64, forward only, no_grad):
  - kernel vs SDPA: `attention(q, k, v)` against each SDPA backend on (B, H, N, D) tensors, and
    at B=1024 with the students' backward under the configs the pin was chosen from
    (BWD_ALTERNATIVES: 2 CTAs of 4 warps, or 1 of 8; which wins is for a GPU to say);
  - packed layer vs SDPA layer: `attention_packed(qkv)` against `sdpa_packed(qkv)`, what model.py
    runs with the kernels off (permute/unbind into SDPA, and a stack of dq/dk/dv in backward);
  - the fused loss forward + backward against eager `losses.distillation_loss` and torch.compile
    of it, at B=1024 and B=128 (one GPU's share of the batch).
Each measurement prints as `PASS|FAIL|INFO name measured goal`. Goals (B=1024, eager and graph
each): attention fwd+bwd >= 1.3x the fastest SDPA backend; the packed layer >= 1x the SDPA layer;
loss >= 5x eager and >= 1x torch.compile.

No GPU needed (counted and compiled, not measured):
  --bytes          per kernel at those shapes, with its pinned config: bytes moved (u = one B*H*N*D
                   bf16 tensor), useful / padded multiply-adds and exps, counted from the kernels'
                   own loads, stores, dot tiles and exp2 calls (one head through the Triton
                   interpreter); registers, spills, shared memory from ptxas for sm_90 and the
                   CTAs per SM they allow; the instructions a program issues, by class (tensor
                   core, fp32, exp unit, shuffles) from the SASS; then bytes against the previous
                   kernels and FlashAttention-2 (their launch schemes, `traffic_model`).
                   --candidates: every config the pinned choice was made from.
  --compile-check  every shipped config at every tile class, compiled for sm_90, sm_80 (A100) and
                   sm_89 (L40S / RTX 4090): ptxas registers, spills, shared memory, CTAs per SM,
                   SASS counts per warp; exits 1 on a spill on sm_90, or on sm_80 / sm_89 one
                   that attention.SPILLS does not list (those launches take SDPA there). Run it
                   with each triton the kit supports (3.6 and 3.8: CONFIGS differs between them).
  --self-check     each kernel's first-use self-check (kernels/verify.py) at the training shapes,
                   on a GPU or through the interpreter: the verdict lines and each check's time.
  --overhead       CPU microseconds per forward + backward call: ours with the Triton launches
                   stubbed, SDPA / eager losses.py on CPU tensors too small to compute
                   (`overhead_rows` says exactly what is in and out).
"""
import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import time

import torch

TRAIN = (1024, 3, 67, 64)     # (B, H, N, D): DeiT-Tiny students at 32px, patch 4, 3 special tokens
TEACHER = (1024, 6, 197, 64)  # DeiT-III Small at 224px, patch 16, class token
BATCHES = (1024, 128)         # the global batch and one GPU's share of it (8 GPUs)
DEVICE = "cuda"
# Goals by name prefix (each measured eager and from a CUDA graph); other measurements print as
# INFO.
GOALS = {"attention kernel vs fastest SDPA B1024": 1.3,
         "attention packed layer vs SDPA layer B1024": 1.0,
         "loss vs eager B1024": 5.0, "loss vs torch.compile B1024": 1.0}


# ------------------------------------------------------------------------------------- counting

def traffic_model(scheme, kernel, N, D, elem=2):
    """Bytes one (batch, head) moves in `kernel` under `scheme` (every program's loads + stores, so
    re-reads of the same rows by several programs count each time; L2 hits make DRAM traffic less).
    t = one N x D tensor of the head, r = one fp32 row statistic (LSE or delta)."""
    t, r, cdiv = N * D * elem, N * 4, lambda a, b: -(-a // b)
    if scheme == "ours":
        if kernel == "fwd":  # short: Q, K, V once, O and LSE out; long: K, V once per query block
            A = importlib.import_module("kernels.attention")
            consts, _ = A.choose(A.forward_kernel(N), None, N, D, torch.float16)
            blocks = 1 if N <= A.SHORT_N else cdiv(N, consts["BLOCK_M"])
            return 2 * t * blocks + 2 * t + r
        return 5 * t + r + 3 * t  # bwd: Q K V O dO + LSE in, dQ dK dV out (one program a head)
    if scheme == "previous":  # 64-row query blocks; dq (64, 32) and dk/dv (16 rows, 64-key blocks)
        nq, nk = cdiv(N, 64), cdiv(N, 64)
        if kernel == "fwd":
            return t + 2 * t * nq + t + r
        dq = 3 * t + 2 * t * nq + r + t          # Q dO O once, K V per query block, dQ out
        dkdv = 2 * t + (3 * t + r) * nk + 2 * t  # K V once, Q dO O LSE per key block, dK dV out
        return dq + dkdv
    if scheme == "fa2":  # FlashAttention-2 at D=64: 128-row query and key blocks
        if kernel == "fwd":
            return t + 2 * t * cdiv(N, 128) + t + r
        dq_acc = 2 * t  # dQ accumulated in fp32 (twice a bf16 tensor)
        pre = 2 * t + r + dq_acc                    # delta = rowsum(dO O); dQ accumulator zeroed
        # K V; Q dO LSE delta; dK dV; dQ atomics
        main = 2 * t + (2 * t + 2 * r) * cdiv(N, 128) + 2 * t + dq_acc
        return pre + main + dq_acc + t              # and dQ converted from fp32
    if scheme == "sdpa layer extra":  # model.py's SDPA path: stack(dq, dk, dv) into dqkv (bwd)
        return 0 if kernel == "fwd" else 6 * t
    raise ValueError(scheme)


def count_work(fn):
    """What every Triton program `fn()` launches does, counted in the interpreter: bytes loaded +
    stored (masked-in elements), multiply-adds of its tl.dot tiles (M*N*K, padding included) and
    exp2 evaluations (every lane of the tile, masked or not)."""
    from triton.runtime import interpreter as I
    n = {"bytes": 0, "macs": 0, "exps": 0}
    B = I.InterpreterBuilder
    load, store = B.create_masked_load, B.create_masked_store
    dot, exp2 = B.create_dot, B.create_exp2

    def counted_load(self, ptrs, mask, other, *args):
        n["bytes"] += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
        return load(self, ptrs, mask, other, *args)

    def counted_store(self, ptrs, value, mask, *args):
        n["bytes"] += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
        return store(self, ptrs, value, mask, *args)

    def counted_dot(self, a, b, *args):
        (m, k), nn = a.data.shape[-2:], b.data.shape[-1]
        n["macs"] += m * nn * k
        return dot(self, a, b, *args)

    def counted_exp2(self, arg):
        n["exps"] += arg.data.size
        return exp2(self, arg)

    B.create_masked_load, B.create_masked_store, B.create_dot, B.create_exp2 = (
        counted_load, counted_store, counted_dot, counted_exp2)
    try:
        fn()
    finally:
        B.create_masked_load, B.create_masked_store = load, store
        B.create_dot, B.create_exp2 = dot, exp2
    return n


def count_bytes(fn):
    return count_work(fn)["bytes"]


def counted_attention(N, D):
    """Per-head work of our packed forward and backward (None where SDPA runs the backward),
    counted; fp16 stands in for bf16 (same sizes; the interpreter's bf16 dot is wrong)."""
    A = importlib.import_module("kernels.attention")
    qkv = torch.randn(1, N, 3, 1, D, dtype=torch.float16)
    out = {}
    fwd = count_work(lambda: out.setdefault("o", A._attention_packed_fwd(qkv)))
    o, lse = out["o"]
    bwd = None
    if A.choose("bwd_short", None, N, D, torch.float16) is not None:
        bwd = count_work(lambda: A._attention_packed_bwd(torch.randn_like(o), qkv, o, lse))
    return fwd, bwd


def counted_attention_bytes(N, D):
    fwd, bwd = counted_attention(N, D)
    return fwd["bytes"], bwd["bytes"] if bwd else None


def useful_work(kernel, N, D):
    """Multiply-adds and exps one head needs: 2 (fwd) or 5 (bwd) N x N x D products, N x N exps."""
    return (2 if kernel.startswith("fwd") else 5) * N * N * D, N * N


# Per SM of each compute capability checked: (shared memory KB per SM, per block KB, threads, CTAs);
# every one has 65,536 registers. sm_90: H100 / H200; sm_80: A100; sm_89: L40S / RTX 4090.
SM = {90: (228, 227, 2048, 32), 80: (164, 163, 2048, 32), 89: (100, 99, 1536, 24)}
ARCHS = (90, 80, 89)


def occupancy(regs, smem, warps, arch=90):
    """CTAs per SM of sm_`arch`: 65,536 registers (allocated per warp in 256s), its shared memory
    (1 KB reserved per CTA), threads and CTAs (SM)."""
    if regs is None:
        return None
    per_warp = -(-regs * 32 // 256) * 256
    smem_sm, _, threads, ctas = SM[arch]
    return min(65536 // (per_warp * warps), (smem_sm * 1024) // (smem + 1024),
               threads // (32 * warps), ctas)


def _with_config(kernel, bits, D, N, entry, fn):
    """fn() with CONFIGS[(kernel, bits, BLOCK_D, N)] set to `entry` (a candidate), restored
    after."""
    A = importlib.import_module("kernels.attention")
    key, saved = (kernel, bits, A._pow2(D), N), dict(A.CONFIGS)
    A.CONFIGS[key] = entry
    A._choose.cache_clear()
    try:
        return fn()
    finally:
        A.CONFIGS.clear()
        A.CONFIGS.update(saved)
        A._choose.cache_clear()


SHAPES = {"fwd_short": TRAIN, "bwd_short": TRAIN, "fwd_long": TEACHER}
# The configs the pinned choice at D = 64 (16-bit) was made from: (BLOCK_M, BLOCK_N, warps, stages,
# regs cap).
CANDIDATES = {
    "fwd_short": [(m, 0, w, 2, r) for m in (64, 32, 16)
                  for w, r in ((4, 0), (4, 168), (4, 128), (8, 128))],
    "bwd_short": [(m, 0, w, s, r) for m in (64, 32, 16)
                  for w, s, r in ((4, 2, 0), (4, 1, 0), (8, 1, 0), (8, 1, 128))],
    "fwd_long": [(m, n, w, 2, r) for m in (128, 64, 32) for n in (64, 32)
                 for w, r in ((4, 0), (4, 168), (8, 128))],
}


def work_rows(candidates=False):
    """Counted work per kernel at its shape (interpreter): the shipped config, or every
    candidate."""
    A = importlib.import_module("kernels.attention")
    rows = []
    for kernel, (B, H, N, D) in SHAPES.items():
        shipped = A.config_entry(kernel, 16, D, N)
        for entry in (CANDIDATES[kernel] if candidates else [shipped]):
            fwd, bwd = _with_config(kernel, 16, D, N, entry,
                                    functools.partial(counted_attention, N, D))
            c = fwd if kernel.startswith("fwd") else bwd
            macs, exps = useful_work(kernel, N, D)
            choose = functools.partial(A.choose, kernel, None, N, D, torch.float16)
            consts, _ = _with_config(kernel, 16, D, N, entry, choose)
            rows.append({"kernel": kernel, "shape": f"B{B} H{H} N{N} D{D}", "config": list(entry),
                         "shipped": entry == shipped, "tiles": consts,
                         "u": c["bytes"] * B * H / (B * H * N * D * 2),
                         "MB": c["bytes"] * B * H / 1e6,
                         "macs_useful": macs, "macs_padded": c["macs"], "exps_useful": exps,
                         "exps_padded": c["exps"]})
    return rows


def tiles_str(kernel, c):
    if kernel == "fwd_long":
        return f"rows {c['BLOCK_M']}+{c['ROW_TAIL']} keys {c['BLOCK_N']}+{c['KEY_TAIL']}"
    return f"rows {c['BLOCK_M']}x keys {c['BLOCK_N']}+{c['BLOCK_T']}"


def print_work(rows):
    print("counted per (batch, head) in the Triton interpreter, times B*H; registers / spills / "
          "shared memory from ptxas for sm_90; CTAs per SM from those (65,536 regs, 228 KB, "
          "2,048 threads). Counted, not measured on a GPU.")
    print(f"{'kernel':<10} {'shape':<18} {'BLOCK_M,N,warps':<16} {'tiles':<26} {'u':>5} {'MB':>6} "
          f"{'MACs use/pad':>12} {'exps use/pad':>12} {'regs':>4} {'spill':>5} {'smem KB':>7} "
          f"{'CTA/SM':>6} mma  "
          f"SASS/program: {' '.join(f'{c:>6}' for c in ('total', *SASS_CLASSES))}")
    for r in rows:
        star = "*" if r.get("shipped") else " "
        sass = {c: n * r["config"][2] for c, n in (r.get("sass") or {}).items()}  # per warp x warps
        print(f"{r['kernel']:<10} {r['shape']:<18} {star}{','.join(map(str, r['config'])):<15} "
              f"{tiles_str(r['kernel'], r['tiles']):<26} {r['u']:>5.2f} {r['MB']:>6.1f} "
              f"{r['macs_useful'] / r['macs_padded']:>12.2f} "
              f"{r['exps_useful'] / r['exps_padded']:>12.2f} "
              f"{_fmt(r.get('regs')):>4} {_fmt(r.get('spill')):>5} {_fmt(r.get('smem'), 1024):>7} "
              f"{_fmt(r.get('ctas')):>6} {r.get('mma', '?'):<5}              "
              f"{' '.join(f'{_fmt(sass.get(c)):>6}' for c in ('total', *SASS_CLASSES))}")
    print("* the shipped (pinned) config; u = one B*H*N*D bf16 tensor; use/pad = useful / executed "
          "work; SASS/program: instructions one (batch, head) issues, its warps together "
          "(nvdisasm; loop bodies times their trips), all and by class")


def _fmt(x, div=1):
    return "?" if x is None else f"{x / div:.0f}" if div > 1 else str(x)


def bytes_rows():
    rows = []
    for shape, kernels_ in ((TRAIN, ("fwd", "bwd")), (TEACHER, ("fwd",))):
        B, H, N, D = shape
        u = B * H * N * D * 2
        ours = dict(zip(("fwd", "bwd"), counted_attention_bytes(N, D)))
        for kernel in kernels_:
            for name, per_head, how in [
                    ("ours", ours[kernel], "counted"),
                    ("previous kernels", traffic_model("previous", kernel, N, D), "model"),
                    ("FlashAttention-2", traffic_model("fa2", kernel, N, D), "model"),
                    ("FA2 via SDPA layer", traffic_model("fa2", kernel, N, D)
                     + traffic_model("sdpa layer extra", kernel, N, D), "model")]:
                total = per_head * B * H
                rows.append({"shape": f"B{B} H{H} N{N} D{D}", "kernel": f"attention {kernel}",
                             "impl": name, "u": total / u, "MB": total / 1e6, "how": how})
    return rows


def print_bytes(rows):
    print("bytes moved (loads + stores of every program; u = one B*H*N*D bf16 tensor)")
    print(f"{'shape':<20} {'kernel':<15} {'impl':<20} {'u':>6} {'MB':>8}  how")
    for r in rows:
        print(f"{r['shape']:<20} {r['kernel']:<15} {r['impl']:<20} {r['u']:>6.2f} "
              f"{r['MB']:>8.1f}  {r['how']}")
    t = {(r["shape"], r["kernel"], r["impl"]): r["u"] for r in rows}
    s = "B1024 H3 N67 D64"
    ours = t[(s, "attention fwd", "ours")] + t[(s, "attention bwd", "ours")]
    for other in ("previous kernels", "FlashAttention-2", "FA2 via SDPA layer"):
        both = t[(s, "attention fwd", other)] + t[(s, "attention bwd", other)]
        print(f"training fwd+bwd: {other} {both:.2f}u vs ours {ours:.2f}u -> "
              f"{both / ours:.2f}x fewer bytes (the speed-up if memory-bound, an estimate)")


def counts_main(candidates):
    """--bytes: the counts come from a child process under the interpreter, the compiled facts
    (registers, CTAs per SM) from this one, which must not be interpreted."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    code = ("import json, kernels.bench as b; "
            f"print(json.dumps([b.work_rows({candidates}), b.bytes_rows()]))")
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=False)
    if child.returncode:
        print(child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "counting failed")
        return 1
    work, traffic = json.loads(child.stdout.strip().splitlines()[-1])
    for r in work:  # compiled as trained: bf16
        D, N = int(r["shape"].split("D")[1]), int(r["shape"].split("N")[1].split()[0])
        try:
            stats = functools.partial(compile_stats, r["kernel"], torch.bfloat16, N, D)
            r.update(_with_config(r["kernel"], 16, D, N, tuple(r["config"]), stats))
        # no ptxas here, or a config that does not compile: the counts still print
        except Exception as e:  # noqa: BLE001 (any compile failure is reported, not raised)
            why = str(e).splitlines()[0][:100] if str(e) else ""
            print(f"compile {r['kernel']} {r['config']}: {type(e).__name__}: {why}")
    print_work(work)
    print()
    print_bytes(traffic)
    return 0


# -------------------------------------------------------------------------------- compile check

def _nvidia_tool(tool, data, suffix, *args):
    """Run one of the CUDA tools triton ships (ptxas, nvdisasm) on `data` written to a temporary
    file: tool [args...] FILE. -> the finished process (text stdout / stderr)."""
    import tempfile

    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.NamedTemporaryFile("wb", suffix=suffix) as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        return subprocess.run([path, *args, f.name], capture_output=True, text=True, check=False)


def _ptxas_counts(ptx, arch):
    import re
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # sm_90a: wgmma
    log = _nvidia_tool("ptxas", ptx, ".ptx", "-v", f"--gpu-name={gpu}", "-o", os.devnull).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs[1]) if regs else None), (int(spill[1]) if spill else None)


SASS_CLASSES = {"tensor": "HMMA|HGMMA", "fp32": "FFMA|FMUL|FADD|FMNMX|FSEL|FSETP", "mufu": "MUFU",
                "shfl": "SHFL"}


def _sass_counts(cubin, trips):
    """Instructions one warp issues, by class (SASS_CLASSES, and the total), read from the cubin
    with nvdisasm: straight-line code once, the body of a loop (a backward branch) `trips` times.
    The short attention kernels have one loop level, the query chunks; its trip count is the
    caller's."""
    import re
    done = _nvidia_tool("nvdisasm", cubin, ".cubin", "-c")
    done.check_returncode()
    labels, code, pending = {}, [], []
    for line in done.stdout.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(m[1])
        elif m := re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line):
            labels.update((label, int(m[1], 16)) for label in pending)
            pending = []
            code.append((int(m[1], 16), m[2], m[3]))
    loops = [(labels[t[1]], at) for at, op, rest in code if op == "BRA"
             and (t := re.search(r"\((\.L_x_\d+)\)", rest)) and labels[t[1]] < at]
    n = dict.fromkeys([*SASS_CLASSES, "total"], 0)
    for at, op, _ in code:
        w = trips if any(lo <= at <= hi for lo, hi in loops) else 1
        n["total"] += w
        for name, ops in SASS_CLASSES.items():
            if re.match(ops, op):
                n[name] += w
    return n


def _signature(fn, consts, tname):
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in ("LSE", "STATS", "ROW_LOSS", "GO"):
            sig[arg] = "*fp32"
        elif arg in ("LABELS", "TYPES"):
            sig[arg] = "*i64"
        elif arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "CLS", "CORR_CLS", "DIST",
                     "TEACHER", "CORR", "G_CLS", "G_CC", "G_DIST", "G_CORR"):
            sig[arg] = f"*{tname}"
        elif "scale" in arg or arg in ("smoothing", "inv_tau") or arg.startswith("w_"):
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    return sig


TNAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPE = {name: dtype for dtype, name in TNAME.items()}


def compile_kernel(fn, consts, opts, tname, arch=90, trips=None):
    """ptxas's counts for one kernel compiled for sm_`arch` with launch options `opts` (num_warps,
    num_stages, maxnreg): regs, spill (B), smem (B), mma kind, CTAs per SM; with `trips` (its loop's
    trip count) also `sass`, the instructions per warp by class (_sass_counts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    k = triton.compile(ASTSource(fn=fn, signature=_signature(fn, consts, tname), constexprs=consts),
                       target=GPUTarget("cuda", arch, 32), options=dict(opts))
    regs, spill = _ptxas_counts(k.asm["ptx"], arch)
    ptx = k.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"
    smem = k.metadata.shared
    return {"regs": regs, "spill": spill, "smem": smem, "mma": mma,
            "ctas": occupancy(regs, smem, opts["num_warps"], arch),
            **({"sass": _sass_counts(k.asm["cubin"], trips)} if trips else {})}


def compile_stats(kernel, dtype, N, D, arch=90):
    """The pinned launch of `kernel` at (N, D, dtype), compiled for sm_`arch`."""
    A = importlib.import_module("kernels.attention")
    consts, opts = A.choose(kernel, None, N, D, dtype)
    fn = {"fwd_short": A._attn_fwd_short_kernel, "bwd_short": A._attn_bwd_short_kernel,
          "fwd_long": A._attn_fwd_long_kernel}[kernel]
    # The short kernels' loop: the query chunks of the main block. (The long kernel has two code
    # paths, a head's last row block and the others: no one count per warp.)
    trips = None if kernel == "fwd_long" else consts["BLOCK_N"] // consts["BLOCK_M"]
    return compile_kernel(fn, dict(consts), opts, TNAME[dtype], arch=arch, trips=trips)


TILE_CLASSES = {  # one N per distinct tile set the chooser can return; 67: the students' entries
    "fwd_short": (16, 32, 48, 64, 67, 80), "bwd_short": (16, 32, 48, 64, 67, 80),
    # the long kernel's row and key tails: 16, 32, none, a masked block
    "fwd_long": (197, 224, 256, 300),
}


def compile_check(archs=ARCHS):
    """Compile every pinned config (CONFIGS) at every tile class its N range can give, for each
    dtype and head size, and the loss kernel, for each compute capability in `archs`; report ptxas
    registers, spills, shared memory, CTAs per SM and SASS counts per warp. Returns 1 if an sm_90
    config spills or exceeds shared memory (the shipped table); on sm_80 / sm_89 such configs are
    listed in kernels/attention.py's SPILLS and take SDPA there."""
    A = importlib.import_module("kernels.attention")
    L = importlib.import_module("kernels.distill_loss")
    if A.INTERPRETED:
        print("compile check: unset TRITON_INTERPRET first")
        return 1
    bad = 0
    for arch in archs:
        print(f"sm_{arch}")
        print(f"{'kernel':<10} {'dtype':<5} {'D':>4} {'N':>4} {'BLOCK_M,N,warps':<16} "
              f"{'tiles':<26} {'regs':>5} {'spill B':>7} {'smem B':>7} {'CTA/SM':>6} mma   "
              f"SASS/warp tensor,fp32,mufu,total  sm_{arch}")
        for name, tname, D, N, entry, tiles, s in _compile_rows(A, L, arch):
            clean = s["spill"] == 0 and s["smem"] <= SM[arch][1] * 1024
            bad += not clean and arch == 90
            path = ""
            if not clean and name in A.KERNELS and arch != 90:
                consts, _ = A.choose(name, None, N, D, DTYPE[tname])
                listed = A.spills(name, (arch // 10, arch % 10), 8 * DTYPE[tname].itemsize, consts)
                bad += not listed
                path = "  SDPA there (SPILLS)" if listed else "  spills: add to SPILLS"
            sass = s.get("sass")
            sass = ",".join(str(sass[c]) for c in ("tensor", "fp32", "mufu", "total")) \
                if sass else "-"
            entry = ",".join(map(str, entry))
            print(f"{name:<10} {tname:<5} {D:>4} {N:>4} {entry:<16} {tiles:<26} "
                  f"{_fmt(s['regs']):>5} {_fmt(s['spill']):>7} {s['smem']:>7} {_fmt(s['ctas']):>6} "
                  f"{s['mma']:<5} {sass}{path}", flush=True)
    print("sm_90: no spills, shared memory within bounds; other GPUs: SPILLS lists every config "
          "that spills there" if not bad else
          f"{bad} configs spill or exceed shared memory: change kernels/attention.py's CONFIGS or "
          "SPILLS")
    return int(bad > 0)


def _compile_rows(A, L, arch):
    """(name, dtype name, D, N, entry, tiles, stats) per pinned config and tile class, then the
    loss kernels, compiled for sm_`arch`."""
    for kernel, bits, BLOCK_D in dict.fromkeys(key[:3] for key in A.CONFIGS):
        for dtype in ([torch.bfloat16, torch.float16] if bits == 16 else [torch.float32]):
            for N in TILE_CLASSES[kernel]:
                consts, _ = A.choose(kernel, None, N, BLOCK_D, dtype)
                yield (kernel, TNAME[dtype], BLOCK_D, N, A.config_entry(kernel, bits, BLOCK_D, N),
                       tiles_str(kernel, consts), compile_stats(kernel, dtype, N, BLOCK_D, arch))
    opts = {"num_warps": 4, "num_stages": 2}
    for mode in (0, 1, 2):  # the loss kernels as launched: vit / deit hard / cdeit soft, mixup
        for backward in (False, True):
            consts = {"HAS_CORR_CLS": mode == 2, "TEACHER_MODE": mode, "HAS_CORR": mode == 2,
                      "SOFT_LABELS": mode == 2, "SOFT_TYPES": False, "BACKWARD": backward,
                      "BLOCK_B": L._block_rows(10, 11), "BLOCK_C": 16, "BLOCK_T": 16}
            yield (f"loss {'bwd' if backward else 'fwd'}{mode}", "bf16", 0, 0,
                   (consts["BLOCK_B"], 16, 4, 0), "",
                   compile_kernel(L._rows_kernel, consts, opts, "bf16", arch=arch))
    consts = {"HAS_TEACHER": True, "HAS_CORR": True, "SUM_BLOCK": L.SUM_BLOCK}
    yield ("loss sum", "bf16", 0, 0, (L.SUM_BLOCK, 0, 4, 0), "",
           compile_kernel(L._sum_kernel, consts, opts, "bf16", arch=arch))


# ----------------------------------------------------------------------------------- self-check

def self_check():
    """Run each kernel's first-use self-check (kernels/verify.py) at the shapes training runs: the
    students' attention (N = 65-67, 3 heads of 64) forward and backward, the teacher's forward
    (N = 197, 6 heads), the loss of deit / cdeit, hard and soft, with and without mixup; bf16 and
    fp16 on a GPU, fp16 and fp32 through the interpreter. Prints the verdict lines and each
    check's time. Returns 1 if a kernel failed."""
    V = importlib.import_module("kernels.verify")
    A = importlib.import_module("kernels.attention")
    cuda = torch.cuda.is_available() and not A.INTERPRETED
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = (torch.bfloat16, torch.float16) if cuda else (torch.float16, torch.float32)
    print(f"self-check on {torch.cuda.get_device_name() if cuda else 'CPU (interpreter)'}, "
          f"triton {triton_version()}")
    times = []

    def timed(what, fn):
        t0 = time.perf_counter()
        fn()
        times.append((what, time.perf_counter() - t0))

    for dtype in dtypes:
        for N, H, grad in ((65, 3, True), (66, 3, True), (67, 3, True), (197, 6, False)):
            shape = ("B", N, 3, H, 64)
            missing = A._no_config(torch.empty(0, device=device, dtype=dtype), N, 64, grad)
            if missing:
                V.note(missing[0], shape, dtype, missing[1])
                continue
            for kernel in ("attention forward",) + (("attention backward",) if grad else ()):
                timed(f"{kernel} N={N} {TNAME[dtype]}",
                      functools.partial(V.allowed, kernel, shape, dtype, device))
        for distill, T, labels in (("hard", 0, torch.int64), ("soft", 0, torch.float32),
                                   ("hard", 11, torch.int64), ("soft", 11, torch.float32)):
            spec = (distill, T, T > 0, True, labels, torch.int64 if T else None, dtype, 3.0, 0.5,
                    0.1)
            for kernel in ("loss forward", "loss backward"):
                timed(f"{kernel} {distill} T={T} {TNAME[dtype]}",
                      functools.partial(V.allowed, kernel, ("B", 10), dtype, device, *spec))
    total = sum(t for _, t in times)
    print(f"{len(times)} checks in {total:.2f} s: " +
          ", ".join(f"{what} {t:.2f} s" for what, t in times))
    failed = V.verdicts()["failed"]
    return int(bool(failed))


def triton_version():
    import triton
    return triton.__version__


# ------------------------------------------------------------------------------------- overhead

def _per_call_us(fn, calls=200, repeats=7):
    """(best, median) over `repeats` of the mean CPU microseconds per fn() call, after a warm-up."""
    import statistics
    import time
    for _ in range(20):
        fn()
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return min(per), statistics.median(per)


def overhead_rows():
    """CPU microseconds per forward + backward call (torch.autograd.grad), Triton launches stubbed.

    Ours: the public functions on CPU tensors under the interpreter, with every Triton launch
    (`kernel[grid](...)`) replaced by a counter after one real call (whose self-check passes:
    what is timed is the steady state, the verdict looked up), so all of our Python runs
    (argument checks, autograd, the operators' bodies, output allocation) but no kernel and none
    of Triton's own launcher (argument binding, cache lookup, cuLaunchKernel: not measurable
    without a GPU driver). SDPA and eager losses.py: the same calls on CPU tensors too small to
    compute anything (N = 1, B = 1), so what remains is PyTorch's dispatch, autograd and
    allocation (CPU kernels instead of CUDA launches). fp16 inputs (the interpreter does not run
    bf16)."""
    import triton.runtime.interpreter as I

    import kernels
    import losses
    from model import Logits
    torch.set_num_threads(1)
    launches = {"n": 0}
    real_run = I.InterpretedFunction.run

    def stub(self, *args, **kwargs):
        launches["n"] += 1
    half = torch.float16

    def fwd_bwd(f, xs):
        def call():
            out = f(*xs)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out, xs, torch.ones_like(out))
        return call

    def packed(N):
        return [torch.randn(1, N, 3, 3, 64, dtype=half, requires_grad=True)]

    def qkv(N):
        return [torch.randn(1, 3, N, 64, dtype=half, requires_grad=True) for _ in range(3)]

    def loss_inputs(B):
        g = lambda n: torch.randn(B, n, requires_grad=True)
        return [g(10), g(10), g(11), g(10)]

    labels, types = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    teacher = torch.randn(1, 10)

    def loss_call(fn):
        return lambda *xs: fn(Logits(*xs), labels, teacher, types, distill="soft")[0]

    layer, plain = "attention packed layer (model.py)", "attention (q, k, v)"
    loss = "loss cdeit soft"
    cases = [  # (what, impl, fn, inputs, uses Triton)
        (layer, "ours", kernels.attention_packed, packed(67), True),
        (layer, "SDPA layer, N=1", kernels.sdpa_packed, packed(1), False),
        (plain, "ours", kernels.attention, qkv(67), True),
        (plain, "SDPA, N=1", torch.nn.functional.scaled_dot_product_attention, qkv(1), False),
        (loss, "ours", loss_call(kernels.distillation_loss), loss_inputs(1), True),
        (loss, "eager losses.py, B=1", loss_call(losses.distillation_loss), loss_inputs(1), False),
    ]
    rows = []
    for what, impl, fn, xs, triton_ in cases:
        call = fwd_bwd(fn, xs)
        if triton_:
            call()  # launches not stubbed yet: the self-check runs and passes here, not below
        I.InterpretedFunction.run = stub
        try:
            launches["n"] = 0
            call()
            n = launches["n"]
            if triton_ and n == 0:
                raise RuntimeError(f"{what}: no Triton launch: the call fell back to PyTorch")
            best, median = _per_call_us(call)
        finally:
            I.InterpretedFunction.run = real_run
        rows.append({"what": what, "impl": impl, "best_us": best, "median_us": median,
                     "launches": n})
    return rows


def print_overhead():
    load = os.getloadavg()
    rows = overhead_rows()
    print("CPU-side cost per forward + backward call, microseconds (best / median of 7 x 200 "
          "calls), 1 thread")
    print("ours: Triton launches stubbed (our Python, dispatch, autograd, allocation; not Triton's "
          "launcher);")
    print("PyTorch rows: CPU tensors too small to compute (dispatch, autograd, allocation)")
    print(f"{'call':<36} {'impl':<22} {'best us':>8} {'median us':>10} {'launches':>9}")
    for r in rows:
        print(f"{r['what']:<36} {r['impl']:<22} {r['best_us']:>8.1f} {r['median_us']:>10.1f} "
              f"{r['launches'] if r['launches'] else '-':>9}")
    print(f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


# ----------------------------------------------------------------------------------- GPU timing

def _bench(fn):
    """(eager, graph) median ms of fn(): launched from Python each call (triton.testing.do_bench),
    and replayed from one CUDA graph (do_bench_cudagraph: GPU time without the CPU's launch cost);
    graph is None where capture fails."""
    import triton.testing
    eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except RuntimeError as e:  # a backend that cannot be captured
        print(f"  CUDA graph capture failed: {str(e).splitlines()[0][:100]}")
        graph = None
    return eager, graph


def _fwd_bwd(fn, inputs, grad):
    """fwd + bwd through torch.autograd.grad (no .grad accumulation), or fwd under no_grad."""
    if grad is None:
        def run():
            with torch.no_grad():
                fn()
        return run
    return lambda: torch.autograd.grad(fn(), inputs, grad)


def _rows_of(bench, shape, results, ref_of, rate=None):
    """Table rows: each impl's (eager, graph) ms and its speed-up over its reference per mode."""
    rows = []
    for name, (eager, graph) in results.items():
        ref = results[ref_of(name)]
        rows.append({"bench": bench, "shape": shape, "impl": name, "eager_ms": eager,
                     "graph_ms": graph,
                     "rate": rate / graph / 1e9 if rate and graph else None,
                     "vs_ref_eager": ref[0] / eager,
                     "vs_ref_graph": ref[1] / graph if ref[1] and graph else None})
    return rows


def _fastest_sdpa(results):
    """The fastest SDPA backend per mode, as a pseudo-impl (eager, graph) in ms."""
    sdpa = [v for n, v in results.items() if n.startswith("sdpa[")]
    return (min(e for e, _ in sdpa), min((g for _, g in sdpa if g is not None), default=None))


# The students' backward (BLOCK_M, BLOCK_N, warps, stages, regs cap) candidates: 2 CTAs of 4 warps
# at 32 rows (no spill on triton 3.8) or 16 rows (the least spill on 3.6: 12 B), 1 CTA of 8 warps
# (no spill).
BWD_ALTERNATIVES = [(32, 0, 4, 1, 0), (16, 0, 4, 1, 0), (16, 0, 8, 1, 0)]


def _sdpa_with(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def bench_attention(dtype):
    from torch.nn.attention import SDPBackend

    import kernels
    rows, goals = [], {}
    shapes = [((B,) + TRAIN[1:], True) for B in BATCHES] + [(TEACHER, False)]
    for shape, train in shapes:
        B, H, N, D = shape
        q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, requires_grad=train)
                   for _ in range(3))
        go = torch.randn(B, H, N, D, device=DEVICE, dtype=dtype) if train else None
        qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=dtype, requires_grad=train)
        go_packed = go.transpose(1, 2).reshape(B, N, H * D) if train else None
        flops = (12 if train else 4) * B * H * N * N * D  # 2 matmuls forward, 4 backward
        shape_s, results = f"B{B} H{H} N{N} D{D}", {}
        for name, backend in [("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]:
            sdpa = functools.partial(_sdpa_with, backend, q, k, v)
            try:
                sdpa()
                results[f"sdpa[{name}]"] = _bench(_fwd_bwd(sdpa, [q, k, v], go))
            except RuntimeError as e:  # backend not available for this shape/dtype/GPU
                print(f"  sdpa[{name}] unavailable at {shape_s}: {str(e).splitlines()[0][:100]}")
        results["fastest sdpa"] = _fastest_sdpa(results)
        attend = functools.partial(kernels.attention, q, k, v)
        results["triton"] = _bench(_fwd_bwd(attend, [q, k, v], go))
        if train and B == BATCHES[0]:  # the students' backward configs the pin chose between
            A = importlib.import_module("kernels.attention")
            for entry in BWD_ALTERNATIVES:
                if entry != A.config_entry("bwd_short", 16, D, N):
                    results[f"triton, backward {','.join(map(str, entry))}"] = _with_config(
                        "bwd_short", 16, D, N, entry,
                        functools.partial(_bench, _fwd_bwd(attend, [q, k, v], go)))
        packed = functools.partial(kernels.attention_packed, qkv)
        results["triton packed layer"] = _bench(_fwd_bwd(packed, [qkv], go_packed))
        off = "sdpa packed layer (model, kernels off)"
        sdpa_packed = functools.partial(kernels.sdpa_packed, qkv)
        results[off] = _bench(_fwd_bwd(sdpa_packed, [qkv], go_packed))
        rows += _rows_of(f"attention {'fwd+bwd' if train else 'fwd'}", shape_s, results,
                         lambda n, off=off: off if "layer" in n else "fastest sdpa", flops)
        fastest, ours = results["fastest sdpa"], results["triton"]
        layer, sdpa_layer = results["triton packed layer"], results[off]
        tag = f"B{B}" if train else f"teacher fwd B{B}"
        for i, mode in ((0, "eager"), (1, "graph")):
            if fastest[i] and ours[i]:
                goals[f"attention kernel vs fastest SDPA {tag} {mode}"] = fastest[i] / ours[i]
            if sdpa_layer[i] and layer[i]:
                name = f"attention packed layer vs SDPA layer {tag} {mode}"
                goals[name] = sdpa_layer[i] / layer[i]
    return rows, goals


def _loss_value(fn, out, labels, teacher, types, distill):
    return fn(out, labels, teacher, types, distill=distill)[0]


def bench_loss(dtype):
    import kernels
    import losses
    from model import Logits
    C, T = 10, 11
    rows, goals = [], {}
    # one graph per (model kind, batch): 6, near the default 8
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(losses.distillation_loss, dynamic=False)
    kinds = [("vit", "none"), ("deit", "hard"), ("deit", "soft"), ("cdeit", "hard"),
             ("cdeit", "soft")]
    for B in BATCHES:  # every kind at the global batch; one GPU's share for CdeiT soft only
        for kind, distill in (kinds if B == BATCHES[0] else kinds[-1:]):
            def logits(n, B=B):
                return torch.randn(B, n, device=DEVICE, dtype=dtype, requires_grad=True)

            cdeit = kind == "cdeit"
            out = Logits(logits(C), logits(C) if kind != "vit" else None,
                         logits(T) if cdeit else None, logits(C) if cdeit else None)  # strategy 2
            params = [x for x in out if x is not None]
            labels = torch.randint(0, C, (B,), device=DEVICE)
            teacher = torch.randn(B, C, device=DEVICE) if kind != "vit" else None
            types = torch.randint(0, T, (B,), device=DEVICE) if kind == "cdeit" else None
            one = torch.ones((), device=DEVICE)
            results = {}
            for name, fn in [("eager", losses.distillation_loss), ("torch.compile", compiled),
                             ("triton fused", kernels.distillation_loss)]:
                call = functools.partial(_loss_value, fn, out, labels, teacher, types, distill)
                results[name] = _bench(_fwd_bwd(call, params, one))
            rows += _rows_of("loss fwd+bwd", f"{kind} {distill} B{B}", results, lambda n: "eager")
            if B == BATCHES[0]:  # the goal holds for every model kind: report the worst
                for i, mode in ((0, "eager"), (1, "graph")):
                    for ref in ("eager", "torch.compile"):
                        if results[ref][i] and results["triton fused"][i]:
                            goal = f"loss vs {ref} B{B} {mode}"
                            goals[goal] = min(goals.get(goal, float("inf")),
                                              results[ref][i] / results["triton fused"][i])
    return rows, goals


def print_table(rows):
    print(f"{'bench':<16} {'shape':<20} {'impl':<38} {'eager ms':>9} {'graph ms':>9} "
          f"{'graph rate':>14} "
          f"{'vs ref':>7} {'(graph)':>7}")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        rate = "" if r["rate"] is None else f"{r['rate']:.1f} TFLOP/s"
        print(f"{r['bench']:<16} {r['shape']:<20} {r['impl']:<38} {r['eager_ms']:>9.4f} "
              f"{fmt(r['graph_ms'], '9.4f'):>9} {rate:>14} {r['vs_ref_eager']:>6.2f}x "
              f"{fmt(r['vs_ref_graph'], '6.2f'):>6}x")
    print("eager: launched from Python each call; graph: replayed from a CUDA graph (GPU time "
          "alone). vs ref: layer rows against the SDPA layer, other attention rows against the "
          "fastest SDPA "
          "backend, loss rows against eager losses.py.")


def print_goals(measured):
    """One `PASS|FAIL|INFO name measured goal` line per measurement; returns them for JSON."""
    out = []
    for name, value in measured.items():
        goal = next((v for k, v in GOALS.items() if name.startswith(k)), None)
        status = "INFO" if goal is None else "PASS" if value >= goal else "FAIL"
        goal_s = "-" if goal is None else f"{goal:.2f}x"
        print(f"{status} {name.replace(' ', '_')} {value:.2f}x {goal_s}")
        out.append({"name": name, "measured": value, "goal": goal, "status": status})
    return out


def summarize(outdir):
    """bench/gpu.sh's last step: one `PASS|FAIL|SKIP name measured goal` line per step
    (OUTDIR/steps.tsv:
    did it finish in its limit), per test step (its JUnit XML, OUTDIR/tests_*.xml) and per goal
    (OUTDIR/kernels_bench*.json), all of it in OUTDIR/results.json. Returns 0 only if every line is
    PASS (or INFO)."""
    import glob
    import xml.etree.ElementTree as ET
    lines = []
    try:
        with open(os.path.join(outdir, "steps.tsv")) as f:  # name, exit status, seconds, limit
            steps = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError:
        steps = []
    for name, rc, secs, limit in steps:
        how = "finished" if rc == "0" else \
            f"timed out after {limit} s" if rc in ("124", "137") else f"exit {rc}"
        lines.append({"name": f"step {name}", "measured": f"{how} in {secs} s",
                      "goal": f"finishes within {limit} s",
                      "status": "PASS" if rc == "0" else "FAIL"})
    for path in sorted(glob.glob(os.path.join(outdir, "tests_*.xml"))):
        name = os.path.basename(path)[len("tests_"):-len(".xml")]
        try:
            suite = ET.parse(path).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            n, bad, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "skipped"))
            bad += int(suite.get("errors", 0))
            status = "FAIL" if bad else "SKIP" if n == skipped else "PASS"
            passed = f"{n - bad - skipped}/{n - skipped} passed, {skipped} skipped"
            lines.append({"name": f"tests {name}", "measured": passed, "goal": "all",
                          "status": status})
        except (OSError, ET.ParseError, AttributeError) as e:
            lines.append({"name": f"tests {name}", "measured": f"no result ({e})", "goal": "all",
                          "status": "FAIL"})
    expected = [f"{g} {mode}" for g in GOALS for mode in ("eager", "graph")]
    bench = {"goals": [], "rows": []}  # the benchmark's JSON files (one per --only part) merged
    paths = sorted(glob.glob(os.path.join(outdir, "kernels_bench*.json")))
    for path in paths:
        try:
            with open(path) as f:
                part = json.load(f)
            bench["goals"] += part["goals"]
            bench["rows"] += part["rows"]
            if part.get("skipped"):
                bench["skipped"] = part["skipped"]
        except (OSError, ValueError, KeyError) as e:
            bench["error"] = f"{os.path.basename(path)}: no result ({type(e).__name__})"
    if not paths:
        bench["error"] = "no result (no kernels_bench*.json)"
    measured = {g["name"]: g for g in bench.get("goals", [])}
    for g in measured.values():
        lines.append({**g, "measured": f"{g['measured']:.2f}x"})
    for name in expected:
        if name not in measured:
            status = "SKIP" if bench.get("skipped") else "FAIL"
            why = bench.get("skipped") or bench.get("error", "not measured")
            goal = next(v for k, v in GOALS.items() if name.startswith(k))
            lines.append({"name": name, "measured": why, "goal": goal, "status": status})
    for g in lines:
        goal = "-" if g["goal"] is None else \
            f"{g['goal']}x" if isinstance(g["goal"], float) else g["goal"]
        print(f"{g['status']} {g['name'].replace(' ', '_')} {g['measured']} {goal}")
    from fileio import atomic_write
    atomic_write(os.path.join(outdir, "results.json"),
                 json.dumps({"goals": lines, "bench": bench}, indent=1), what="GPU results")
    return int(any(g["status"] not in ("PASS", "INFO") for g in lines))


def main():
    ap = argparse.ArgumentParser(prog="python -m kernels.bench",
                                 description=__doc__.split(":", 1)[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="attention inputs and loss logits (training runs bf16 autocast)")
    ap.add_argument("--only", choices=["attention", "loss"],
                    help="run one of the two GPU benchmarks")
    ap.add_argument("--json", help="also write the rows and goals to this JSON file")
    ap.add_argument("--bytes", action="store_true",
                    help="no GPU needed: counted bytes, padded vs useful MACs and exps, registers "
                         "and CTAs per SM")
    ap.add_argument("--candidates", action="store_true",
                    help="with --bytes: every candidate config, not the shipped")
    ap.add_argument("--compile-check", action="store_true",
                    help="no GPU needed: compile every shipped config for sm_90, sm_80 and sm_89, "
                         "print registers/spills/smem/SASS counts")
    ap.add_argument("--self-check", action="store_true",
                    help="the kernels' first-use self-check at the training shapes (a GPU, or the "
                         "interpreter without one): verdict lines and each check's time")
    ap.add_argument("--overhead", action="store_true",
                    help="no GPU needed: CPU microseconds per fwd+bwd call, ours (launches "
                         "stubbed) vs SDPA / eager")
    ap.add_argument("--summarize", metavar="OUTDIR",
                    help="no GPU needed: PASS/FAIL lines and OUTDIR/results.json from a "
                         "bench/gpu.sh run")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    if args.self_check:  # without a GPU: through the interpreter
        interpreted = importlib.import_module("kernels.launch").INTERPRETED
        if not torch.cuda.is_available() and not interpreted:
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, "-m", "kernels.bench", "--self-check"],
                                  env=env, check=False).returncode
        return self_check()
    if args.overhead:  # runs our kernels' Python on CPU tensors: needs the interpreter's CPU path
        if not importlib.import_module("kernels.distill_loss").INTERPRETED:
            env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
            return subprocess.run([sys.executable, "-m", "kernels.bench", "--overhead"], env=env,
                                  check=False).returncode
        return print_overhead()
    if args.compile_check or args.bytes:
        if importlib.import_module("kernels.attention").INTERPRETED:
            print("--bytes / --compile-check compile kernels: unset TRITON_INTERPRET first")
            return 1
        return compile_check() if args.compile_check else counts_main(args.candidates)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU and this machine has none: nothing measured. "
              "(--bytes, --compile-check and --overhead run without one.)")
        if args.json:  # what --summarize reads: goals SKIP, not FAIL
            from fileio import atomic_write
            atomic_write(args.json, json.dumps({"skipped": "no CUDA GPU", "rows": [], "goals": []}),
                         what="benchmark results")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    rows, measured = [], {}
    for name, fn in (("attention", bench_attention), ("loss", bench_loss)):
        if args.only in (None, name):
            r, g = fn(dtype)
            rows, measured = rows + r, {**measured, **g}
    print_table(rows)
    goals = print_goals(measured)
    if args.json:
        from fileio import atomic_write
        result = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows,
                  "goals": goals}
        atomic_write(args.json, json.dumps(result, indent=1), what="benchmark results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
