"""kernels/attention.py against PyTorch's attention, forward and every gradient.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA the same checks run the compiled kernels.
The reference is SDPA in float64. Outputs are poisoned with NaN (every `new_empty` the ops make is
NaN-filled) so an element a kernel forgets to write fails the comparison.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels

A = importlib.import_module("kernels.attention")  # `kernels.attention` is the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not A.INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET=1 was not set before triton was imported",
                allow_module_level=True)

# Per-dtype tolerance against a float64 reference (atol, rtol). fp16: inputs rounded to 11 bits
# and P cast to fp16 before the P V and dS K dots, errors ~1e-3 on O(1) values.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3)}

# (B, H, N, D): the task's odd sizes, several B*H, ragged N everywhere but 1 and none a block multiple
# except N=64 (N=66/67: the students at 32px, 197: the teacher at 224px); D=128 once.
SHAPES = [(1, 1, 1, 32), (2, 3, 17, 64), (2, 3, 66, 32), (1, 3, 67, 64), (3, 1, 67, 32),
          (1, 2, 197, 64), (1, 1, 197, 32), (2, 1, 64, 64), (1, 1, 33, 128)]




def _inputs(B, H, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    go = torch.randn(B, H, N, D, generator=g)  # grad_output, not all ones
    q = q * 1.5  # a peakier softmax than unit scale
    return [x.to(DEVICE, dtype) for x in (q, k, v, go)]


def _reference(q, k, v, go):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), go.double()))


def _close(name, actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype, name
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
def test_attention_matches_sdpa(shape, dtype, poisoned):
    q, k, v, go = _inputs(*shape, dtype)
    ref = _reference(q, k, v, go)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = kernels.attention(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), go)
    for name, a, e in zip(("o", "dq", "dk", "dv"), (o, *grads), ref):
        _close(name, a, e, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
def test_attention_packed_matches_sdpa(shape, dtype, poisoned):
    B, H, N, D = shape
    q, k, v, go = _inputs(*shape, dtype, seed=1)
    ref = _reference(q, k, v, go)
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).contiguous().requires_grad_()  # (B, N, 3, H, D)
    assert torch.equal(qkv[:, :, 1].transpose(1, 2), k)
    o = kernels.attention_packed(qkv)  # (B, N, H*D)
    assert o.shape == (B, N, H * D)
    (dqkv,) = torch.autograd.grad(o, qkv, go.transpose(1, 2).reshape(B, N, H * D))
    _close("o", o.view(B, N, H, D).transpose(1, 2), ref[0], dtype)
    for i, name in enumerate(("dq", "dk", "dv")):
        _close(name, dqkv[:, :, i].transpose(1, 2), ref[1 + i], dtype)


def test_packed_reads_strided_qkv_from_a_linear(poisoned):
    """The model's case: qkv = Linear(x).reshape(B, N, 3, H, D), gradients back to the Linear."""
    B, N, H, D = 2, 67, 3, 32
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, N, H * D, generator=g).to(DEVICE)
    lin = torch.nn.Linear(H * D, 3 * H * D).to(DEVICE)
    go = torch.randn(B, N, H * D, generator=g).to(DEVICE)

    def run(fn):
        lin.zero_grad()
        y = fn(lin(x).reshape(B, N, 3, H, D))
        y.backward(go)
        return y.detach().clone(), lin.weight.grad.clone()

    def sdpa_packed(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    for a, e in zip(run(kernels.attention_packed), run(sdpa_packed)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs_and_bad_packed_shape(poisoned):
    q, k, v, go = _inputs(2, 17, 3, 32, torch.float32, seed=5)  # (B, N, H, D) memory order
    q, k, v, go = (x.transpose(1, 2) for x in (q, k, v, go))  # (B, H, N, D) views, not contiguous
    ref = _reference(q, k, v, go)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = kernels.attention(q, k, v)
    for name, a, e in zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, (q, k, v), go)), ref):
        _close(name, a, e, torch.float32)
    with pytest.raises(ValueError, match="qkv of shape"):
        kernels.attention_packed(torch.zeros(2, 5, 4, 3, 8))


def test_forward_saves_row_logsumexp(poisoned):
    B, H, N, D = 2, 3, 67, 32
    q, k, v, _ = _inputs(B, H, N, D, torch.float32, seed=3)
    o, lse = A._attention_fwd(q, k, v)
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1).reshape(B * H, N), atol=1e-5, rtol=1e-5)


def test_triton_path_really_runs(monkeypatch):
    """With the fallback made to raise, both entry points still work, so the kernels ran."""
    def no_fallback(*args):
        raise AssertionError("fell back to SDPA")

    monkeypatch.setattr(A, "reference_attention", no_fallback)
    q, k, v, _ = _inputs(1, 2, 17, 32, torch.float32)
    torch.testing.assert_close(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).contiguous()
    kernels.attention_packed(qkv)
    with pytest.raises(AssertionError, match="fell back"):  # and the fallback is what we patched
        kernels.attention(q, k[:, :, :5], v[:, :, :5])  # cross-attention shapes: SDPA's job


def test_custom_ops_registration():
    """Schema, fake (meta) functions and autograd registration agree with the real kernels."""
    q, k, v, _ = _inputs(1, 2, 17, 32, torch.float32, seed=4)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(A._attention_fwd, (q, k, v))
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).detach().contiguous().requires_grad_()
    torch.library.opcheck(A._attention_packed_fwd, (qkv,))


def test_compile_traces_without_graph_break():
    """torch.compile(fullgraph=True) errors on any graph break; aot_eager also traces the backward."""
    B, N, H, D = 1, 17, 2, 32
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, requires_grad=True)

    def step(qkv):
        return (kernels.attention_packed(qkv) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(qkv)
    (g,) = torch.autograd.grad(loss, qkv)
    qkv2 = qkv.detach().requires_grad_()
    (g2,) = torch.autograd.grad(step(qkv2), qkv2)
    torch.testing.assert_close(g, g2)


def test_import_without_triton_falls_back():
    """`import kernels` works where triton is not installed: PyTorch paths, same contracts."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, torch.nn.functional as F, kernels, losses\n"
        "from model import Logits\n"
        "assert not kernels.HAS_TRITON\n"
        "q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)\n"
        "assert torch.equal(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))\n"
        "qkv = torch.stack([q, k, v], 2).transpose(1, 3)\n"
        "assert kernels.attention_packed(qkv).shape == (2, 5, 16)\n"
        "out = Logits(torch.randn(4, 10))\n"
        "y = torch.tensor([1, 2, 3, 4])\n"
        "assert torch.equal(kernels.distillation_loss(out, y, distill='none')[0],\n"
        "                   losses.distillation_loss(out, y, distill='none')[0])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
