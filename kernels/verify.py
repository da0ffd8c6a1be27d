"""The kernels' self-check at first use: a kernel is trusted only after it matched PyTorch here.

    allowed(kernel, shape, dtype, device, *spec)  run `kernel` on this (shape, dtype)? The first
                            time in a process it runs the kernel and the PyTorch reference on the
                            same random inputs and compares them; the verdict is kept
    note(kernel, shape, dtype, why)  record, and say once, that PyTorch serves such calls and why
    agree()                 share the verdicts over the default process group: the strictest wins,
                            so every DDP rank runs the same code
    verdicts()              {kernel and shape: {"path", "errors", "why"}} for config.json and
                            the run's summary
    set_mode(mode)          "verify" (the default) or "trust" (run the kernels unchecked)

The criterion is tests/test_kernels_gpu.py's (FlashAttention's): per output, the kernel's max
error against float64 is at most ERROR_FACTOR times the reference's own error at the same
precision. A mismatch or any exception while compiling or launching prints one line (kernel,
shape, dtype, triton version, the error) and sends that kernel to PyTorch for the rest of the
run. `allowed` is a constant for torch.compile: a trace uses the verdict of the eager call before
it, or runs the check itself while tracing (real tensors, outside the graph). Imports torch
only (triton for its version, when a check runs).
"""
import torch

KERNELS = ("attention forward", "attention backward", "loss forward", "loss backward")
MODES = ("verify", "trust")
ERROR_FACTOR = 2.0

_mode = "verify"
_checks = {}   # kernel -> check(shape, dtype, device, *spec) -> {output: (ours, reference, truth)}
_spec_names = {}  # kernel -> names of its check's spec arguments (for the lines)
_records = {}  # "kernel shape dtype" -> {"kernel", "shape", "dtype", "path", "errors", "why"}
_failed = {}   # kernel -> the line that sent it to PyTorch for the rest of the run
_decided = {}  # (kernel, shape, dtype, device, spec) -> its record says Triton (the fast lookup)
log = print    # where the lines go (train.py may route them to its log)


def set_mode(mode):
    """'verify': check each kernel at first use; 'trust': run the kernels unchecked."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel check mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def register(kernel, check, spec_names=()):
    """Install `check(shape, dtype, device, *spec)` for `kernel` (kernels/attention.py and
    kernels/distill_loss.py do, at import); `spec_names` name the spec's values in the lines."""
    _checks[kernel] = check
    _spec_names[kernel] = spec_names


def reset():
    """Forget every verdict (tests; a new process starts empty)."""
    _records.clear()
    _failed.clear()
    _decided.clear()


def constant_when_traced(fn):
    """Mark fn as torch.compiler.assume_constant_result does (the same attribute in torch
    2.11-2.14): torch.compile calls it while tracing and uses its result as a constant. Set
    directly, so importing kernels/ does not start torch._dynamo in every process."""
    fn._dynamo_marked_constant = True
    return fn


def within_error(ours, reference, truth, factor=ERROR_FACTOR):
    """(ok, our max error, the reference's) against `truth`. The floor, 4 fp32 ulps of the largest
    value, covers outputs the reference gets exactly right."""
    truth = truth.double()
    e_ours = (ours.double() - truth).abs().max().item()
    e_ref = (reference.double() - truth).abs().max().item()
    floor = max(1e-6, 4 * torch.finfo(torch.float32).eps * truth.abs().max().item())
    return e_ours <= factor * e_ref + floor, e_ours, e_ref


def _triton_version():
    import triton  # a check only runs where the kernels could: triton is there
    return triton.__version__


def _word(x):
    return str(x).removeprefix("torch.")


def _name(kernel, shape, dtype):
    dims = ", ".join(str(d) for d in shape)
    return f"{kernel} ({dims}) {str(dtype).removeprefix('torch.')}"


@constant_when_traced
def allowed(kernel, shape, dtype, device, *spec):
    """May `kernel` run on inputs of `shape` (its batch size as "B") and `dtype`? True in trust
    mode; False once the kernel failed; else the verdict of its check at this (shape, dtype, spec),
    run on the first call."""
    if _mode == "trust":
        return True
    if kernel in _failed:
        return False
    key = (kernel, shape, dtype, device, spec)
    if key not in _decided:  # the first call at this key: name it, check it
        names = _spec_names.get(kernel) or [""] * len(spec)
        name = _name(kernel, shape, dtype) + "".join(
            f" {n}={_word(x)}" if n else f" {_word(x)}" for n, x in zip(names, spec, strict=True))
        if name not in _records:
            _records[name] = _check(kernel, name, shape, dtype, device, spec)
        _decided[key] = _records[name]["path"] == "triton"
    return _decided[key]


def _check(kernel, name, shape, dtype, device, spec):
    record = {"kernel": kernel, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
              "path": "triton", "errors": {}, "why": ""}
    try:
        with torch.autocast(torch.device(device).type, enabled=False), torch.inference_mode(False):
            outputs = _checks[kernel](shape, dtype, device, *spec)
        worst = None
        for out, (ours, ref, truth) in outputs.items():
            ok, e_ours, e_ref = within_error(ours, ref, truth)
            record["errors"][out] = [e_ours, e_ref]
            if not ok and worst is None:
                worst = (f"{out} max error {e_ours:.3g} > {ERROR_FACTOR:g} x PyTorch's "
                         f"{e_ref:.3g}")
    except Exception as e:  # noqa: BLE001 (any compile or launch error must fall back, not crash)
        worst = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    errors = ", ".join(f"{out} {a:.2g} (PyTorch {b:.2g})"
                       for out, (a, b) in record["errors"].items())
    if worst is None:
        log(f"kernel check: {name}: Triton; max error vs float64 {errors}")
        return record
    record.update(path="pytorch", why=worst)
    _failed[kernel] = f"{name}, triton {_triton_version()}: {worst}"
    log(f"kernel check FAILED: {_failed[kernel]}; {kernel} runs PyTorch for the rest of the run")
    return record


@constant_when_traced
def note(kernel, shape, dtype, why):
    """Record that PyTorch serves `kernel` at (shape, dtype) and why; say it once."""
    name = _name(kernel, shape, dtype)
    if name not in _records:
        _records[name] = {"kernel": kernel, "shape": list(shape),
                          "dtype": str(dtype).removeprefix("torch."), "path": "pytorch",
                          "errors": {}, "why": why}
        log(f"kernel check: {name}: PyTorch ({why})")


def verdicts():
    """{name: record} of every kernel and shape decided in this process; a kernel that failed
    anywhere shows path 'pytorch' everywhere. With the mode and the failures."""
    records = {name: dict(r, path="pytorch" if r["kernel"] in _failed else r["path"])
               for name, r in _records.items()}
    return {"mode": _mode, "failed": dict(_failed), "kernels": records}


def agree():
    """Share this process's verdicts with every rank of the default process group (if one is
    initialized) and keep the strictest: a kernel failed on any rank runs PyTorch on all. Every
    rank must call it at the same point. If it changed a verdict here, torch.compile's traces
    are dropped (they hold the old one as a constant). Returns verdicts()."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return verdicts()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"failed": dict(_failed), "records": dict(_records)})
    changed = False
    for rank, other in enumerate(gathered):
        for kernel, line in other["failed"].items():
            if kernel not in _failed:
                _failed[kernel] = f"rank {rank}: {line}"
                changed = True
                log(f"kernel check: {kernel} runs PyTorch on every rank: failed on "
                    f"{_failed[kernel]}")
        for name, record in other["records"].items():
            if name not in _records or (record["path"] == "pytorch"
                                        and _records[name]["path"] != "pytorch"):
                why = record["why"] and f"rank {rank}: {record['why']}"
                _records[name] = dict(record, why=why)
    _decided.clear()  # looked up again from the merged records
    if changed:
        torch._dynamo.reset()
    return verdicts()
