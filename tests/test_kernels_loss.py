"""kernels/distill_loss.py against the oracle, losses.distillation_loss (thesis Eq. 4-7).

Every model kind x distill mode x hard/soft targets x CdeiT strategy, odd batch sizes (1, 37, and
300: the last program's rows end on a ragged block), fp32/fp16 logits, grad_output != 1,
per-dtype tolerances, NaN-poisoned outputs, and fp16 gradients under a GradScaler-sized loss scale
against float64 math. Runs through Triton's interpreter without CUDA
(tests/conftest.py). bf16 is checked in tests/test_kernels_gpu.py: triton 3.8's interpreter
rounds fp32 -> bf16 by truncation, so CPU bf16 takes the eager path.
"""
import importlib

import pytest
import torch

import kernels
import losses
from kernels import verify
from model import Logits

K = importlib.import_module("kernels.distill_loss")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not K.INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET=1 was not set before triton was imported",
                allow_module_level=True)

C, T = 10, 11
# Gradient tolerance (atol, rtol) by logit dtype: both sides compute in fp32 and round the
# gradient to the logit dtype once, so the difference is at most about one rounding step.
TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _trusted(monkeypatch):
    """The kernels themselves, unchecked (tests/test_kernels_verify.py tests the self-check)."""
    monkeypatch.setattr(verify, "_mode", "trust")


def _batch(kind, B, soft, strategy=2, dtype=torch.float32, n_cls=C, seed=0):
    g = torch.Generator().manual_seed(seed)

    def logits(n):
        return (2 * torch.randn(B, n, generator=g)).to(DEVICE, dtype).requires_grad_()

    out = Logits(logits(n_cls), logits(n_cls) if kind != "vit" else None,
                 logits(T) if kind == "cdeit" else None,
                 logits(n_cls) if kind == "cdeit" and strategy > 1 else None)
    if soft:  # mixup-style targets: two one-hots mixed with one lambda
        lam = 0.3
        labels = lam * torch.eye(n_cls)[torch.randint(0, n_cls, (B,), generator=g)] + \
            (1 - lam) * torch.eye(n_cls)[torch.randint(0, n_cls, (B,), generator=g)]
        types = lam * torch.eye(T)[torch.randint(0, T, (B,), generator=g)] + \
            (1 - lam) * torch.eye(T)[torch.randint(0, T, (B,), generator=g)]
    else:
        labels = torch.randint(0, n_cls, (B,), generator=g)
        types = torch.randint(0, T, (B,), generator=g)
    teacher = 3 * torch.randn(B, n_cls, generator=g) if kind != "vit" else None
    to = (lambda x: x.to(DEVICE) if x is not None else None)
    return out, to(labels), to(teacher), to(types) if kind == "cdeit" else None


def _compare(fused, oracle, out, labels, teacher, types, dtype, **kw):
    inputs = [x for x in out if x is not None]
    go = torch.tensor(-1.7, device=DEVICE)  # grad_output != 1
    loss, parts = fused(out, labels, teacher, types, **kw)
    grads = torch.autograd.grad(loss, inputs, go)
    loss_r, parts_r = oracle(out, labels, teacher, types, **kw)
    grads_r = torch.autograd.grad(loss_r, inputs, go)
    assert loss.dtype == loss_r.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, loss_r, atol=1e-5, rtol=1e-5)
    assert parts.keys() == parts_r.keys()
    for name in parts:
        assert not parts[name].requires_grad
        torch.testing.assert_close(parts[name], parts_r[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    atol, rtol = TOL[dtype]
    for i, (a, e) in enumerate(zip(grads, grads_r)):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, i=i: f"grad {i}: {m}")


CASES = [("vit", "none", 2), ("deit", "hard", 2), ("deit", "soft", 2),
         ("cdeit", "hard", 1), ("cdeit", "hard", 2), ("cdeit", "soft", 1), ("cdeit", "soft", 3)]


@pytest.mark.parametrize("soft", [False, True], ids=["index", "mixup"])
@pytest.mark.parametrize("kind,distill,strategy", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("B", [1, 37, 300])
def test_fused_loss_matches_losses_py(kind, distill, strategy, soft, B, poisoned):
    out, labels, teacher, types = _batch(kind, B, soft, strategy, seed=B)
    _compare(kernels.distillation_loss, losses.distillation_loss, out, labels, teacher, types,
             torch.float32, distill=distill, tau=2.5, alpha=0.3, smoothing=0.1)


@pytest.mark.parametrize("dtype", ["fp16"] + (["bf16"] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("kind,distill,strategy",
                         [("deit", "soft", 2), ("cdeit", "hard", 2), ("cdeit", "soft", 2)],
                         ids=lambda x: str(x))
def test_fused_loss_low_precision_logits(kind, distill, strategy, dtype, poisoned):
    out, labels, teacher, types = _batch(kind, 67, False, strategy, DTYPES[dtype], seed=5)
    teacher = teacher.half()  # a cached teacher may be stored in fp16
    _compare(kernels.distillation_loss, losses.distillation_loss, out, labels, teacher, types,
             DTYPES[dtype], distill=distill)


def test_wider_heads_and_no_smoothing(poisoned):
    """C=100 (more than one 16-wide block of columns) and smoothing=0, tau=1."""
    out, labels, teacher, types = _batch("cdeit", 19, True, 2, n_cls=100, seed=7)
    for distill in ("hard", "soft"):
        _compare(kernels.distillation_loss, losses.distillation_loss, out, labels, teacher, types,
                 torch.float32, distill=distill, tau=1.0, smoothing=0.0)


def test_teacher_argmax_ties_take_the_first_class(poisoned):
    out, labels, _, _ = _batch("deit", 8, False, seed=8)
    teacher = torch.zeros(8, C, device=DEVICE)
    teacher[:, 3] = teacher[:, 7] = 1.0  # a tie: torch.argmax picks class 3
    _compare(kernels.distillation_loss, losses.distillation_loss, out, labels, teacher, None,
             torch.float32, distill="hard")


def test_triton_path_really_runs(monkeypatch):
    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to the eager loss")

    monkeypatch.setattr(K, "reference_distillation_loss", no_fallback)
    out, labels, teacher, types = _batch("cdeit", 9, False, seed=10)
    loss, _ = kernels.distillation_loss(out, labels, teacher, types, distill="soft")
    expect, _ = losses.distillation_loss(out, labels, teacher, types, distill="soft")
    torch.testing.assert_close(loss, expect)
    if DEVICE == "cpu":  # and what the patch replaced is the fallback
        K.INTERPRETED = False
        try:
            with pytest.raises(AssertionError, match="fell back"):
                kernels.distillation_loss(out, labels, teacher, types, distill="soft")
        finally:
            K.INTERPRETED = True


@pytest.mark.parametrize("bad", ["vit_with_teacher", "deit_without_teacher", "cdeit_without_types",
                                 "teacher_shape", "labels_shape", "distill_name"])
def test_bad_combinations_raise_like_losses_py(bad):
    kind = {"vit_with_teacher": "vit", "cdeit_without_types": "cdeit"}.get(bad, "deit")
    out, labels, teacher, types = _batch(kind, 4, False, seed=11)
    kw = {"distill": "hard"}
    if bad == "vit_with_teacher":
        teacher, kw = torch.zeros(4, C, device=DEVICE), {"distill": "none"}
    elif bad == "deit_without_teacher":
        teacher = None
    elif bad == "cdeit_without_types":
        types = None
    elif bad == "teacher_shape":
        teacher = teacher[:, :5]
    elif bad == "labels_shape":
        labels = labels[:3]
    else:
        kw = {"distill": "medium"}
    with pytest.raises(ValueError) as ours:
        kernels.distillation_loss(out, labels, teacher, types, **kw)
    with pytest.raises(ValueError) as theirs:
        losses.distillation_loss(out, labels, teacher, types, **kw)
    assert str(ours.value) == str(theirs.value)


def _run(out, labels, teacher, types, distill):
    loss, parts = kernels.distillation_loss(out, labels, teacher, types, distill=distill)
    grads = torch.autograd.grad(loss, [x for x in out if x is not None],
                                torch.tensor(0.7, device=DEVICE))
    return [loss, *parts.values(), *grads]


def test_bit_identical_across_runs_and_row_blocks(monkeypatch):
    """No atomics, fixed-order sums: the same bits on every run; and the second stage adds per-row
    terms, so the rows per program (BLOCK_B) change neither the loss nor the gradients."""
    out, labels, teacher, types = _batch("cdeit", 70, True, 2, torch.float16, seed=15)
    first = _run(out, labels, teacher, types, "soft")
    for block_b in (None, 4, 64):
        if block_b is not None:
            monkeypatch.setattr(K, "_block_rows", lambda C, T, b=block_b: b)
        again = _run(out, labels, teacher, types, "soft")
        for a, e in zip(again, first):
            assert torch.equal(a, e), f"BLOCK_B {block_b}: results differ in bits"


def test_grid_has_many_programs_at_the_global_batch(monkeypatch):
    """B = 1024: the row stage runs as many programs (not one walking every row)."""
    grids = {}
    real = K.launcher

    def recording(kernel):
        class Launch:
            def __getitem__(self, grid):
                grids[kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__] = grid
                return real(kernel)[grid]
        return Launch()

    monkeypatch.setattr(K, "launcher", recording)
    out, labels, teacher, types = _batch("deit", 1024, False, seed=16)
    _run(out, labels, teacher, types, "hard")
    assert grids == {"_rows_kernel": (1024 // K._block_rows(C, T),), "_sum_kernel": (1,)}
    assert grids["_rows_kernel"][0] >= 32


def test_second_stage_over_several_chunks(monkeypatch, poisoned):
    """B past SUM_BLOCK: the sums walk several chunks, the last one ragged."""
    monkeypatch.setattr(K, "SUM_BLOCK", 64)
    out, labels, teacher, types = _batch("cdeit", 300, False, 2, seed=17)
    _compare(kernels.distillation_loss, losses.distillation_loss, out, labels, teacher, types,
             torch.float32, distill="soft")


def test_custom_op_registration():
    """The two operators torch.compile traces (autograd is _DistillLoss's, around them)."""
    out, labels, teacher, types = _batch("cdeit", 5, False, seed=12)
    cls, dist, corr, corr_cls = (x.detach() for x in out)
    args = (cls, corr_cls, dist, teacher, corr, labels, types, 2, 3.0, 0.1, 0.25, 0.5, 0.25)
    torch.library.opcheck(K._distill_loss_fwd, args)
    torch.library.opcheck(K._distill_loss_bwd, (torch.ones(4, device=DEVICE), *args))


def test_compile_traces_without_graph_break():
    out, labels, teacher, types = _batch("cdeit", 7, True, seed=13)

    def step(out):
        return kernels.distillation_loss(out, labels, teacher, types, distill="soft")[0]

    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(out)
    grads = torch.autograd.grad(loss, [x for x in out if x is not None])
    grads_r = torch.autograd.grad(step(out), [x for x in out if x is not None])
    for a, e in zip(grads, grads_r):
        torch.testing.assert_close(a, e)


def _float64_cdeit_soft(out, labels, teacher, types, tau, alpha, smoothing):
    """Eq. 7 in float64 math, the yardstick for the fp16 gradients."""
    import torch.nn.functional as F
    cls, dist, corr, corr_cls = out
    z = cls + corr_cls
    z = z + (z.half().double() - z).detach()  # the sum rounded to fp16, as the fp16 model adds it
    label = F.cross_entropy(z, labels, label_smoothing=smoothing)
    type_ = F.cross_entropy(corr, types, label_smoothing=smoothing)
    kl = F.kl_div(F.log_softmax(dist / tau, 1), F.log_softmax(teacher / tau, 1), reduction="sum",
                  log_target=True) * tau * tau / dist.numel()
    return (1 - alpha) * (label + type_) / 2 + alpha * kl


def test_fp16_gradients_survive_a_gradscaler_scale(poisoned):
    """`--amp fp16`: GradScaler multiplies the loss by 65536 (its initial scale) before backward.
    Soft-distillation gradients are ~tau^2/(B C) x small probability gaps, often below fp16's
    normal range (6.1e-5): rounded to fp16 before the scale they become subnormal or zero. The
    kernel keeps them fp32 until grad_output (the scale) is applied and rounds once."""
    B, scale, tau, alpha = 1024, 65536.0, 3.0, 0.5
    out, labels, teacher, types = _batch("cdeit", B, False, 2, torch.float16, seed=14)
    inputs = [x for x in out if x is not None]
    loss, _ = kernels.distillation_loss(out, labels, teacher, types, distill="soft", tau=tau,
                                        alpha=alpha)
    grads = torch.autograd.grad(loss * scale, inputs)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref_out = Logits(*ref_inputs)
    ref_loss = _float64_cdeit_soft(ref_out, labels, teacher.double(), types, tau, alpha, 0.1)
    ref = torch.autograd.grad(ref_loss * scale, ref_inputs)
    lost = 0
    for name, a, e in zip(("cls", "dist", "corr", "corr_cls"), grads, ref):
        assert a.dtype == torch.float16
        assert not ((a == 0) & (e != 0)).any(), f"{name}: gradients underflowed to zero"
        torch.testing.assert_close(a.double(), e, atol=1e-3, rtol=4e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")
        rounded_first = (e / scale).half().double() * scale  # fp16 gradient first, then the scale
        lost += int(((rounded_first == 0) & (e != 0)).sum())
    assert lost > 0  # the check above can fail: this batch has gradients that fp16 alone loses


def test_eager_calls_launch_without_the_traceable_wrapper():
    """via_op's eager path runs the op body with wrap_triton off, as triton_op's own eager path
    does: wrap_triton's higher-order op is for tracing, and slow in eager mode."""
    from torch._library.triton import is_wrap_triton_enabled
    seen = []
    K.via_op(K._distill_loss_fwd, lambda: seen.append(is_wrap_triton_enabled()))()
    assert seen == [False] and is_wrap_triton_enabled()


GPU_TRACE = """
import torch
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from kernels import distill_loss as K
assert not K.INTERPRETED
graphs = []
with FakeTensorMode():  # fake CUDA tensors: shapes only, no device needed
    B, C, T = 64, 10, 11
    a, b, d = (torch.randn(B, C, device="cuda") for _ in range(3))
    c, teacher = torch.randn(B, T, device="cuda"), torch.randn(B, C, device="cuda")
    labels = torch.randint(0, C, (B,), device="cuda")
    types = torch.randint(0, T, (B,), device="cuda")
    def f(a, b, c, d, teacher, labels, types):
        s = K._distill_loss_fwd(a, d, b, teacher, c, labels, types, 2, 3.0, 0.1, 0.25, 0.5, 0.25)
        return [s] + K._distill_loss_bwd(s, a, d, b, teacher, c, labels, types, 2, 3.0, 0.1, 0.25,
                                         0.5, 0.25)

    def keep(gm, _):
        graphs.append(gm.code)
        return gm
    aot_function(f, fw_compiler=keep)(a, b, c, d, teacher, labels, types)
print(graphs[0].count("triton_kernel_wrapper_functional("), "triton_kit" in graphs[0])
"""


def test_gpu_path_is_traceable_into_the_kernels():
    """Compiled, the operators are Triton launches in the graph (torch.library.triton_op +
    wrap_triton), not opaque calls: traced here with fake CUDA tensors, no GPU and no
    interpreter."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", GPU_TRACE],
                       cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["3", "False"]  # rows forward, sum, rows backward; no opaque op left
