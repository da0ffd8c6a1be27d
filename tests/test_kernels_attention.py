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
from kernels import verify

A = importlib.import_module("kernels.attention")  # `kernels.attention` is the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not A.INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET=1 was not set before triton was imported",
                allow_module_level=True)

# Per-dtype tolerance against a float64 reference (atol, rtol). fp16: inputs rounded to 11 bits
# and P cast to fp16 before the P V and dS K dots, errors ~1e-3 on O(1) values.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3)}

# Every sequence length around the kernels' edges (1, 2, a block of 16 and 64 either side, the
# students' 65-67, 127-129 around the long kernel's 64-row blocks, the teacher's 197), each head
# size, both CPU dtypes.
NS = [1, 2, 17, 63, 64, 65, 67, 127, 128, 129, 197]
DS = [32, 64, 128]
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _trusted(monkeypatch):
    """The kernels themselves, unchecked (tests/test_kernels_verify.py tests the self-check)."""
    monkeypatch.setattr(verify, "_mode", "trust")


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
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_attention_matches_sdpa(N, D, dtype, poisoned):
    q, k, v, go = _inputs(2, 2, N, D, dtype, seed=N + D)  # B=2, H=2: batch and head offsets
    ref = _reference(q, k, v, go)
    if not A.fits(q, N, D, needs_grad=True) and A.fits(q, N, D, needs_grad=False):
        with torch.no_grad():  # a forward kernel, no backward one: the kernel runs without autograd
            _close("o no_grad", kernels.attention(q, k, v), ref[0], dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = kernels.attention(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), go)
    for name, a, e in zip(("o", "dq", "dk", "dv"), (o, *grads), ref):
        _close(name, a, e, dtype)


@pytest.mark.parametrize("N", [40, 80, 230, 300])
def test_other_tile_classes(N, poisoned):
    """The tiles NS does not reach: short 32 + 16 (N = 40) and the 64 + 16 tile full (80); long
    with a 32-key and 32-row tail (230) and a last chunk of a full masked block (300)."""
    q, k, v, go = _inputs(1, 2, N, 32, torch.float16, seed=N)
    ref = _reference(q, k, v, go)
    with torch.no_grad():
        _close("o no_grad", kernels.attention(q, k, v), ref[0], torch.float16)
    if N <= A.SHORT_N:
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = kernels.attention(*xs)
        for name, a, e in zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, xs, go)), ref):
            _close(name, a, e, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("N", NS)
def test_attention_packed_matches_sdpa(N, dtype, poisoned):
    B, H, D = 2, 3, DS[N % 3]  # the model's 3 heads; head sizes cycle over N
    q, k, v, go = _inputs(B, H, N, D, dtype, seed=1)
    ref = _reference(q, k, v, go)
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).contiguous().requires_grad_()  # (B, N, 3, H, D)
    assert torch.equal(qkv[:, :, 1].transpose(1, 2), k)
    o = kernels.attention_packed(qkv)  # (B, N, H*D)
    assert o.shape == (B, N, H * D) and o.is_contiguous()
    (dqkv,) = torch.autograd.grad(o, qkv, go.transpose(1, 2).reshape(B, N, H * D))
    assert dqkv.shape == qkv.shape
    assert dqkv.is_contiguous() or not A.fits(qkv, N, D, True)  # copy-free
    _close("o", o.view(B, N, H, D).transpose(1, 2), ref[0], dtype)
    for i, name in enumerate(("dq", "dk", "dv")):
        _close(name, dqkv[:, :, i].transpose(1, 2), ref[1 + i], dtype)


def test_many_heads_one_dimensional_grid(poisoned):
    """The long kernel's 1-D grid (query block fastest) over B*H = 24 heads x 3 blocks (64 + 64 +
    a 16-row tail), every head checked; the grid stays on axis 0 even at the teacher's largest
    batches."""
    B, H, N, D = 8, 3, 129, 32
    q, k, v, _ = _inputs(B, H, N, D, torch.float16, seed=6)
    o = kernels.attention(q, k, v)
    truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    _close("o", o, truth, torch.float16)
    consts, _ = A.choose("fwd_long", None, N, D, torch.float16)
    assert (consts["BLOCK_M"], consts["ROW_TAIL"]) == (64, 16)
    assert A.fwd_grid(B, H, N, 64) == (B * H * 3,)
    assert A.fwd_grid(1024, 3, 67, 16) == (3072,)  # the students: one program per (batch, head)
    # 1,048,576 programs: past axes 1-2's 65,535, on axis 0
    assert len(A.fwd_grid(65536, 6, 197, 64)) == 1


def test_config_choice_is_pinned_and_pure():
    """No autotuning anywhere: the launch is a pure function of (capability, N, D, dtype) read from
    the pinned CONFIGS, the same in a fresh process (another rank, or a restart) with another hash
    seed. A pure chooser makes a two-process DDP test redundant: nothing a rank sees but its
    arguments can change it. Tiles waste less than padding to 128; unchecked GPUs take SDPA."""
    with open(A.__file__) as f:
        src = f.read()
    assert "autotune" not in src and "Autotuner" not in src
    for fn in (A._attn_fwd_short_kernel, A._attn_bwd_short_kernel, A._attn_fwd_long_kernel):
        assert not hasattr(fn, "configs")  # a triton.autotune wrapper has them
    grid = [(cap, N, D, dt) for cap in (None, (9, 0))
            for N in (1, 17, 40, 67, 80, 81, 128, 197, 300)
            for D in (32, 64, 128) for dt in ("float16", "bfloat16", "float32")]

    def table():
        return [[A.choose(k, cap, N, D, getattr(torch, dt)) for k in A.KERNELS]
                for cap, N, D, dt in grid]

    here = table()
    A._choose.cache_clear()
    assert table() == here
    code = ("import json, torch, importlib; A = importlib.import_module('kernels.attention'); "
            f"grid = {grid!r}; print(json.dumps([[A.choose(k, tuple(c) if c else None, N, D, "
            "getattr(torch, dt)) for k in A.KERNELS] for c, N, D, dt in grid]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=120, check=False,
                       env=dict(os.environ, PYTHONHASHSEED="123", TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads(r.stdout) == json.loads(json.dumps(here))
    assert A.short_tiles(67) == A.short_tiles(80) == (64, 16) and A.short_tiles(17) == (32, 0)
    for n in A.STUDENT_N:  # the students' backward is pinned per N, the rest by (kernel, bits, D)
        assert A.config_entry("bwd_short", 16, 64, n) == A.CONFIGS[("bwd_short", 16, 64, n)]
    assert A.config_entry("bwd_short", 16, 64, 80) == A.CONFIGS[("bwd_short", 16, 64, None)]
    for dtype in (torch.bfloat16, torch.float16):  # the students: a kernel forward and backward
        assert A.choose("fwd_short", (9, 0), 67, 64, dtype)
        assert A.choose("bwd_short", (9, 0), 67, 64, dtype)
        assert A.choose("fwd_long", (9, 0), 197, 64, dtype)
    for cap in ((8, 0), (8, 9)):  # sm_80 / sm_89: the sm_90 configs where they do not spill there
        assert A.choose("fwd_short", cap, 67, 64, torch.bfloat16) is None  # spills: SDPA
        assert "spills registers on sm_8" in A.why_sdpa("fwd_short", cap, 67, 64, torch.bfloat16)
        teacher = A.choose("fwd_long", (9, 0), 197, 64, torch.bfloat16)
        assert A.choose("fwd_long", cap, 197, 64, torch.bfloat16) == teacher
    assert A.choose("fwd_short", (7, 5), 67, 64, torch.bfloat16) is None  # not checked: SDPA
    assert "sm_75" in A.why_sdpa("fwd_short", (7, 5), 67, 64, torch.bfloat16)
    assert A.choose("fwd_short", None, 67, 128, torch.float32) is None  # nothing fits: SDPA


def test_no_backward_kernel_means_sdpa_forward_and_backward(monkeypatch, poisoned):
    """Where no backward kernel serves (N > 80, D = 128, fp32), a call that needs a
    gradient runs SDPA for both passes (its fused backward: no N x N tensor on a GPU); without a
    gradient the forward kernel still runs. The private Function called directly gets SDPA's
    gradients."""
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return F.scaled_dot_product_attention(*args)

    monkeypatch.setattr(A, "reference_attention", spy)
    monkeypatch.setattr(A, "reference_packed",
                        lambda qkv: (calls.append(qkv.shape), kernels.sdpa_packed(qkv))[1])
    for N, D, dtype in [(97, 32, torch.float16), (67, 128, torch.float16), (67, 32, torch.float32)]:
        q, k, v, go = _inputs(1, 2, N, D, dtype, seed=8)
        ref = _reference(q, k, v, go)
        with torch.no_grad():
            kernels.attention(q, k, v)
        assert calls == [], (N, D, dtype)  # the forward kernel
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = kernels.attention(*xs)
        assert len(calls) == 1
        for name, a, e in zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, xs, go)), ref):
            _close(name, a, e, dtype)
        qkv = torch.stack([q, k, v], 2).transpose(1, 3).contiguous().requires_grad_()
        kernels.attention_packed(qkv)
        assert len(calls) == 2
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = A._Attention.apply(*xs)  # the kernel's forward directly, then SDPA's gradients
        for name, a, e in zip(("dq", "dk", "dv"), torch.autograd.grad(o, xs, go), ref[1:]):
            _close(name, a, e, dtype)
        assert len(calls) == 3
        calls.clear()
    assert not hasattr(A, "_bwd_math")  # the materialising (B, H, N, N) backward is gone


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
    got = (o, *torch.autograd.grad(o, (q, k, v), go))
    for name, a, e in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
        _close(name, a, e, torch.float32)
    with pytest.raises(ValueError, match="qkv of shape"):
        kernels.attention_packed(torch.zeros(2, 5, 4, 3, 8))


def test_forward_saves_row_logsumexp(poisoned):
    B, H, N, D = 2, 3, 67, 32
    q, k, v, _ = _inputs(B, H, N, D, torch.float32, seed=3)
    _, lse = A._attention_fwd(q, k, v)
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1).reshape(B * H, N), atol=1e-5,
                               rtol=1e-5)


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
    """Schema and fake (meta) functions of the four operators agree with the real kernels (their
    autograd is the Functions', checked by the gradient tests)."""
    # fp16: the backward kernel has no fp32 config
    q, k, v, do = _inputs(1, 2, 17, 32, torch.float16, seed=4)
    o, lse = A._attention_fwd(q, k, v)
    torch.library.opcheck(A._attention_fwd, (q, k, v))
    torch.library.opcheck(A._attention_bwd, (do, q, k, v, o, lse))
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).contiguous()
    o, lse = A._attention_packed_fwd(qkv)
    torch.library.opcheck(A._attention_packed_fwd, (qkv,))
    torch.library.opcheck(A._attention_packed_bwd, (torch.randn_like(o), qkv, o, lse))


def test_compile_traces_without_graph_break():
    """torch.compile(fullgraph=True) errors on any graph break; aot_eager also traces the
    backward."""
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


def test_kernels_folder_alone_without_triton(tmp_path):
    """kernels/ copied on its own into a project without triton (and without the kit's losses.py
    or model.py): PyTorch paths, same contracts."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "kernels"), tmp_path / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, torch.nn.functional as F, kernels\n"
        "assert not kernels.HAS_TRITON and 'losses' not in sys.modules\n"
        "q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)\n"
        "assert torch.equal(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))\n"
        "qkv = torch.stack([q, k, v], 2).transpose(1, 3)\n"
        "assert torch.equal(kernels.attention_packed(qkv), kernels.sdpa_packed(qkv))\n"
        "assert kernels.attention_packed(qkv).shape == (2, 5, 16)\n"
        "out = (torch.randn(4, 10), None, None, None)\n"
        "y = torch.tensor([1, 2, 3, 4])\n"
        "loss, parts = kernels.distillation_loss(out, y, distill='none')\n"
        "assert torch.allclose(loss, F.cross_entropy(out[0], y, label_smoothing=0.1))\n"
        "assert kernels.verify.agree()['kernels'] == {}\n"  # no kernel ran: nothing to check
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, check=False, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr


def test_work_counted_from_the_kernels_matches_their_tiles():
    """`kernels.bench --bytes` counts our kernels' loads, stores, dot tiles and exps in the
    interpreter; they match the traffic model and the tiles the chooser picks (N = 67: 80 x 80 of
    a 128 x 128 padding, N = 197: 208 x 208), so the useful/padded ratios it prints are the
    kernels'."""
    bench = importlib.import_module("kernels.bench")
    for N, D in [(67, 64), (197, 64), (17, 32)]:
        fwd, bwd = bench.counted_attention(N, D)
        assert fwd["bytes"] == bench.traffic_model("ours", "fwd", N, D)
        if N <= A.SHORT_N:
            assert bwd["bytes"] == bench.traffic_model("ours", "bwd", N, D)
        else:
            assert bwd is None  # SDPA's backward
    fwd, bwd = bench.counted_attention(67, 64)
    assert fwd["macs"] == 2 * 80 * 80 * 64 and fwd["exps"] == 80 * 80
    assert bwd["macs"] == 5 * 80 * 80 * 64 and bwd["exps"] == 80 * 80
    fwd, _ = bench.counted_attention(197, 64)
    consts, _ = A.choose("fwd_long", None, 197, 64, torch.float16)
    chunks = 197 // consts["BLOCK_N"] + (consts["KEY_TAIL"] > 0)
    assert fwd["macs"] == 2 * 208 * 208 * 64
    assert fwd["exps"] == 208 * 208 + chunks * 208  # and one rescale exp per row and key chunk
    t = 67 * 64 * 2  # the accounting of the previous kernels: about 24 u forward + backward
    previous = [bench.traffic_model("previous", p, 67, 64) for p in ("fwd", "bwd")]
    assert round(sum(previous) / t) == 24
    assert bench.occupancy(255, 40 * 1024, 4) == 2 and bench.occupancy(168, 18 * 1024, 4) == 3
    assert bench.occupancy(128, 20 * 1024, 8) == 2 and bench.occupancy(64, 100 * 1024, 4) == 2


def test_training_shapes_compile_without_spills_eight_warps_per_sm():
    """The done-when of the kernels' design, from ptxas for sm_90 (no GPU needed): the students'
    forward and backward and the teacher's forward, as shipped for bf16 at D = 64, compile with no
    register spills and leave room for 2 CTAs per SM, or on triton 3.6, where every 4-warp students'
    backward spills, for one CTA of 8 warps (the same 8 warps per SM). The SASS instruction counts
    `--bytes` prints come with them: each kernel issues tensor-core, fp32 and exp instructions."""
    import json
    code = ("import json, torch, kernels.bench as b; print(json.dumps({k: "
            "b.compile_stats(k, torch.bfloat16, N, 64) "
            "for k, N in (('fwd_short', 67), ('bwd_short', 67), ('fwd_long', 197))}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=300, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    for kernel, st in json.loads(r.stdout.strip().splitlines()[-1]).items():
        warps = A.config_entry(kernel, 16, 64, 197 if kernel == "fwd_long" else 67)[2]
        assert st["spill"] == 0 and st["ctas"] * warps >= 8, (kernel, st)
        assert st["ctas"] >= 2 or (A.TRITON < (3, 7) and kernel == "bwd_short"), (kernel, st)
        if kernel != "fwd_long":
            assert min(st["sass"][c] for c in ("tensor", "fp32", "mufu")) > 0, st["sass"]
            classes = sum(v for c, v in st["sass"].items() if c != "total")
            assert st["sass"]["total"] > classes, st["sass"]
