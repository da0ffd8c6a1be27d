"""Fused multi-head attention for short sequences, forward and backward, in Triton.

Standalone: this file imports only torch and triton, so it can be copied into another project.

Math, for one (batch, head), non-causal, scale = D**-0.5:
    S = Q K^T * scale        P = softmax(S) (per row)        O = P V
    lse = logsumexp(S) per row, saved by the forward so the backward can rebuild P = exp(S - lse)
    dV = P^T dO    dP = dO V^T    delta = rowsum(dO * O)    dS = P * (dP - delta)
    dQ = dS K * scale              dK = dS^T Q * scale         (FlashAttention-2's backward)

Design for short sequences (66-67 tokens for the 32px students, 197 for the 224px teacher):
each forward program owns one query block of one (batch, head) and sweeps that head's whole key
range itself (online softmax over key chunks of 32), so no work is split across programs. The
backward has two kernels, neither with atomics: one program per query block computes dQ over the
whole key range (like the forward), one program per key block loops over all query blocks for dK
and dV. delta = rowsum(dO * O) is recomputed in both from dO and O (cheaper than a third launch
at these sizes). Softmax uses exp2 with log2(e) folded into the scale.

Dtypes: fp16 / bf16 in, fp32 accumulation, output in the input dtype; fp32 is accepted (its dots
run as 3xTF32, about fp32 accuracy). Any N >= 1 (ragged sizes are masked), head dim up to 128.

Public API:
    attention(q, k, v)     drop-in for F.scaled_dot_product_attention(q, k, v), (B, H, N, D)
    attention_packed(qkv)  qkv: (B, N, 3, H, D), the qkv Linear's output reshaped; returns
                           (B, N, H*D) for the output projection, with no transposes or copies.
Both are torch.library custom ops (fake + autograd registered), so torch.compile traces them
without graph breaks. CUDA tensors run the kernels; CPU tensors run them only under the Triton
interpreter (TRITON_INTERPRET=1 set before triton is imported), else fall back to SDPA.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,                # (B, H, N, D) views with unit last stride; q, k, v share strides
    O,                      # (B, H, N, D) view of the output
    LSE,                    # (B*H, N) fp32, natural-log row logsumexp of S
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, qk_scale,      # qk_scale = D**-0.5 * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # int64: B*H*N*D can pass 2**31 at B=1024
    pid_m = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

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
        s = tl.where(mask_n[None, :], s, float("-inf"))  # padded keys get no weight
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every chunk has a real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + o_base + offs_m[:, None] * stride_on + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh * N + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DQ,            # (B, H, N, D) views sharing the input strides
    O, DO,                  # (B, H, N, D) views sharing the output strides
    LSE,                    # (B*H, N) fp32
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    row_mask = mask_m[:, None] & mask_d[None, :]
    q_offs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
    o_offs = o_base + offs_m[:, None] * stride_on + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=row_mask, other=0.0)    # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + o_offs, mask=row_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    o = tl.load(O + o_offs, mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,) rowsum(dO * O)
    lse2 = tl.load(LSE + pid_bh * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):  # the whole key range, no atomics
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kv_offs = q_base + offs_n[:, None] * stride_qn + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DK, DV,        # (B, H, N, D) views sharing the input strides
    O, DO,                  # (B, H, N, D) views sharing the output strides
    LSE,                    # (B*H, N) fp32
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, N, D, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = off_b * stride_qb + off_h * stride_qh
    o_base = off_b * stride_ob + off_h * stride_oh

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's key block
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    kv_offs = q_base + offs_n[:, None] * stride_qn + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    for start_m in range(0, N, BLOCK_M):  # every query block attends to this key block
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        row_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
        o_offs = o_base + offs_m[:, None] * stride_on + offs_d[None, :]
        do = tl.load(DO + o_offs, mask=row_mask, other=0.0)
        o = tl.load(O + o_offs, mask=row_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
        # lse = +inf on padded query rows makes their P column exactly 0.
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=mask_m, other=float("inf"))

        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) = S^T
        pT = tl.exp2((sT * sm_scale - lse[None, :]) * 1.4426950408889634)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) = dP^T
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)

    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Launchers. Block sizes (BLOCK_M, BLOCK_N, num_warps) were picked offline for sm_90 (H100/H200)
# from Triton 3.8's compile + ptxas register and spill counts (no spills, wgmma where it fits, the
# fewest padded rows/columns at N=67 and 197); they are not yet timed on a GPU. Padded tiles that
# hold the whole 197-key range at once spill registers at D=128, hence the key loop.

def _pow2(x):
    return max(16, triton.next_power_of_2(x))


def supported(N, D, dtype):
    """Shapes the kernels take; anything else goes to SDPA."""
    return N >= 1 and 1 <= D <= 128 and dtype in (torch.float16, torch.bfloat16, torch.float32)


def _dot_prec(dtype):
    # fp32: 3xTF32 tensor-core dots, about fp32 accuracy; "ieee" would be an FMA loop that spills.
    return "tf32x3" if dtype == torch.float32 else "tf32"  # fp16/bf16 ignore it


def _config(kernel, D, dtype):
    wide = D > 64 or dtype == torch.float32
    return {"fwd": (64, 32, 8),
            "dq": (32, 16, 8) if wide else (64, 32, 8),
            "dkdv": (16, 32, 8) if wide else (16, 64, 8)}[kernel]  # dkdv: (query step, key block)


def _fwd(q, k, v, o, lse, B, H, N, D, qs, os_):
    """qs, os_: (batch, head, seq) strides of the q/k/v views and of the o view."""
    BLOCK_M, BLOCK_N, warps = _config("fwd", D, q.dtype)
    _attn_fwd_kernel[(B * H, triton.cdiv(N, BLOCK_M))](
        q, k, v, o, lse, *qs, *os_, H, N, D, D ** -0.5 * 1.4426950408889634,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_pow2(D), DOT_PREC=_dot_prec(q.dtype),
        num_warps=warps, num_stages=2)


def _bwd(q, k, v, o, do, lse, dq, dk, dv, B, H, N, D, qs, os_):
    prec, BLOCK_D = _dot_prec(q.dtype), _pow2(D)
    BLOCK_M, BLOCK_N, warps = _config("dq", D, q.dtype)
    _attn_bwd_dq_kernel[(B * H, triton.cdiv(N, BLOCK_M))](
        q, k, v, dq, o, do, lse, *qs, *os_, H, N, D, D ** -0.5,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_PREC=prec, num_warps=warps, num_stages=2)
    BLOCK_M, BLOCK_N, warps = _config("dkdv", D, q.dtype)
    _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(N, BLOCK_N))](
        q, k, v, dk, dv, o, do, lse, *qs, *os_, H, N, D, D ** -0.5,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_PREC=prec, num_warps=warps, num_stages=2)


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
    _bwd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], o, do, lse,
         dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2], B, H, N, D, qs, os_)
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
INTERPRETED = type(_attn_fwd_kernel).__name__ == "InterpretedFunction"


def use_triton(t):
    """Run the kernels on this tensor? CUDA: yes. CPU: only under the interpreter, and not for
    bf16 there (triton 3.8's interpreter computes bf16 tl.dot wrongly and rounds fp32 -> bf16
    by truncation)."""
    if t.is_cuda:
        return True
    return INTERPRETED and t.device.type == "cpu" and t.dtype != torch.bfloat16


def reference_attention(q, k, v):
    """The PyTorch path: SDPA (also the fallback)."""
    return F.scaled_dot_product_attention(q, k, v)


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
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    return reference_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
