"""Fused multi-head attention for short sequences, forward and backward, in Triton.

Imports torch, triton and kernels/reference.py (its PyTorch fallback) only.

Math, for one (batch, head), non-causal, scale = D**-0.5:
    S = Q K^T * scale        P = softmax(S) (per row)        O = P V
    lse = logsumexp(S) per row, saved by the forward so the backward can rebuild P = exp(S - lse)
    dV = P^T dO    dP = dO V^T    delta = rowsum(dO * O)    dS = P * (dP - delta)
    dQ = dS K * scale              dK = dS^T Q * scale         (FlashAttention-2's backward)

Built for the shapes that run: N = 65-67 for the 32px students (trained), N = 197 for the 224px
teacher (forward only, under no_grad).
- N <= 80: one program per (batch, head) holds every key, loaded once, as a main block of a
  power of two and a tail block of 16 (`short_tiles`: N = 67 is 64 + 16 = 80 keys, not 128);
  query rows use the same split, the main block in chunks of BLOCK_M. The forward needs
  no online softmax (every key is here) and writes O and LSE. The backward is one kernel: per
  query chunk delta, P, dV += P^T dO, dS, dQ (stored, complete) and dK += dS^T Q, for both key
  blocks; dK and dV stay in registers until the end. No atomics, every input read once.
- N > 80 (forward only): a head's query rows in blocks of BLOCK_M, the last block only as tall
  as its rows need (N = 197: 3 x 64 + 16 rows); each sweeps the keys in chunks with an online
  softmax, the last chunk as narrow as its keys need (3 x 64 + 16 keys). A 1-D grid with the
  block index varying fastest, so a head's blocks run side by side and share K/V through L2 (and
  the grid is not bound by the 65,535 limit of axes 1-2). Its backward is SDPA's.
Offsets are int64 (B*H*N*D passes 2**31 at large batches). No autotuning: one pinned config per
(kernel, dtype, head size; N for the students) for sm_90 (CONFIGS below, `choose`), so every
rank and restart runs the same code; sm_80 and sm_89 run the same configs where they do not
spill there (SPILLS). Where no config serves (an fp32 forward at D >= 64; a backward at N > 80,
at D = 128 or in fp32; a spilling launch on sm_80 / sm_89; any other GPU) a call goes to SDPA,
forward and fused backward. Each kernel runs only after its first-use self-check passed
(kernels/verify.py) at the call's shape and dtype.

Dtypes: fp16 / bf16 in, fp32 accumulation, output in the input dtype; fp32 is accepted (its dots
run as 3xTF32, about fp32 accuracy). Any N >= 1 (ragged sizes are masked), head dim up to 128.

Public API:
    attention(q, k, v)     drop-in for F.scaled_dot_product_attention(q, k, v), (B, H, N, D)
    attention_packed(qkv)  qkv: (B, N, 3, H, D), the qkv Linear's output reshaped; returns
                           (B, N, H*D) for the output projection, with no transposes or copies
                           in either direction.
Both run autograd Functions around operators registered with kernels/launch.py's `triton_op`:
eager calls launch straight from the operators' bodies, torch.compile(fullgraph=True) traces the
operators and sees the Triton launches. CUDA tensors run the kernels; CPU tensors run them only
under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported), else fall back
to SDPA.
"""
import functools

import torch
import triton
import triton.language as tl

from . import verify
from .launch import INTERPRETED, launcher, run_eager, triton_op, via_op
from .reference import sdpa, sdpa_packed
from .verify import constant_when_traced

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the kernels use exp2
LN2 = tl.constexpr(0.6931471805599453)    # ln(x) = log2(x) * LN2
SHORT_N = 80  # sequences up to this many tokens: one-program-per-head kernels (64 + 16 keys)
# A loop with a runtime bound is a while loop under the interpreter (triton 3.6's calls int() on a
# one-element array for a range bound, which numpy >= 2.4 refuses) and a for loop when compiled
# (its dots become async wgmma that overlap the next step; a while loop compiles to synchronous
# ones).
WHILE_LOOPS = tl.constexpr(INTERPRETED)


@triton.jit
def _fwd_rows(Q, O, LSE, stride_qn, stride_on, offs_m, offs_d, mask_d, N, qk_scale,
              k, v, mask_n, kt, vt, mask_t, HAS_TAIL: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk of query rows (offs_m) against every key of the head: the main key block (k, v),
    then the tail block (kt, vt) if any. All keys are here, so no online softmax. Q, O, LSE
    point at the head."""
    mask_m = offs_m < N
    row_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (rows, BLOCK_N), log2 units
    s = tl.where(mask_n[None, :], s, float("-inf"))  # padded keys get no weight
    m = tl.max(s, 1)
    if HAS_TAIL:
        st = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale  # (rows, BLOCK_T)
        st = tl.where(mask_t[None, :], st, float("-inf"))
        m = tl.maximum(m, tl.max(st, 1))
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)  # (rows, BLOCK_D)
    if HAS_TAIL:
        pt = tl.exp2(st - m[:, None])
        l += tl.sum(pt, 1)
        acc = tl.dot(pt.to(vt.dtype), vt, acc, input_precision=DOT_PREC)
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :],
             (acc / l[:, None]).to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + offs_m, (m + tl.log2(l)) * LN2, mask=mask_m)


@triton.jit
def _attn_fwd_short_kernel(
    Q, K, V,                # (B, H, N, D) views with unit last stride; q, k, v share strides
    O,                      # (B, H, N, D) view of the output
    LSE,                    # (B*H, N) fp32, natural-log row logsumexp of S
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, qk_scale,      # qk_scale = D**-0.5 * log2(e)
    BLOCK_M: tl.constexpr,  # query rows per chunk of the main block
    BLOCK_N: tl.constexpr,  # the main block: keys (and rows) 0 .. BLOCK_N-1
    BLOCK_T: tl.constexpr,  # the tail block: keys (and rows) BLOCK_N .. BLOCK_N+BLOCK_T-1, or 0
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # one program per (batch, head)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh
    # The head's base pointers (int64 offsets), so the tile offsets below are int32: fewer
    # registers.
    Q, K, V, O, LSE = Q + q_base, K + q_base, V + q_base, O + o_base, LSE + pid_bh * N

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    kv_offs = offs_n[:, None] * stride_qn + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D), read once
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    if BLOCK_T > 0:
        offs_t = BLOCK_N + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        kt_offs = offs_t[:, None] * stride_qn + offs_d[None, :]
        kt_mask = mask_t[:, None] & mask_d[None, :]
        kt = tl.load(K + kt_offs, mask=kt_mask, other=0.0)  # (BLOCK_T, BLOCK_D)
        vt = tl.load(V + kt_offs, mask=kt_mask, other=0.0)
    else:
        kt, vt, mask_t = k, v, mask_n  # unused

    for start_m in range(0, BLOCK_N, BLOCK_M):
        _fwd_rows(Q, O, LSE, stride_qn, stride_on, start_m + tl.arange(0, BLOCK_M),
                  offs_d, mask_d, N, qk_scale, k, v, mask_n, kt, vt, mask_t, BLOCK_T > 0, DOT_PREC)
    if BLOCK_T > 0:  # the tail rows, one chunk of BLOCK_T
        _fwd_rows(Q, O, LSE, stride_qn, stride_on, BLOCK_N + tl.arange(0, BLOCK_T),
                  offs_d, mask_d, N, qk_scale, k, v, mask_n, kt, vt, mask_t, True, DOT_PREC)


@triton.jit
def _online_step(q, K, V, stride_qn, offs_n, offs_d, mask_d, N, qk_scale, m_i, l_i, acc,
                 MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk of keys (offs_n) into the running softmax (m_i, l_i, acc) of the rows in q."""
    kv_offs = offs_n[:, None] * stride_qn + offs_d[None, :]
    if MASKED:
        mask_n = offs_n < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
    else:
        kv_mask = mask_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (keys, BLOCK_D)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (rows, keys), log2 units
    if MASKED:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every chunk has a real key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_long_rows(Q, K, V, O, LSE, stride_qn, stride_on, row0, N, D, qk_scale,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr, KEY_TAIL: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Query rows row0 .. row0+ROWS-1 against the whole key range: full chunks of BLOCK_N keys
    (unmasked), then the last N % BLOCK_N keys as one masked chunk of KEY_TAIL. Q ... LSE point
    at the head."""
    offs_m = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    row_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)                # running row sum of exp2
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    if WHILE_LOOPS:  # the interpreter: the same steps, see WHILE_LOOPS
        start_n = 0
        while start_n < n_full:
            m_i, l_i, acc = _online_step(q, K, V, stride_qn, start_n + tl.arange(0, BLOCK_N),
                                         offs_d, mask_d, N, qk_scale, m_i, l_i, acc, False,
                                         DOT_PREC)
            start_n += BLOCK_N
    else:
        for start_n in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _online_step(q, K, V, stride_qn, start_n + tl.arange(0, BLOCK_N),
                                         offs_d, mask_d, N, qk_scale, m_i, l_i, acc, False,
                                         DOT_PREC)
    if KEY_TAIL > 0:
        m_i, l_i, acc = _online_step(q, K, V, stride_qn, n_full + tl.arange(0, KEY_TAIL), offs_d,
                                     mask_d, N, qk_scale, m_i, l_i, acc, True, DOT_PREC)
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :],
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=mask_m)


@triton.jit
def _attn_fwd_long_kernel(
    Q, K, V, O, LSE,        # as in _attn_fwd_short_kernel
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, qk_scale,
    BLOCK_M: tl.constexpr,   # query rows per program
    ROW_TAIL: tl.constexpr,  # rows of the head's last program (N % BLOCK_M); 0: BLOCK_M as the rest
    BLOCK_N: tl.constexpr,   # keys per chunk of the sweep
    KEY_TAIL: tl.constexpr,  # keys of the last chunk (covers N % BLOCK_N); 0 when BLOCK_N divides N
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    n_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid, the query block varying fastest
    pid_bh = pid // n_blocks
    pid_m = pid % n_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh
    args = (Q + q_base, K + q_base, V + q_base, O + o_base, LSE + pid_bh * N, stride_qn, stride_on,
            pid_m * BLOCK_M, N, D, qk_scale)  # the head's base pointers: int32 tile offsets
    if ROW_TAIL > 0:
        if pid_m == n_blocks - 1:  # the head's short last block: fewer padded rows
            _fwd_long_rows(*args, ROW_TAIL, BLOCK_N, KEY_TAIL, BLOCK_D, DOT_PREC)
        else:
            _fwd_long_rows(*args, BLOCK_M, BLOCK_N, KEY_TAIL, BLOCK_D, DOT_PREC)
    else:
        _fwd_long_rows(*args, BLOCK_M, BLOCK_N, KEY_TAIL, BLOCK_D, DOT_PREC)


@triton.jit
def _bwd_keys(q, do, delta, lse2, k, v, mask_n, dk, dv, qk_scale, DOT_PREC: tl.constexpr):
    """One query chunk against one key block: adds to dK, dV of the block; returns dS K
    (unscaled)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (rows, keys)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    p = tl.where(mask_n[None, :], p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (rows, keys)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk = tl.dot(tl.trans(ds), q, dk, input_precision=DOT_PREC)
    return tl.dot(ds, k, input_precision=DOT_PREC), dk, dv


@triton.jit
def _bwd_rows(Q, DQ, O, DO, LSE, stride_qn, stride_on, offs_m, offs_d, mask_d, N,
              sm_scale, k, v, mask_n, dk, dv, kt, vt, mask_t, dkt, dvt, HAS_TAIL: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One chunk of query rows (offs_m): dQ of the chunk, complete, stored; dK, dV of the main and
    the tail key block accumulated and returned."""
    mask_m = offs_m < N
    row_mask = mask_m[:, None] & mask_d[None, :]
    q_offs = offs_m[:, None] * stride_qn + offs_d[None, :]  # Q, O, ... point at the head
    o_offs = offs_m[:, None] * stride_on + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=row_mask, other=0.0)    # (rows, BLOCK_D)
    do = tl.load(DO + o_offs, mask=row_mask, other=0.0)
    o = tl.load(O + o_offs, mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (rows,) rowsum(dO * O), once
    # lse = +inf on padded query rows makes their P row exactly 0.
    lse2 = tl.load(LSE + offs_m, mask=mask_m, other=float("inf")) * LOG2E
    qk_scale = sm_scale * LOG2E
    dq, dk, dv = _bwd_keys(q, do, delta, lse2, k, v, mask_n, dk, dv, qk_scale, DOT_PREC)
    if HAS_TAIL:
        dqt, dkt, dvt = _bwd_keys(q, do, delta, lse2, kt, vt, mask_t, dkt, dvt, qk_scale, DOT_PREC)
        dq += dqt
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)
    return dk, dv, dkt, dvt


@triton.jit
def _attn_bwd_short_kernel(
    Q, K, V, DQ, DK, DV,    # (B, H, N, D) views sharing the input strides
    O, DO,                  # (B, H, N, D) views sharing the output strides
    LSE,                    # (B*H, N) fp32
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,  # as in the forward
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # one program per (batch, head): dQ, dK, dV complete
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh
    # The head's base pointers (int64 offsets), so the tile offsets below are int32: fewer
    # registers.
    Q, K, V, DQ, DK, DV = Q + q_base, K + q_base, V + q_base, DQ + q_base, DK + q_base, DV + q_base
    O, DO, LSE = O + o_base, DO + o_base, LSE + pid_bh * N

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    kv_offs = offs_n[:, None] * stride_qn + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if BLOCK_T > 0:
        offs_t = BLOCK_N + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        kt_offs = offs_t[:, None] * stride_qn + offs_d[None, :]
        kt_mask = mask_t[:, None] & mask_d[None, :]
        kt = tl.load(K + kt_offs, mask=kt_mask, other=0.0)  # (BLOCK_T, BLOCK_D)
        vt = tl.load(V + kt_offs, mask=kt_mask, other=0.0)
        dkt = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        dvt = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    else:
        kt, vt, mask_t, dkt, dvt = k, v, mask_n, dk, dv  # unused

    for start_m in range(0, BLOCK_N, BLOCK_M):  # each query row is visited once
        dk, dv, dkt, dvt = _bwd_rows(Q, DQ, O, DO, LSE, stride_qn, stride_on,
                                     start_m + tl.arange(0, BLOCK_M), offs_d, mask_d, N, sm_scale,
                                     k, v, mask_n, dk, dv, kt, vt, mask_t, dkt, dvt, BLOCK_T > 0,
                                     DOT_PREC)
    if BLOCK_T > 0:  # the tail rows, one chunk of BLOCK_T
        dk, dv, dkt, dvt = _bwd_rows(Q, DQ, O, DO, LSE, stride_qn, stride_on,
                                     BLOCK_N + tl.arange(0, BLOCK_T), offs_d, mask_d, N, sm_scale,
                                     k, v, mask_n, dk, dv, kt, vt, mask_t, dkt, dvt, True, DOT_PREC)
        tl.store(DK + kt_offs, (dkt * sm_scale).to(DK.dtype.element_ty), mask=kt_mask)
        tl.store(DV + kt_offs, dvt.to(DV.dtype.element_ty), mask=kt_mask)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Tiles and configs, pinned: no autotuning. The key and row tiles follow from N (`short_tiles`,
# `_tail`); BLOCK_M, the long kernel's BLOCK_N and the warps come from CONFIGS, one
# entry per (kernel, input bits, BLOCK_D) and, where the students' shapes need their own, per N
# too; chosen for sm_90 by counting (`python -m kernels.bench --bytes`: padded vs useful work) and
# by ptxas (`--compile-check`: no spills with triton 3.6 and 3.8, CTAs per SM). So the launch is
# a pure function of (capability, N, D, dtype): every rank and every restart runs the same code,
# bit for bit. Unchecked GPUs (CHECKED), spilling launches (SPILLS) and the shapes with no entry
# take SDPA, forward and backward.

KERNELS = ("fwd_short", "bwd_short", "fwd_long")
STUDENT_N = (65, 66, 67)  # vit / deit / cdeit at 32 px, patch 4: 64 patches + 1-3 tokens
TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])
# (kernel, input bits, BLOCK_D, N or None for any other N) -> (BLOCK_M, BLOCK_N or 0 (the short
# kernels' key tile), warps, pipeline stages, register cap per thread or 0 for ptxas's).
# Registers: ptxas's for sm_90 at the entry's worst N, triton 3.8 / 3.6; no entry spills in either.
CONFIGS = {
    ("fwd_short", 16, 32, None): (64, 0, 4, 2, 0),    # <= 128 / 120 regs: >= 4 CTAs per SM
    # 128 regs, no spill: 4 CTAs (uncapped 168 / 194: 3 / 2)
    ("fwd_short", 16, 64, None): (16, 0, 4, 2, 128),
    ("fwd_short", 16, 128, None): (16, 0, 8, 2, 0),   # <= 221 / 210 regs: >= 1 CTA (4 warps spill)
    # <= 237 / 234 regs: 2 CTAs; fp32 at D >= 64: every config spills
    ("fwd_short", 32, 32, None): (64, 0, 4, 2, 0),
    ("bwd_short", 16, 32, None): (16, 0, 4, 1, 0),    # <= 226 / 242 regs: 2 CTAs
    # <= 230 / 252 regs: 1 CTA; 4 warps spill at N = 48 or 80
    ("bwd_short", 16, 64, None): (16, 0, 8, 1, 0),
    # 255 regs, no spill: 2 CTAs (3.8)
    **{("bwd_short", 16, 64, n): (32, 0, 4, 1, 0) for n in STUDENT_N},
    ("fwd_long", 16, 32, None): (64, 32, 4, 2, 0),    # 96 regs: 5 CTAs
    # <= 168 / 190 regs: >= 2 CTAs; N = 197: 3 (64 keys: 240 regs)
    ("fwd_long", 16, 64, None): (64, 32, 4, 2, 0),
    ("fwd_long", 16, 128, None): (64, 32, 4, 2, 0),   # <= 205 / 254 regs: 2 CTAs
    ("fwd_long", 32, 32, None): (64, 32, 4, 2, 0),    # <= 190 / 199 regs: 2 CTAs (168 cap: spills)
}
if TRITON < (3, 7):  # triton 3.6 spills every 4-warp students' backward (12-132 B at 255 regs):
    # 8 warps, no spill, 1 CTA per SM (the same 8 warps per SM as 2 CTAs of 4)
    CONFIGS.update({("bwd_short", 16, 64, n): (16, 0, 8, 1, 0) for n in STUDENT_N})


# The compute capabilities CONFIGS is compiled for by `python -m kernels.bench --compile-check`:
# sm_9x (H100 / H200), sm_80 (A100), sm_89 (L40S / RTX 4090). Other GPUs take SDPA. CONFIGS is
# chosen for sm_90; on sm_80 / sm_89 the launches that spill there, (kernel, input bits, BLOCK_D,
# tiles) with tiles as `tiles_of` gives them, take SDPA (a spill costs speed, not correctness;
# the self-check in kernels/verify.py guards correctness on every GPU).
CHECKED = {(8, 0): "sm_80", (8, 9): "sm_89"}  # plus every (9, x)
_SPILL_BOTH = {  # (kernel, input bits, BLOCK_D, tiles) spilling on sm_80 and sm_89 (triton 3.8)
    ("fwd_short", 16, 64, (16, 64, 16)),  # N = 65-80 (the students' forward): 32 B
    ("fwd_short", 32, 32, (64, 64, 0)), ("fwd_short", 32, 32, (64, 64, 16)),  # N = 49-80
    ("bwd_short", 16, 64, (32, 64, 16)),  # the students' backward: 368-412 B
    ("fwd_long", 16, 128, (64, 0, 32, 16)), ("fwd_long", 16, 128, (64, 16, 32, 16)),
    ("fwd_long", 32, 32, (64, 0, 32, 16)), ("fwd_long", 32, 32, (64, 16, 32, 16)),
}
SPILLS = {
    (8, 0): _SPILL_BOTH | {("fwd_long", 16, 32, (64, 16, 32, 16))},
    (8, 9): _SPILL_BOTH | {("fwd_long", 32, 32, (64, 32, 32, 0))},
}


def config_key(kernel, bits, D, N):
    """The CONFIGS key serving `kernel` at (input bits, D, N): its own N's entry or the default;
    None when there is neither."""
    for key in ((kernel, bits, _pow2(D), N), (kernel, bits, _pow2(D), None)):
        if key in CONFIGS:
            return key
    return None


def tiles_of(kernel, consts):
    """The tile sizes of a launch: (BLOCK_M, BLOCK_N, BLOCK_T), or for the long kernel (BLOCK_M,
    ROW_TAIL, BLOCK_N, KEY_TAIL)."""
    names = ("BLOCK_M", "ROW_TAIL", "BLOCK_N", "KEY_TAIL") if kernel == "fwd_long" \
        else ("BLOCK_M", "BLOCK_N", "BLOCK_T")
    return tuple(consts[n] for n in names)


def config_entry(kernel, bits, D, N):
    """The pinned CONFIGS entry of `kernel` at (input bits, D, N), or None."""
    key = config_key(kernel, bits, D, N)
    return CONFIGS[key] if key else None


def _pow2(x):
    return max(16, triton.next_power_of_2(x))


def short_tiles(N):
    """(BLOCK_N, BLOCK_T) for N <= SHORT_N: a main block of BLOCK_N keys (a power of two) and a
    tail block of BLOCK_T (a power of two >= 16, the dots' smallest reduction; 0 for none) covering
    N with the least padding; rows use the same split. N = 67: 64 + 16 (80, not 128)."""
    main = 16
    while main * 2 <= min(N, SHORT_N):
        main *= 2
    tail = _tail(N - main, main)
    return (main, tail) if tail or N <= main else (2 * main, 0)



def _tail(rem, block):
    """The power-of-two block (>= 16) for the last `rem` rows or keys, 0 when rem is 0 or the
    tail would be as large as a full block."""
    t = _pow2(rem) if rem > 0 else 0
    return t if t < block else 0


def _dot_prec(dtype):
    # fp32: 3xTF32 tensor-core dots, about fp32 accuracy; "ieee" would be an FMA loop that spills.
    return "tf32x3" if dtype == torch.float32 else "tf32"  # fp16/bf16 ignore it


@constant_when_traced
def choose(kernel, capability, N, D, dtype):
    """The launch of `kernel` at (N, D, dtype) on a GPU of this compute capability (None: the
    interpreter, which runs the sm_90 configs): (constexprs, launch options), or None where SDPA
    serves. A pure function of its arguments and the pinned CONFIGS. (int(): a traced symbolic
    size specializes here, as the kernel's tiles do.)"""
    return _choose(kernel, capability, int(N), int(D), dtype)


@functools.cache
def _choose(kernel, capability, N, D, dtype):
    if capability is not None and capability[0] != 9 and capability not in CHECKED:
        return None
    key = config_key(kernel, 8 * dtype.itemsize, D, N)
    entry = CONFIGS[key] if key else None
    short = kernel != "fwd_long"
    if entry is None or not 1 <= D <= 128 or N < 1 or short != (N <= SHORT_N):
        return None
    block_m, block_n, warps, stages, maxnreg = entry
    consts = {"BLOCK_D": _pow2(D), "DOT_PREC": _dot_prec(dtype)}
    if kernel == "fwd_long":
        # the last keys: a narrower chunk, or a masked chunk of block_n
        tail = _tail(N % block_n, block_n) or (block_n if N % block_n else 0)
        consts.update(BLOCK_M=block_m, ROW_TAIL=_tail(N % block_m, block_m), BLOCK_N=block_n,
                      KEY_TAIL=tail)
    else:
        main, tail = short_tiles(N)
        consts.update(BLOCK_M=min(block_m, main), BLOCK_N=main, BLOCK_T=tail)
    if spills(kernel, capability, 8 * dtype.itemsize, consts):
        return None
    opts = {"num_warps": warps, "num_stages": stages}
    return consts, {**opts, "maxnreg": maxnreg} if maxnreg else opts


def spills(kernel, capability, bits, consts):
    """Does this launch spill registers on this GPU (SPILLS)?"""
    return (kernel, bits, consts["BLOCK_D"], tiles_of(kernel, consts)) in SPILLS.get(capability, ())


def why_sdpa(kernel, capability, N, D, dtype):
    """Why `choose` sends `kernel` at (N, D, dtype) to SDPA on this GPU, in a few words."""
    if capability is not None and capability[0] != 9 and capability not in CHECKED:
        return f"sm_{capability[0]}{capability[1]}: no kernel config checked for this GPU"
    sm90 = _choose(kernel, None, N, D, dtype)
    if sm90 is not None and spills(kernel, capability, 8 * dtype.itemsize, sm90[0]):
        return f"its config spills registers on {CHECKED[capability]}"
    return f"no kernel config for N={N}, D={D}, {str(dtype).removeprefix('torch.')}"


_CAPABILITIES = {}  # device index -> (major, minor)


@constant_when_traced
def _device_capability(index):
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]


def capability(t):
    """The compute capability of t's GPU; None for CPU tensors (the interpreter)."""
    if not t.is_cuda:
        return None
    index = t.device.index
    return _device_capability(index if index is not None else torch.cuda.current_device())


def forward_kernel(N):
    return "fwd_short" if N <= SHORT_N else "fwd_long"


def fwd_grid(B, H, N, BLOCK_M):
    """Programs of the forward: B*H for short sequences, else B*H*blocks on grid axis 0."""
    return (B * H,) if N <= SHORT_N else (B * H * triton.cdiv(N, BLOCK_M),)


def _fwd(q, k, v, o, lse, B, H, N, D, qs, os_):
    """qs, os_: (batch, head, seq) strides of the q/k/v views and of the o view."""
    kernel = forward_kernel(N)
    consts, opts = choose(kernel, capability(q), N, D, q.dtype)
    fn = _attn_fwd_short_kernel if kernel == "fwd_short" else _attn_fwd_long_kernel
    launcher(fn)[fwd_grid(B, H, N, consts["BLOCK_M"])](q, k, v, o, lse, *qs, *os_, H, N, D,
                                                       D ** -0.5 * LOG2E.value, **consts, **opts)


def _bwd(q, k, v, o, do, lse, dq, dk, dv, B, H, N, D, qs, os_):
    consts, opts = choose("bwd_short", capability(q), N, D, q.dtype)
    launcher(_attn_bwd_short_kernel)[(B * H,)](q, k, v, dq, dk, dv, o, do, lse, *qs, *os_, H, N, D,
                                               D ** -0.5, **consts, **opts)


def _sdpa_grads(fn, inputs, do):
    """Gradients of fn(*inputs) by SDPA's own backward (fused: no N x N tensor on a GPU), for the
    autograd Functions called directly at a shape whose backward has no kernel (`attention` and
    `attention_packed` send such calls to SDPA from the start, without this recomputation)."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_() for x in inputs]
        return torch.autograd.grad(fn(*xs), xs, do)


# ----------------------------------------------------------------------------------------------
# Operators (`triton_op`, kernels/launch.py) and the autograd Functions around them. (B, H, N, D)
# form: q, k, v are made contiguous so they share strides with dq/dk/dv.

def _attention_fwd_fake(q, k, v):
    B, H, N, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B * H, N), dtype=torch.float32)


def _attention_fwd_impl(q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = q.new_empty(q.shape)
    lse = q.new_empty((B * H, N), dtype=torch.float32)
    st = (H * N * D, N * D, D)
    _fwd(q, k, v, o, lse, B, H, N, D, st, st)
    return o, lse


def _attention_bwd_fake(do, q, k, v, o, lse):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        o: torch.Tensor,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    dq, dk, dv = q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)
    st = (H * N * D, N * D, D)
    _bwd(q, k, v, o, do, lse, dq, dk, dv, B, H, N, D, st, st)
    return dq, dk, dv


_attention_fwd = triton_op("triton_kit::attention_fwd", _attention_fwd_fake)(_attention_fwd_impl)
_attention_bwd = triton_op("triton_kit::attention_bwd", _attention_bwd_fake)(_attention_bwd_impl)


class _Attention(torch.autograd.Function):
    """Autograd around the two operators; eager calls run their bodies (`via_op`). lse is saved,
    not returned: it gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = via_op(_attention_fwd, _attention_fwd_impl)(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if choose("bwd_short", capability(q), q.shape[2], q.shape[3], q.dtype) is None:
            return tuple(_sdpa_grads(reference_attention, (q, k, v), do))
        return via_op(_attention_bwd, _attention_bwd_impl)(do.to(q.dtype), q, k, v, o, lse)


# Packed form: qkv (B, N, 3, H, D) is read in place; q = qkv[:, :, 0] as a (B, H, N, D) view has
# strides (qkv.stride(0), qkv.stride(3), qkv.stride(1)); the output (B, N, H*D) likewise.

def _packed_views(qkv):
    B, N, _, H, D = qkv.shape
    qs = (qkv.stride(0), qkv.stride(3), qkv.stride(1))
    os_ = (N * H * D, D, H * D)
    return B, N, H, D, qs, os_


def _packed_fwd_fake(qkv):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B * H, N), dtype=torch.float32)


def _packed_fwd_impl(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.contiguous()  # a no-op for the reshaped Linear output
    B, N, H, D, qs, os_ = _packed_views(qkv)
    o = qkv.new_empty((B, N, H * D))
    lse = qkv.new_empty((B * H, N), dtype=torch.float32)
    _fwd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], o, lse, B, H, N, D, qs, os_)
    return o, lse


def _packed_bwd_fake(do, qkv, o, lse):
    return qkv.new_empty(qkv.shape)


def _packed_bwd_impl(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor) -> torch.Tensor:
    qkv, do = qkv.contiguous(), do.contiguous()
    B, N, H, D, qs, os_ = _packed_views(qkv)
    dqkv = qkv.new_empty(qkv.shape)  # the three slices below cover every element
    _bwd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], o, do, lse,
         dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2],
         B, H, N, D, qs, os_)
    return dqkv


_attention_packed_fwd = triton_op("triton_kit::attention_packed_fwd",
                                  _packed_fwd_fake)(_packed_fwd_impl)
_attention_packed_bwd = triton_op("triton_kit::attention_packed_bwd",
                                  _packed_bwd_fake)(_packed_bwd_impl)


class _AttentionPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv):
        o, lse = via_op(_attention_packed_fwd, _packed_fwd_impl)(qkv)
        ctx.save_for_backward(qkv, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        if choose("bwd_short", capability(qkv), qkv.shape[1], qkv.shape[4], qkv.dtype) is None:
            return _sdpa_grads(reference_packed, (qkv,), do)[0]
        return via_op(_attention_packed_bwd, _packed_bwd_impl)(do.to(qkv.dtype), qkv, o, lse)


# ----------------------------------------------------------------------------------------------
# Public API and dispatch.

def use_triton(t):
    """Run the kernels on this tensor? CUDA: yes. CPU: only under the interpreter, and not for
    bf16 there (triton 3.8's interpreter computes bf16 tl.dot wrongly and rounds fp32 -> bf16
    by truncation)."""
    if t.is_cuda:
        return True
    return INTERPRETED and t.device.type == "cpu" and t.dtype != torch.bfloat16


# The fallbacks (module attributes, so tests can replace them): SDPA forward and fused backward.
reference_attention = sdpa
reference_packed = sdpa_packed


def _needs_grad(*xs):
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _no_config(x, N, D, needs_grad):
    """(kernel name, why) when no pinned config serves this call's forward, or its backward when a
    gradient will be asked for (then SDPA runs both: its backward is fused, never N x N); else
    None."""
    cap = capability(x)
    for kernel, name in ((forward_kernel(N), "attention forward"),
                         *((("bwd_short", "attention backward"),) if needs_grad else ())):
        if choose(kernel, cap, N, D, x.dtype) is None:
            return name, why_sdpa(kernel, cap, N, D, x.dtype)
    return None


def fits(x, N, D, needs_grad):
    """Does a pinned config serve this call (see `_no_config`)?"""
    return _no_config(x, N, D, needs_grad) is None


def _route(x, shape, N, D, needs_grad):
    """Do the kernels serve this call? A config must (`_no_config`; on a GPU the start line says
    why not), and each kernel must have passed its self-check (kernels/verify.py) at this shape
    and dtype."""
    missing = _no_config(x, N, D, needs_grad)
    if missing is not None:
        if x.is_cuda:
            verify.note(missing[0], shape, x.dtype, missing[1])
        return False
    return (verify.allowed("attention forward", shape, x.dtype, x.device)
            and (not needs_grad or verify.allowed("attention backward", shape, x.dtype, x.device)))


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v for (B, H, N, D) tensors; same contract as SDPA's default call."""
    if (q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.dtype in DTYPES and use_triton(q) and q.numel() > 0):
        _, H, N, D = (int(d) for d in q.shape)
        if _route(q, ("B", H, N, D), N, D, _needs_grad(q, k, v)):
            return _Attention.apply(q, k, v)
    return reference_attention(q, k, v)


def attention_packed(qkv):
    """Attention straight from the qkv projection: qkv (B, N, 3, H, D) -> (B, N, H*D)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("attention_packed wants qkv of shape (B, N, 3, H, D), "
                         f"got {tuple(qkv.shape)}")
    if qkv.dtype in DTYPES and use_triton(qkv) and qkv.numel() > 0:
        _, N, _, H, D = (int(d) for d in qkv.shape)
        if _route(qkv, ("B", N, 3, H, D), N, D, _needs_grad(qkv)):
            return _AttentionPacked.apply(qkv)
    return reference_packed(qkv)


# ----------------------------------------------------------------------------------------------
# The self-check (kernels/verify.py): our kernels against SDPA on random inputs, batch 2.

def _check_inputs(shape, dtype, device):
    """qkv (2, N, 3, H, D) and an output gradient (2, N, H*D) for `shape` (packed or not)."""
    N, H, D = (shape[1], shape[3], shape[4]) if len(shape) == 5 else (shape[2], shape[1], shape[3])
    g = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(2, N, 3, H, D, generator=g, device=device).to(dtype)
    go = torch.randn(2, N, H * D, generator=g, device=device).to(dtype)
    return qkv, go


def _ours(qkv, go, packed):
    """Our forward (and backward with `go`) on qkv through the operators' bodies, in the packed
    layout: o (B, N, H*D), dqkv (B, N, 3, H, D) or None."""
    B, N, _, H, D = qkv.shape
    if packed:
        o, lse = run_eager(_packed_fwd_impl, (qkv,))
        return o, go is not None and run_eager(_packed_bwd_impl, (go, qkv, o, lse))
    q, k, v = (qkv[:, :, i].transpose(1, 2).contiguous() for i in range(3))  # 3 x (B, H, N, D)
    o, lse = run_eager(_attention_fwd_impl, (q, k, v))
    flat = o.transpose(1, 2).reshape(B, N, H * D)
    if go is None:
        return flat, None
    do = go.view(B, N, H, D).transpose(1, 2)
    grads = run_eager(_attention_bwd_impl, (do, q, k, v, o, lse))
    return flat, torch.stack([g.transpose(1, 2) for g in grads], 2)


def _sdpa_out_and_grad(qkv, go):
    with torch.enable_grad():
        x = qkv.detach().requires_grad_()
        o = sdpa_packed(x)
        return o.detach(), torch.autograd.grad(o, x, go)[0]


def _check(kernel, shape, dtype, device):
    qkv, go = _check_inputs(shape, dtype, device)
    backward = kernel == "attention backward"
    ours, dqkv = _ours(qkv, go if backward else None, len(shape) == 5)
    ref, ref_grad = _sdpa_out_and_grad(qkv, go)
    truth, truth_grad = _sdpa_out_and_grad(qkv.double(), go.double())
    return {"dqkv": (dqkv, ref_grad, truth_grad)} if backward else {"o": (ours, ref, truth)}


verify.register("attention forward", functools.partial(_check, "attention forward"))
verify.register("attention backward", functools.partial(_check, "attention backward"))
