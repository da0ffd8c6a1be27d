"""The thesis's distillation objectives (Eq. 4-7) as fused Triton kernels, forward and gradients.

Imports torch, triton and kernels/reference.py, whose eager version of the same objective
(`reference_distillation_loss` here) is the fallback; the tests check both against the kit's
`losses.distillation_loss`.

With label smoothing e, a target distribution q over n classes becomes t = (1 - e) q + e/n (q is
one-hot for class indices, a mixup row otherwise), exactly what F.cross_entropy(label_smoothing=e)
does, and for logits z with lse = logsumexp(z):
    CE(z, t)   = sum(t) lse - sum(t z)            dCE/dz = sum(t) softmax(z) - t
    KL term    = tau^2 sum_b KL(softmax(t/tau) || softmax(s/tau)) / (B C)   (DeiT's normalisation)
                 d/ds = tau (softmax(s/tau) - softmax(t/tau)) / (B C)
The terms of one batch (B, C) and their weights:
    vit   none:  CE(cls, y)
    deit  hard:  1/2 CE(cls, y) + 1/2 CE(dist, argmax t)                      thesis Eq. 5
    deit  soft:  (1 - a) CE(cls, y) + a KL                                      thesis Eq. 4
    cdeit hard:  1/3 CE(cls + corr_cls, y) + 1/3 CE(dist, argmax t) + 1/3 CE(corr, type)  Eq. 6
    cdeit soft:  (1 - a) [CE(cls + corr_cls, y) + CE(corr, type)] / 2 + a KL               Eq. 7
(strategy 1 has no corr_cls: cls alone in the label term). CE terms are batch means; teacher
targets are never smoothed.

Launches, all deterministic (no atomics: the same inputs give the same bits on every run and rank):
  forward   _rows_kernel, grid (cdiv(B, BLOCK_B),): each program loads its BLOCK_B rows of every
            input, then writes each row's three terms to a (3, B) fp32 buffer; _sum_kernel, one
            program, adds that buffer up in a fixed order (chunks of SUM_BLOCK rows) into
            [loss, label, teacher, type]. The sums do not depend on BLOCK_B.
  backward  _rows_kernel again (BACKWARD=True): recomputes each row's gradients in fp32, multiplies
            by grad_output (under fp16 GradScaler the loss scale) and rounds once to each logit's
            dtype. Many entries are ~1e-6 / B, below fp16's normal range: rounded before the scale
            they would become subnormal or zero.
The teacher logits and soft targets get no gradient (the teacher is frozen; targets are data).
"""
import torch
import triton
import triton.language as tl

from . import verify
from .launch import INTERPRETED, launcher, run_eager, triton_op, via_op
from .reference import distillation_loss as reference_distillation_loss
from .reference import loss_weights

SUM_BLOCK = 1024  # rows per step of the second stage: B = 1024 in one step


@triton.jit
def _smoothed_ce(z, target, col_mask, n_cls, smoothing):
    """Rows of CE(z, (1 - e) target + e/n) and its gradient. z: (BLOCK_B, BLOCK_C) fp32 with -inf
    in padded columns; target: fp32, 0 in padded columns."""
    t = tl.where(col_mask, target * (1.0 - smoothing) + smoothing / n_cls, 0.0)
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])  # padded columns -> 0
    s = tl.sum(e, 1)
    tsum = tl.sum(t, 1)
    loss = tsum * (m + tl.log(s)) - tl.sum(t * tl.where(col_mask, z, 0.0), 1)
    grad = e / s[:, None] * tsum[:, None] - t
    return loss, grad


@triton.jit
def _log_softmax(z):
    m = tl.max(z, 1)
    zs = z - m[:, None]
    return zs - tl.log(tl.sum(tl.exp(zs), 1))[:, None]


@triton.jit
def _rows_kernel(
    CLS, CORR_CLS, DIST, TEACHER,   # (B, C) logits, any float dtype, unit column stride
    CORR,                           # (B, T) corruption-token logits
    LABELS, TYPES,                  # (B,) int64 indices, or (B, C) / (B, T) float soft targets
    ROW_LOSS,                       # forward: (3, B) fp32 per-row [label | teacher | type] terms
    GO,                             # backward: fp32, GO[0] = d output / d loss
    G_CLS, G_CC, G_DIST, G_CORR,    # backward: contiguous gradients, each in its logit's dtype
    stride_cls, stride_cc, stride_dist, stride_t, stride_corr, stride_lab, stride_typ,
    B, C, T, smoothing, inv_tau, kl_scale, w_label, w_teacher, w_type,
    HAS_CORR_CLS: tl.constexpr,
    TEACHER_MODE: tl.constexpr,  # 0 none, 1 hard (Eq. 5/6), 2 soft (Eq. 4/7)
    HAS_CORR: tl.constexpr, SOFT_LABELS: tl.constexpr, SOFT_TYPES: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    tcols = tl.arange(0, BLOCK_T)
    tmask = tcols < T
    m2 = rmask[:, None] & cmask[None, :]
    m3 = rmask[:, None] & tmask[None, :]

    # Every load first, so the program waits on memory once. Rows past B load zeros (finite).
    z = tl.load(CLS + rows[:, None] * stride_cls + cols[None, :], mask=m2, other=0.0)
    if HAS_CORR_CLS:
        zcc = tl.load(CORR_CLS + rows[:, None] * stride_cc + cols[None, :], mask=m2, other=0.0)
    if SOFT_LABELS:
        y = tl.load(LABELS + rows[:, None] * stride_lab + cols[None, :], mask=m2, other=0.0)
        y = y.to(tl.float32)
    else:
        lab = tl.load(LABELS + rows * stride_lab, mask=rmask, other=0)
    if TEACHER_MODE != 0:
        d = tl.load(DIST + rows[:, None] * stride_dist + cols[None, :], mask=m2, other=0.0)
        t = tl.load(TEACHER + rows[:, None] * stride_t + cols[None, :], mask=m2, other=0.0)
        d, t = d.to(tl.float32), t.to(tl.float32)
    if HAS_CORR:
        zc = tl.load(CORR + rows[:, None] * stride_corr + tcols[None, :], mask=m3, other=0.0)
        zc = zc.to(tl.float32)
        if SOFT_TYPES:
            yc = tl.load(TYPES + rows[:, None] * stride_typ + tcols[None, :], mask=m3, other=0.0)
            yc = yc.to(tl.float32)
        else:
            typ = tl.load(TYPES + rows * stride_typ, mask=rmask, other=0)
    if BACKWARD:
        go = tl.load(GO)

    # Label term. Eq. 6-7: the label term sees cls + FFN(corr), rounded to the logits' dtype
    # like the eager `cls + corr_cls` (PyTorch also adds in fp32 and rounds).
    if HAS_CORR_CLS:
        z = (z.to(tl.float32) + zcc.to(tl.float32)).to(CLS.dtype.element_ty)
    z = tl.where(cmask[None, :], z.to(tl.float32), float("-inf"))
    if not SOFT_LABELS:
        y = (cols[None, :] == lab[:, None]).to(tl.float32)
    label, g_label = _smoothed_ce(z, y, cmask[None, :], C, smoothing)

    if TEACHER_MODE != 0:
        d = tl.where(cmask[None, :], d, float("-inf"))
        t = tl.where(cmask[None, :], t, float("-inf"))
        if TEACHER_MODE == 1:  # hard: CE(dist, argmax teacher), no smoothing (Eq. 5)
            a = tl.argmax(t, 1, tie_break_left=True)  # first maximum, like torch.argmax
            one_hot = (cols[None, :] == a[:, None]).to(tl.float32)
            teacher, g_dist = _smoothed_ce(d, one_hot, cmask[None, :], C, 0.0)
            g_dist = g_dist * (w_teacher / B)
        else:  # soft: tau^2 KL / (B C) (Eq. 4); kl_scale = tau^2 / (B C)
            log_ps = _log_softmax(d * inv_tau)
            log_pt = _log_softmax(t * inv_tau)
            pt = tl.exp(log_pt)  # 0 in padded columns, where both logs are -inf (no -inf - -inf)
            log_ratio = tl.where(cmask[None, :], log_pt, 0.0) \
                - tl.where(cmask[None, :], log_ps, 0.0)
            teacher = tl.sum(pt * log_ratio, 1)
            g_dist = (tl.exp(log_ps) - pt) * (inv_tau * kl_scale * w_teacher)

    if HAS_CORR:  # CE(corr, type) with smoothing (Eq. 6-7)
        zc = tl.where(tmask[None, :], zc, float("-inf"))
        if not SOFT_TYPES:
            yc = (tcols[None, :] == typ[:, None]).to(tl.float32)
        type_, g_corr = _smoothed_ce(zc, yc, tmask[None, :], T, smoothing)

    if BACKWARD:  # fp32 until grad_output is applied, then one rounding to each logit's dtype
        g = (g_label * (w_label / B)) * go
        tl.store(G_CLS + rows[:, None] * C + cols[None, :], g.to(G_CLS.dtype.element_ty), mask=m2)
        if HAS_CORR_CLS:
            tl.store(G_CC + rows[:, None] * C + cols[None, :], g.to(G_CC.dtype.element_ty), mask=m2)
        if TEACHER_MODE != 0:
            tl.store(G_DIST + rows[:, None] * C + cols[None, :],
                     (g_dist * go).to(G_DIST.dtype.element_ty), mask=m2)
        if HAS_CORR:
            g_corr = (g_corr * (w_type / B)) * go
            tl.store(G_CORR + rows[:, None] * T + tcols[None, :],
                     g_corr.to(G_CORR.dtype.element_ty), mask=m3)
    else:
        tl.store(ROW_LOSS + rows, label, mask=rmask)
        if TEACHER_MODE != 0:
            tl.store(ROW_LOSS + B + rows, teacher, mask=rmask)
        if HAS_CORR:
            tl.store(ROW_LOSS + 2 * B + rows, type_, mask=rmask)


@triton.jit
def _sum_kernel(ROW_LOSS, STATS, B, teacher_scale, w_label, w_teacher, w_type,
                HAS_TEACHER: tl.constexpr, HAS_CORR: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """STATS = [loss, label, teacher, type] from the (3, B) per-row terms, one program: chunk by
    chunk into SUM_BLOCK lanes, then one tree over the lanes. Fixed order for a given B."""
    offs = tl.arange(0, SUM_BLOCK)
    label_acc = tl.zeros((SUM_BLOCK,), dtype=tl.float32)
    teacher_acc = tl.zeros((SUM_BLOCK,), dtype=tl.float32)
    type_acc = tl.zeros((SUM_BLOCK,), dtype=tl.float32)
    start = 0
    # not range(0, B, ...): triton 3.6's interpreter cannot index with a runtime int under
    # numpy >= 2.4
    while start < B:
        rows = start + offs
        mask = rows < B
        label_acc += tl.load(ROW_LOSS + rows, mask=mask, other=0.0)
        if HAS_TEACHER:
            teacher_acc += tl.load(ROW_LOSS + B + rows, mask=mask, other=0.0)
        if HAS_CORR:
            type_acc += tl.load(ROW_LOSS + 2 * B + rows, mask=mask, other=0.0)
        start += SUM_BLOCK
    # The terms, each normalised as in losses.py (teacher_scale: 1/B for CE, tau^2/(B C) for KL).
    label = tl.sum(label_acc, 0) / B
    teacher = tl.sum(teacher_acc, 0) * teacher_scale
    type_ = tl.sum(type_acc, 0) / B
    tl.store(STATS + 0, w_label * label + w_teacher * teacher + w_type * type_)
    tl.store(STATS + 1, label)
    tl.store(STATS + 2, teacher)
    tl.store(STATS + 3, type_)


# ----------------------------------------------------------------------------------------------
# The operators: forward -> stats [loss, label, teacher, type] (fp32); backward -> the logits'
# gradients [cls, corr_cls?, dist?, corr?] (the ones that exist), each in its logit's dtype.

def _rows(x):  # unit column stride, any row stride
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_rows(C, T):
    """Rows per program: 32 at 16 columns (~4 fp32 values a thread per tile at 4 warps, no spills
    on sm_90; 32 programs at B = 1024, 4 at 128). Wider heads get fewer rows."""
    return max(1, min(32, 512 // max(triton.next_power_of_2(C), triton.next_power_of_2(T))))


def _launch_rows(go, row_loss, grads, cls, corr_cls, dist, teacher, corr, labels, types,
                 teacher_mode, tau, smoothing, w_label, w_teacher, w_type):
    """One _rows_kernel launch: forward (row_loss given) or backward (go and grads given)."""
    B, C = cls.shape
    T = corr.shape[1] if corr is not None else 1
    cls = _rows(cls)
    corr_cls = _rows(corr_cls) if corr_cls is not None else cls
    dist = _rows(dist) if teacher_mode else cls
    teacher = _rows(teacher) if teacher_mode else cls
    corr_ = _rows(corr) if corr is not None else cls
    labels = _rows(labels) if labels.dim() == 2 else labels
    types_ = (_rows(types) if types.dim() == 2 else types) if types is not None else labels
    g_cls, g_cc, g_dist, g_corr = grads if grads is not None else (cls,) * 4
    block_b = _block_rows(C, T)
    launcher(_rows_kernel)[(triton.cdiv(B, block_b),)](
        cls, corr_cls, dist, teacher, corr_, labels, types_,
        row_loss if row_loss is not None else cls, go if go is not None else cls,
        g_cls, g_cc if g_cc is not None else cls, g_dist if g_dist is not None else cls,
        g_corr if g_corr is not None else cls,
        cls.stride(0), corr_cls.stride(0), dist.stride(0), teacher.stride(0), corr_.stride(0),
        labels.stride(0), types_.stride(0),
        B, C, T, float(smoothing), 1.0 / tau, tau * tau / (B * C), float(w_label), float(w_teacher),
        float(w_type),
        HAS_CORR_CLS=corr_cls is not cls, TEACHER_MODE=teacher_mode, HAS_CORR=corr is not None,
        SOFT_LABELS=labels.is_floating_point(), SOFT_TYPES=types_.is_floating_point(),
        BACKWARD=go is not None, BLOCK_B=block_b, BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_T=max(16, triton.next_power_of_2(T)), num_warps=4)


def _fwd_fake(cls, corr_cls, dist, teacher, corr, labels, types, teacher_mode, tau, smoothing,
              w_label, w_teacher, w_type):
    return cls.new_empty(4, dtype=torch.float32)


def _fwd(cls: torch.Tensor, corr_cls: torch.Tensor | None, dist: torch.Tensor | None,
         teacher: torch.Tensor | None, corr: torch.Tensor | None, labels: torch.Tensor,
         types: torch.Tensor | None, teacher_mode: int, tau: float, smoothing: float,
         w_label: float, w_teacher: float, w_type: float) -> torch.Tensor:
    B, C = cls.shape
    row_loss = cls.new_empty(3 * B, dtype=torch.float32)  # (3, B): [label | teacher | type]
    stats = cls.new_empty(4, dtype=torch.float32)
    _launch_rows(None, row_loss, None, cls, corr_cls, dist, teacher, corr, labels, types,
                 teacher_mode, tau, smoothing, w_label, w_teacher, w_type)
    teacher_scale = tau * tau / (B * C) if teacher_mode == 2 else 1.0 / B
    launcher(_sum_kernel)[(1,)](row_loss, stats, B, teacher_scale, float(w_label), float(w_teacher),
                                float(w_type), HAS_TEACHER=teacher_mode != 0,
                                HAS_CORR=corr is not None,
                                SUM_BLOCK=SUM_BLOCK, num_warps=4)
    return stats


def _bwd_fake(go, cls, corr_cls, dist, teacher, corr, labels, types, teacher_mode, tau, smoothing,
              w_label, w_teacher, w_type):
    return [x.new_empty(x.shape) for x in (cls, corr_cls, dist, corr) if x is not None]


def _bwd(go: torch.Tensor, cls: torch.Tensor, corr_cls: torch.Tensor | None,
         dist: torch.Tensor | None, teacher: torch.Tensor | None, corr: torch.Tensor | None,
         labels: torch.Tensor, types: torch.Tensor | None, teacher_mode: int, tau: float,
         smoothing: float, w_label: float, w_teacher: float, w_type: float) -> list[torch.Tensor]:
    grads = [x.new_empty(x.shape) if x is not None else None for x in (cls, corr_cls, dist, corr)]
    _launch_rows(go, None, grads, cls, corr_cls, dist, teacher, corr, labels, types,
                 teacher_mode, tau, smoothing, w_label, w_teacher, w_type)
    return [g for g in grads if g is not None]


_distill_loss_fwd = triton_op("triton_kit::distill_loss_fwd", _fwd_fake)(_fwd)
_distill_loss_bwd = triton_op("triton_kit::distill_loss_bwd", _bwd_fake)(_bwd)


class _DistillLoss(torch.autograd.Function):
    """Autograd around the two operators. Eager calls run their bodies directly, without the
    dispatcher's round trip through the registered op (a fifth or more of a call's CPU time);
    torch.compile traces the registered ops (`via_op`), which it sees through to the launches."""

    @staticmethod
    def forward(ctx, *inputs):  # the 13 arguments of _fwd
        ctx.save_for_backward(*inputs[:7])
        ctx.args = inputs[7:]
        return via_op(_distill_loss_fwd, _fwd)(*inputs)

    @staticmethod
    def backward(ctx, g_stats):  # only stats[0], the loss, is differentiated
        cls, corr_cls, dist, teacher, corr, labels, types = ctx.saved_tensors
        bwd = via_op(_distill_loss_bwd, _bwd)
        grads = iter(bwd(g_stats.float().contiguous(), cls, corr_cls, dist,
                                                    teacher, corr, labels, types, *ctx.args))
        g_cls, g_cc, g_dist, g_corr = (next(grads) if x is not None else None
                                       for x in (cls, corr_cls, dist, corr))
        return g_cls, g_cc, g_dist, None, g_corr, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API.

def use_triton(t):
    """CUDA tensors run the kernel; CPU tensors only under the Triton interpreter, and not bf16
    there (triton 3.8's interpreter rounds fp32 -> bf16 by truncation)."""
    return t.is_cuda or (INTERPRETED and t.device.type == "cpu" and t.dtype != torch.bfloat16)


def distillation_loss(out, labels, teacher_logits=None, types=None, *, distill,
                      tau=3.0, alpha=0.5, smoothing=0.1):
    """Same contract as losses.distillation_loss: returns (loss, parts) with parts the unweighted
    {label, teacher, type} terms (those the model has), detached. The kernels serve a call once
    they passed their self-check (kernels/verify.py) at its shape and dtypes; else eager PyTorch."""
    w_label, w_teacher, w_type = loss_weights(out, labels, teacher_logits, types, distill, alpha)
    cls, dist, corr, corr_cls = out
    if not use_triton(cls) or cls.numel() == 0 or not _checked(out, labels, teacher_logits, types,
                                                               distill, tau, alpha, smoothing):
        return reference_distillation_loss(out, labels, teacher_logits, types, distill=distill,
                                           tau=tau, alpha=alpha, smoothing=smoothing)
    teacher_mode = 0 if dist is None else (1 if distill == "hard" else 2)
    stats = _DistillLoss.apply(cls, corr_cls, dist, teacher_logits if teacher_mode else None,
                               corr, labels, types if corr is not None else None,
                               teacher_mode, float(tau), float(smoothing), w_label, w_teacher,
                               w_type)
    parts = stats.detach()
    names = [n for n, x in (("label", cls), ("teacher", dist), ("type", corr)) if x is not None]
    return stats[0], {name: parts[1 + ("label", "teacher", "type").index(name)] for name in names}


# ----------------------------------------------------------------------------------------------
# The self-check (kernels/verify.py): the kernels against reference.py on random logits.

def _checked(out, labels, teacher_logits, types, distill, tau, alpha, smoothing):
    """Have the forward (and the backward, when a gradient will be asked for) passed their
    self-check for this call's shapes, dtypes and options?"""
    cls, dist, corr, corr_cls = out
    spec = (distill, int(corr.shape[1]) if corr is not None else 0, corr_cls is not None,
            dist is not None, labels.dtype, types.dtype if corr is not None else None,
            teacher_logits.dtype if dist is not None else None, float(tau), float(alpha),
            float(smoothing))
    shape = ("B", int(cls.shape[1]))
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in out)
    return (verify.allowed("loss forward", shape, cls.dtype, cls.device, *spec)
            and (not grad or verify.allowed("loss backward", shape, cls.dtype, cls.device, *spec)))


CHECK_ROWS = 67  # the check's batch: two row blocks of 32 and a ragged one


def _check_inputs(shape, dtype, device, distill, T, has_corr_cls, has_dist, label_dtype,
                  type_dtype, teacher_dtype):
    """Random (out, labels, teacher, types) of the call's kind, batch CHECK_ROWS."""
    C, B = shape[1], CHECK_ROWS
    g = torch.Generator(device).manual_seed(0)

    def logits(n, dt):
        return (3 * torch.randn(B, n, generator=g, device=device)).to(dt)

    def target(n, dt):
        if not dt.is_floating_point:
            return torch.randint(0, n, (B,), generator=g, device=device).to(dt)
        return torch.randn(B, n, generator=g, device=device).softmax(1).to(dt)

    out = (logits(C, dtype), logits(C, dtype) if has_dist else None,
           logits(T, dtype) if T else None, logits(C, dtype) if has_corr_cls else None)
    teacher = logits(C, teacher_dtype) if has_dist else None
    return out, target(C, label_dtype), teacher, target(T, type_dtype) if T else None


def _reference(out, labels, teacher, types, opts, wide):
    """reference.py's stats [loss, label, teacher?, type?] and the logits' gradients, on the
    inputs as given or (wide) in float64."""
    if wide:
        def f64(x):
            return x.double() if x is not None and x.is_floating_point() else x
        out, labels, teacher, types = [f64(x) for x in out], f64(labels), f64(teacher), f64(types)
    with torch.enable_grad():
        out = [x.detach().requires_grad_() if x is not None else None for x in out]
        loss, parts = reference_distillation_loss(out, labels, teacher, types, **opts)
        logits = [x for x in (out[0], out[3], out[1], out[2]) if x is not None]  # _bwd's order
        grads = torch.autograd.grad(loss, logits)
    return [loss.detach(), *parts.values()], grads


def _check(kernel, shape, dtype, device, distill, T, has_corr_cls, has_dist, label_dtype,
           type_dtype, teacher_dtype, tau, alpha, smoothing):
    out, labels, teacher, types = _check_inputs(shape, dtype, device, distill, T, has_corr_cls,
                                                has_dist, label_dtype, type_dtype, teacher_dtype)
    cls, dist, corr, corr_cls = out
    teacher_mode = 0 if dist is None else (1 if distill == "hard" else 2)
    weights = loss_weights(out, labels, teacher, types, distill, alpha)
    inputs = (cls, corr_cls, dist, teacher, corr, labels, types)
    args = (teacher_mode, float(tau), float(smoothing), *weights)
    opts = {"distill": distill, "tau": tau, "alpha": alpha, "smoothing": smoothing}
    ref, ref_grads = _reference(out, labels, teacher, types, opts, wide=False)
    truth, truth_grads = _reference(out, labels, teacher, types, opts, wide=True)
    names = [n for n, x in (("cls", cls), ("corr_cls", corr_cls), ("dist", dist), ("corr", corr))
             if x is not None]
    if kernel == "loss backward":
        go = torch.tensor([1.0, 0.0, 0.0, 0.0], device=device)  # d(stats[0]) only: the loss
        ours = run_eager(_bwd, (go, *inputs, *args))
        return {f"d{n}": v for n, *v in zip(names, ours, ref_grads, truth_grads, strict=True)}
    stats = run_eager(_fwd, (*inputs, *args))
    parts = ["loss", "label"] + (["teacher"] if dist is not None else []) + \
        (["type"] if corr is not None else [])
    index = {"loss": 0, "label": 1, "teacher": 2, "type": 3}
    return {p: (stats[index[p]], ref[i], truth[i]) for i, p in enumerate(parts)}


SPEC = ("distill", "T", "corr_cls", "dist", "labels", "types", "teacher", "tau", "alpha",
        "smoothing")  # _checked's spec, named in the lines
verify.register("loss forward", lambda *a: _check("loss forward", *a), SPEC)
verify.register("loss backward", lambda *a: _check("loss backward", *a), SPEC)
