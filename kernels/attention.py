"""Fused multi-head attention for short sequences, forward and backward, in Triton.

Imports torch, triton and kernels/reference.py (its PyTorch fallback) only.

Math, for one (batch, head), non-causal, scale = D**-0.5:
    S = Q K^T * scale        P = softmax(S) (per row)        O = P V
    lse = logsumexp(S) per row, saved by the forward so the backward can rebuild P = exp(S - lse)
    dV = P^T dO    dP = dO V^T    delta = rowsum(dO * O)    dS = P * (dP - delta)
    dQ = dS K * scale              dK = dS^T Q * scale         (FlashAttention-2's backward)

Built for the shapes that run: N = 65-67 for the 32px students (trained), N = 197 for the 224px
teacher (forward only, under no_grad).
- N <= 128: one program per (batch, head). Its whole key range is one tile (BLOCK_N = N rounded
  up to a power of two, at most 128), loaded once; the program walks its query rows in chunks of
  BLOCK_M. The forward needs no online softmax (every key is in the tile) and writes O and LSE.
  The backward is one kernel: per query chunk it computes delta once, P, dV += P^T dO,
  dS, dQ (stored, complete: all keys are here) and dK += dS^T Q; dK and dV stay in registers until
  the end. No atomics, no second launch, every input read once from DRAM.
- N > 128: the forward splits a head into 128-row query blocks, each sweeping the keys in chunks
  with an online softmax; a 1-D grid with the block index varying fastest, so a head's blocks run
  side by side and share K/V through L2 (and the grid is not bound by the 65,535 limit of axes 1-2).
  Its backward (not on the training path) runs in PyTorch from the saved LSE.
Offsets are int64 (B*H*N*D passes 2**31 at large batches). Block sizes and warps are autotuned
over a few configs per (N bucket, D, dtype), pruned ahead of time to those that compile without
register spills within shared memory (FITS below; `python -m kernels.bench --compile-check`
prints ptxas's counts for each); under the Triton interpreter the first one runs, untimed.
Where no config fits (fp32 at D = 128; the backward at D = 128 or fp32 D > 32), the forward is
SDPA and the backward PyTorch: not the training path, which runs bf16 at D = 64.

Dtypes: fp16 / bf16 in, fp32 accumulation, output in the input dtype; fp32 is accepted (its dots
run as 3xTF32, about fp32 accuracy). Any N >= 1 (ragged sizes are masked), head dim up to 128.

Public API:
    attention(q, k, v)     drop-in for F.scaled_dot_product_attention(q, k, v), (B, H, N, D)
    attention_packed(qkv)  qkv: (B, N, 3, H, D), the qkv Linear's output reshaped; returns
                           (B, N, H*D) for the output projection, with no transposes or copies
                           in either direction.
Both are torch.library custom ops (fake + autograd registered), so torch.compile(fullgraph=True)
traces them. CUDA tensors run the kernels; CPU tensors run them only under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported), else fall back to SDPA.
"""
import os

import torch
import triton
import triton.language as tl

from .reference import sdpa, sdpa_packed

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the kernels use exp2
LN2 = tl.constexpr(0.6931471805599453)    # ln(x) = log2(x) * LN2
SHORT_N = 128  # sequences up to this many tokens take the one-program-per-head kernels
AUTOTUNE = os.environ.get("KERNELS_AUTOTUNE", "1") != "0"  # 0: the first fitting config, untimed (tests)


@triton.jit
def _attn_fwd_short_kernel(
    Q, K, V,                # (B, H, N, D) views with unit last stride; q, k, v share strides
    O,                      # (B, H, N, D) view of the output
    LSE,                    # (B*H, N) fp32, natural-log row logsumexp of S
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, qk_scale,      # qk_scale = D**-0.5 * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # one program per (batch, head)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh

    offs_n = tl.arange(0, BLOCK_N)  # every key of the head: N <= BLOCK_N
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    kv_offs = q_base + offs_n[:, None] * stride_qn + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D), read once
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)

    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        row_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))  # padded keys get no weight
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) / l[:, None]  # (BLOCK_M, BLOCK_D)
        tl.store(O + o_base + offs_m[:, None] * stride_on + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=row_mask)
        tl.store(LSE + pid_bh * N + offs_m, (m + tl.log2(l)) * LN2, mask=mask_m)


@triton.jit
def _attn_fwd_long_kernel(
    Q, K, V, O, LSE,        # as in _attn_fwd_short_kernel
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, qk_scale,
    N_BUCKET: tl.constexpr,  # N rounded up to a power of two: the autotuning key, unused here
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    n_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid, the query block varying fastest
    pid_bh = pid // n_blocks
    pid_m = pid % n_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    row_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                # running row sum of exp2
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):  # this program sweeps the whole key range
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kv_offs = q_base + offs_n[:, None] * stride_qn + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every chunk has a real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + o_base + offs_m[:, None] * stride_on + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + pid_bh * N + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=mask_m)


@triton.jit
def _attn_bwd_short_kernel(
    Q, K, V, DQ, DK, DV,    # (B, H, N, D) views sharing the input strides
    O, DO,                  # (B, H, N, D) views sharing the output strides
    LSE,                    # (B*H, N) fp32
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # one program per (batch, head): dQ, dK, dV complete
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh
    qk_scale = sm_scale * LOG2E

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    kv_offs = q_base + offs_n[:, None] * stride_qn + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    for start_m in range(0, N, BLOCK_M):  # each query row is visited once
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        row_mask = mask_m[:, None] & mask_d[None, :]
        q_offs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
        o_offs = o_base + offs_m[:, None] * stride_on + offs_d[None, :]
        q = tl.load(Q + q_offs, mask=row_mask, other=0.0)    # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + o_offs, mask=row_mask, other=0.0)
        o = tl.load(O + o_offs, mask=row_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,) rowsum(dO * O), once
        # lse = +inf on padded query rows makes their P row exactly 0.
        lse2 = tl.load(LSE + pid_bh * N + offs_m, mask=mask_m, other=float("inf")) * LOG2E

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq = tl.dot(ds, k, input_precision=DOT_PREC) * sm_scale
        tl.store(DQ + q_offs, dq.to(DQ.dtype.element_ty), mask=row_mask)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)

    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Configs and launchers. Each kernel has a few candidate configs (BLOCK_M, BLOCK_N, warps); FITS
# lists, per (kernel, 16- or 32-bit inputs, BLOCK_D), those that compile for sm_90 without register
# spills and within shared memory (ptxas's counts, Triton 3.8; `python -m kernels.bench
# --compile-check` re-derives them). ptxas's allocation is not monotone in tile size (at D=32 a
# config spills that does not at D=64), so a formula cannot stand in for it. Autotuning times only
# these, once per (N bucket, D, dtype); under the interpreter the first one runs, untimed. Where
# nothing fits, the forward goes to SDPA and the backward to PyTorch (`_bwd_math`).

def _cfg(block_m, warps, block_n=None):
    kw = {"BLOCK_M": block_m} if block_n is None else {"BLOCK_M": block_m, "BLOCK_N": block_n}
    return triton.Config(kw, num_warps=warps, num_stages=2)


CONFIGS = {
    "fwd_short": [_cfg(m, w) for m in (64, 32, 128, 16) for w in (8, 4)],
    "bwd_short": [_cfg(m, w) for m in (32, 16, 64) for w in (8, 4)],
    "fwd_long": [_cfg(128, w, n) for n in (64, 32) for w in (8, 4)],
}
FITS = {  # (kernel, input bits, BLOCK_D) -> (BLOCK_M, BLOCK_N or 0 for the key tile, warps)
    ("fwd_short", 16, 32): {(64, 0, 8), (64, 0, 4), (32, 0, 8), (32, 0, 4), (128, 0, 8), (128, 0, 4),
                            (16, 0, 8), (16, 0, 4)},
    ("fwd_short", 16, 64): {(64, 0, 8), (64, 0, 4), (32, 0, 8), (32, 0, 4), (128, 0, 8), (16, 0, 8), (16, 0, 4)},
    ("fwd_short", 16, 128): {(64, 0, 8), (64, 0, 4), (32, 0, 8), (32, 0, 4), (16, 0, 8), (16, 0, 4)},
    ("fwd_short", 32, 32): {(16, 0, 8), (16, 0, 4)},
    ("fwd_short", 32, 64): {(32, 0, 8), (16, 0, 8)},
    ("bwd_short", 16, 32): {(16, 0, 8), (16, 0, 4)},
    ("bwd_short", 16, 64): {(32, 0, 8), (16, 0, 8)},
    ("bwd_short", 32, 32): {(16, 0, 8)},
    ("fwd_long", 16, 32): {(128, 64, 8), (128, 64, 4), (128, 32, 8), (128, 32, 4)},
    ("fwd_long", 16, 64): {(128, 64, 8), (128, 32, 8), (128, 32, 4)},
    ("fwd_long", 16, 128): {(128, 32, 8)},
    ("fwd_long", 32, 32): {(128, 64, 8), (128, 32, 8), (128, 32, 4)},
    ("fwd_long", 32, 64): {(128, 32, 8)},
}


def _key(c):
    return c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N", 0), c.num_warps


def prune(kernel, configs, BLOCK_N, BLOCK_D, elem_bytes):
    """The configs that fit, in CONFIGS order, preferring query chunks no taller than the key tile
    (only the first under the interpreter, which times nothing, or with KERNELS_AUTOTUNE=0)."""
    fit = FITS.get((kernel, 8 * elem_bytes, max(32, BLOCK_D)), set())
    kept = [c for c in configs if _key(c) in fit]
    kept = [c for c in kept if kernel == "fwd_long" or c.kwargs["BLOCK_M"] <= BLOCK_N] or kept
    return kept[:1] if INTERPRETED or not AUTOTUNE else kept


def fits(kernel, D, dtype):
    return bool(FITS.get((kernel, 8 * dtype.itemsize, max(32, _pow2(D)))))


def _pruner(kernel):
    def early_prune(configs, named_args, **kwargs):
        return prune(kernel, configs, kwargs.get("BLOCK_N", 0), kwargs["BLOCK_D"], named_args["Q"].element_size())
    return {"early_config_prune": early_prune}


_fwd_short = triton.autotune(CONFIGS["fwd_short"], key=["BLOCK_N", "BLOCK_D"],
                             prune_configs_by=_pruner("fwd_short"))(_attn_fwd_short_kernel)
_fwd_long = triton.autotune(CONFIGS["fwd_long"], key=["N_BUCKET", "BLOCK_D"],
                            prune_configs_by=_pruner("fwd_long"))(_attn_fwd_long_kernel)
_bwd_short = triton.autotune(CONFIGS["bwd_short"], key=["BLOCK_N", "BLOCK_D"],
                             prune_configs_by=_pruner("bwd_short"))(_attn_bwd_short_kernel)


def _pow2(x):
    return max(16, triton.next_power_of_2(x))


def supported(N, D, dtype):
    """Shapes whose forward kernel has a config that fits; anything else goes to SDPA."""
    return (N >= 1 and 1 <= D <= 128 and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and fits("fwd_short" if N <= SHORT_N else "fwd_long", D, dtype))


def _dot_prec(dtype):
    # fp32: 3xTF32 tensor-core dots, about fp32 accuracy; "ieee" would be an FMA loop that spills.
    return "tf32x3" if dtype == torch.float32 else "tf32"  # fp16/bf16 ignore it


def fwd_grid(B, H, N):
    """Programs of the forward: B*H for short sequences, else B*H*blocks on grid axis 0."""
    return (B * H,) if N <= SHORT_N else (B * H * triton.cdiv(N, 128),)


def _fwd(q, k, v, o, lse, B, H, N, D, qs, os_):
    """qs, os_: (batch, head, seq) strides of the q/k/v views and of the o view."""
    args = (q, k, v, o, lse, *qs, *os_, H, N, D, D ** -0.5 * LOG2E.value)
    if N <= SHORT_N:
        _fwd_short[fwd_grid(B, H, N)](*args, BLOCK_N=_pow2(N), BLOCK_D=_pow2(D), DOT_PREC=_dot_prec(q.dtype))
    else:
        _fwd_long[fwd_grid(B, H, N)](*args, N_BUCKET=triton.next_power_of_2(N), BLOCK_D=_pow2(D),
                                     DOT_PREC=_dot_prec(q.dtype))


def _bwd_math(q, k, v, o, do, lse, dq, dk, dv):
    """The backward where the kernel does not fit (N > 128, D = 128, fp32 at D > 32: no training
    path here) in fp32 PyTorch from the saved LSE."""
    B, H, N, D = q.shape
    scale = D ** -0.5
    q, k, v, o, do = (x.float() for x in (q, k, v, o, do))
    p = torch.exp(q @ k.transpose(-1, -2) * scale - lse.view(B, H, N, 1))  # (B, H, N, N)
    dv.copy_(p.transpose(-1, -2) @ do)
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dq.copy_(ds @ k * scale)
    dk.copy_(ds.transpose(-1, -2) @ q * scale)


def _bwd(q, k, v, o, do, lse, dq, dk, dv, B, H, N, D, qs, os_):
    if N > SHORT_N or not fits("bwd_short", D, q.dtype):
        return _bwd_math(q, k, v, o, do, lse, dq, dk, dv)
    _bwd_short[(B * H,)](q, k, v, dq, dk, dv, o, do, lse, *qs, *os_, H, N, D, D ** -0.5,
                         BLOCK_N=_pow2(N), BLOCK_D=_pow2(D), DOT_PREC=_dot_prec(q.dtype))


# ----------------------------------------------------------------------------------------------
# Custom ops. (B, H, N, D) form: q, k, v are made contiguous so they share strides with dq/dk/dv.

@torch.library.custom_op("triton_kit::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = q.new_empty(q.shape)
    lse = q.new_empty((B * H, N), dtype=torch.float32)
    st = (H * N * D, N * D, D)
    _fwd(q, k, v, o, lse, B, H, N, D, st, st)
    return o, lse


@_attention_fwd.register_fake
def _(q, k, v):
    B, H, N, D = q.shape
    return q.new_empty(q.shape), q.new_empty((B * H, N), dtype=torch.float32)


@torch.library.custom_op("triton_kit::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    dq, dk, dv = q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)
    st = (H * N * D, N * D, D)
    _bwd(q, k, v, o, do, lse, dq, dk, dv, B, H, N, D, st, st)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero tensor for it


def _attention_backward(ctx, do, dlse):  # lse is a by-product, not differentiated
    if do is None:
        return None, None, None
    q, k, v, o, lse = ctx.saved_tensors
    return _attention_bwd(do.to(q.dtype), q, k, v, o, lse)


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# Packed form: qkv (B, N, 3, H, D) is read in place; q = qkv[:, :, 0] as a (B, H, N, D) view has
# strides (qkv.stride(0), qkv.stride(3), qkv.stride(1)); the output (B, N, H*D) likewise.

def _packed_views(qkv):
    B, N, _, H, D = qkv.shape
    qs = (qkv.stride(0), qkv.stride(3), qkv.stride(1))
    os_ = (N * H * D, D, H * D)
    return B, N, H, D, qs, os_


@torch.library.custom_op("triton_kit::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.contiguous()  # a no-op for the reshaped Linear output
    B, N, H, D, qs, os_ = _packed_views(qkv)
    o = qkv.new_empty((B, N, H * D))
    lse = qkv.new_empty((B * H, N), dtype=torch.float32)
    _fwd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], o, lse, B, H, N, D, qs, os_)
    return o, lse


@_attention_packed_fwd.register_fake
def _(qkv):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B * H, N), dtype=torch.float32)


@torch.library.custom_op("triton_kit::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor) -> torch.Tensor:
    qkv, do = qkv.contiguous(), do.contiguous()
    B, N, H, D, qs, os_ = _packed_views(qkv)
    dqkv = qkv.new_empty(qkv.shape)  # the three slices below cover every element
    math = N > SHORT_N or not fits("bwd_short", D, qkv.dtype)
    view = (lambda t, i: t[:, :, i].transpose(1, 2)) if math else (lambda t, i: t[:, :, i])
    if math:  # the PyTorch backward wants (B, H, N, D) views
        o4, do4 = o.view(B, N, H, D).transpose(1, 2), do.view(B, N, H, D).transpose(1, 2)
    else:
        o4, do4 = o, do
    _bwd(view(qkv, 0), view(qkv, 1), view(qkv, 2), o4, do4, lse,
         view(dqkv, 0), view(dqkv, 1), view(dqkv, 2), B, H, N, D, qs, os_)
    return dqkv


@_attention_packed_bwd.register_fake
def _(do, qkv, o, lse):
    return qkv.new_empty(qkv.shape)


def _attention_packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)
    ctx.set_materialize_grads(False)


def _attention_packed_backward(ctx, do, dlse):
    if do is None:
        return None
    qkv, o, lse = ctx.saved_tensors
    return _attention_packed_bwd(do.to(qkv.dtype), qkv, o, lse)


_attention_packed_fwd.register_autograd(_attention_packed_backward, setup_context=_attention_packed_setup)


# ----------------------------------------------------------------------------------------------
# Public API and dispatch.

# The interpreter replaces @triton.jit functions at decoration time, so this is the real test of
# "TRITON_INTERPRET=1 was set before triton was imported".
INTERPRETED = type(_attn_fwd_short_kernel).__name__ == "InterpretedFunction"


def use_triton(t):
    """Run the kernels on this tensor? CUDA: yes. CPU: only under the interpreter, and not for
    bf16 there (triton 3.8's interpreter computes bf16 tl.dot wrongly and rounds fp32 -> bf16
    by truncation)."""
    if t.is_cuda:
        return True
    return INTERPRETED and t.device.type == "cpu" and t.dtype != torch.bfloat16


reference_attention = sdpa  # the fallback (a module attribute, so tests can replace it)


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v for (B, H, N, D) tensors; same contract as SDPA's default call."""
    if (q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and use_triton(q) and q.numel() > 0 and supported(q.shape[2], q.shape[3], q.dtype)):
        return _attention_fwd(q, k, v)[0]
    return reference_attention(q, k, v)


def attention_packed(qkv):
    """Attention straight from the qkv projection: qkv (B, N, 3, H, D) -> (B, N, H*D)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_packed wants qkv of shape (B, N, 3, H, D), got {tuple(qkv.shape)}")
    B, N, _, H, D = qkv.shape
    if use_triton(qkv) and qkv.numel() > 0 and supported(N, D, qkv.dtype):
        return _attention_packed_fwd(qkv)[0]
    return sdpa_packed(qkv)
