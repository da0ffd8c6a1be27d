"""The kernels' first-use self-check (kernels/verify.py), through Triton's interpreter on CPU (the
compiled kernels with CUDA): a planted wrong kernel, off by a bf16-sized error or grossly, and a
planted launch failure each fall back with one line and leave a training step's weights equal to
the PyTorch path's; a correct kernel passes and prints its errors; two ranks that disagree end on
the same path; torch.compile runs the check while tracing."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

import kernels
import losses
from kernels import verify
from kernels.reference import sdpa_packed

A = importlib.import_module("kernels.attention")
L = importlib.import_module("kernels.distill_loss")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, N, H, D, C, T = 4, 17, 2, 32, 10, 4  # fp16 attention at D = 32 has a forward and a backward
ATTENTION = ("attention forward", "attention backward")
LOSS = ("loss forward", "loss backward")

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not A.INTERPRETED,
                                reason="CPU tensors run the kernels only under the interpreter")


@pytest.fixture
def lines(monkeypatch):
    """A fresh process's verdicts, in verify mode; the lines it says, collected."""
    said = []
    verify.reset()
    monkeypatch.setattr(verify, "_mode", "verify")
    monkeypatch.setattr(verify, "log", said.append)
    yield said
    verify.reset()


class Tiny(torch.nn.Module):
    """Tokens -> qkv -> attention (fp16) -> mean token -> cdeit's three heads."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.proj = torch.nn.Linear(H * D, H * D)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(H * D, n) for n in (C, C, T))

    def forward(self, x):  # x (B, N, H*D)
        qkv = self.qkv(x).view(B, N, 3, H, D).half()
        y = self.proj(self.attend(qkv).float()).mean(1)  # (B, H*D)
        cls, dist, corr = (head(y) for head in self.heads)
        return cls, dist, corr, None


def train_step(attend, loss_fn):
    """One SGD step of Tiny from fixed weights and data: the weights after it."""
    torch.manual_seed(0)
    model = Tiny(attend).to(DEVICE)
    x = torch.randn(B, N, H * D, device=DEVICE)
    y, types = torch.randint(0, C, (B,), device=DEVICE), torch.randint(0, T, (B,), device=DEVICE)
    teacher = torch.randn(B, C, device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _ = loss_fn(model(x), y, teacher, types, distill="hard")
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def fused_and_pytorch(kernel):
    """The step with `kernel`'s family through kernels/ and the other family in PyTorch, and the
    same step all in PyTorch (what --no-fused runs)."""
    fused = (kernels.attention_packed, losses.distillation_loss) if kernel in ATTENTION \
        else (sdpa_packed, kernels.distillation_loss)
    return train_step(*fused), train_step(sdpa_packed, losses.distillation_loss)


def small(x):
    return x * (1 + 2 ** -8)  # about one bf16 rounding step, on every element


def gross(x):
    return 2 * x + 1


def planted(kernel, fault):
    """(module, name, replacement): `kernel`'s body wrong by `fault`, or raising like a failed
    compile or launch."""
    module, name = {"attention forward": (A, "_packed_fwd_impl"),
                    "attention backward": (A, "_packed_bwd_impl"),
                    "loss forward": (L, "_fwd"), "loss backward": (L, "_bwd")}[kernel]
    body = getattr(module, name)

    def wrong(*args):
        if fault == "raise":
            raise RuntimeError("planted: PTX assembly aborted")
        out = body(*args)
        if kernel == "attention forward":
            return fault(out[0]), out[1]  # o wrong, lse right
        return [fault(g) for g in out] if kernel == "loss backward" else fault(out)

    return module, name, wrong


@pytest.mark.parametrize("fault", [small, gross, "raise"], ids=["small", "gross", "raise"])
@pytest.mark.parametrize("kernel", ATTENTION + LOSS)
def test_a_wrong_or_failing_kernel_falls_back_with_one_line(kernel, fault, lines, monkeypatch):
    monkeypatch.setattr(*planted(kernel, fault))
    fused, pytorch = fused_and_pytorch(kernel)
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1, lines
    line = failed[0]
    assert kernel in line and f"triton {triton.__version__}" in line, line
    assert "float16" in line if kernel in ATTENTION else "float32" in line, line
    assert ("RuntimeError: planted" if fault == "raise" else "max error") in line, line
    assert "PyTorch for the rest of the run" in line
    assert list(verify.verdicts()["failed"]) == [kernel]
    assert all(torch.equal(a, b) for a, b in zip(fused, pytorch, strict=True))


@pytest.mark.parametrize("family", ["attention", "loss"])
def test_a_correct_kernel_passes_and_says_its_errors(family, lines, monkeypatch):
    kernel_names = ATTENTION if family == "attention" else LOSS
    module, name, _ = planted(kernel_names[0], None)
    body, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *args: calls.append(1) or body(*args))
    fused, pytorch = fused_and_pytorch(kernel_names[0])
    assert len(lines) == 2, lines
    for kernel, line in zip(kernel_names, lines, strict=True):
        assert line.startswith(f"kernel check: {kernel} (B, ") and ": Triton; max error" in line
        assert "(PyTorch " in line
    record = verify.verdicts()["kernels"]
    assert [r["path"] for r in record.values()] == ["triton", "triton"]
    assert all(len(r["errors"]) > 0 for r in record.values())
    for a, b in zip(fused, pytorch, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    # the forward body ran in the checks (attention's backward check runs it too) and in the step
    assert len(calls) == {"attention": 3, "loss": 2}[family]


def test_the_check_runs_once_per_shape(lines):
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).half()
    for _ in range(3):
        kernels.attention_packed(qkv)
    assert len(lines) == 1 and "attention forward" in lines[0]


def test_trust_skips_the_check(lines, monkeypatch):
    verify.set_mode("trust")
    monkeypatch.setattr(*planted("attention forward", gross))
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).half()
    assert not torch.allclose(kernels.attention_packed(qkv).float(), sdpa_packed(qkv).float())
    assert lines == []
    with pytest.raises(ValueError, match="verify"):
        verify.set_mode("yes")


def test_torch_compile_runs_the_check_while_tracing(lines, monkeypatch):
    monkeypatch.setattr(*planted("attention forward", small))
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).half()
    compiled = torch.compile(kernels.attention_packed, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(qkv), sdpa_packed(qkv))
    assert len([line for line in lines if "FAILED" in line]) == 1


RANK = """
import json, os, sys, torch, torch.distributed as dist
import importlib, kernels
from kernels import verify
from kernels.reference import sdpa_packed
A = importlib.import_module("kernels.attention")
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
verify.log = lambda line: None
if rank == 1:  # this rank's forward is off by a bf16-sized error
    body = A._packed_fwd_impl
    A._packed_fwd_impl = lambda qkv: (lambda o, lse: (o * (1 + 2 ** -8), lse))(*body(qkv))
qkv = torch.randn(4, 17, 3, 2, 32, generator=torch.Generator().manual_seed(0)).half()
kernels.attention_packed(qkv)  # the check
local = list(verify.verdicts()["failed"])
verdicts = verify.agree()
out = kernels.attention_packed(qkv)
print(json.dumps({"local": local, "failed": list(verdicts["failed"]),
                  "pytorch": torch.equal(out, sdpa_packed(qkv))}))
dist.destroy_process_group()
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="the two ranks run on CPU")
def test_two_ranks_that_disagree_end_on_the_same_path(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), store], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["local"] for r in results] == [[], ["attention forward"]]  # they disagreed
    assert [r["failed"] for r in results] == [["attention forward"]] * 2  # the strictest won
    assert [r["pytorch"] for r in results] == [True, True]  # both ran SDPA after


def test_train_records_the_verdicts_in_config_json(lines, tmp_path):
    """train.py's flags set the mode; after its first step every rank agrees and rank 0 writes
    the verdicts into config.json's environment."""
    import argparse

    import checkpoint
    import train

    p = train.parser()
    flags = ([], ["--fused"], ["--fused", "trust"], ["--no-fused"])
    assert [p.parse_args(a).fused for a in flags] == ["verify", "verify", "trust", False]
    kernels.attention_packed(torch.randn(B, N, 3, H, D, device=DEVICE).half())  # one check runs
    args = argparse.Namespace(fused="verify", out_dir=str(tmp_path), environment={"torch": "x"})
    ctx = checkpoint.Context(ddp=False, rank=0, local_rank=0, world=1, device=torch.device("cpu"))
    train.record_kernels(args, ctx)
    recorded = json.loads((tmp_path / "config.json").read_text())["environment"]["kernels"]
    assert recorded["mode"] == "verify" and recorded["failed"] == {}
    (name, record), = recorded["kernels"].items()
    assert name.startswith("attention forward (B, 17, 3, 2, 32) float16")
    assert record["path"] == "triton" and set(record["errors"]) == {"o"}
