"""How the kernels become PyTorch operators: `triton_op(name, fake)`, a decorator.

On GPUs it is torch.library.triton_op: torch.compile traces into the operator's body and sees the
Triton launches themselves (Inductor schedules them in its own graph, and CUDA graphs capture them),
and eager calls launch straight from the body. Kernels inside the body are launched through
`launcher(kernel)`, torch.library.wrap_triton.

Eager calls from an autograd.Function skip the registered op and run its body (`via_op`): the
dispatcher's round trip into a Python op is a fifth or more of a call's CPU time.

Under Triton's interpreter (CPU tests) the same body is registered with torch.library.custom_op and
`fake` gives the output shapes: triton_op would trace the body with fake tensors and the
interpreter cannot run on those (torch 2.11's wrap_triton also refuses interpreted kernels).
"""
import torch
import triton
from torch._library.triton import set_wrap_triton_enabled


@triton.jit
def _probe():
    pass


# TRITON_INTERPRET=1 (set before triton was imported) turns every @triton.jit into an interpreter.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


def launcher(kernel):
    """kernel, ready for `[grid](...)` inside a triton_op body (traceable by torch.compile)."""
    return kernel if INTERPRETED else torch.library.wrap_triton(kernel)


def triton_op(name, fake):
    """Register the decorated function as operator `name` (see the module docstring)."""
    def register(fn):
        if not INTERPRETED:
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return register


def via_op(op, body):
    """What an autograd.Function calls: `body` in eager mode (the op's own implementation, minus
    the dispatcher's round trip), `op` while torch.compile traces (so it sees the registered op)."""
    return op if torch.compiler.is_compiling() else lambda *args: run_eager(body, args)


def run_eager(body, args):
    # As triton_op's own eager path: launches go straight to the kernels, not through wrap_triton's
    # higher-order op (whose eager dispatch torch measures at ~1 ms).
    with set_wrap_triton_enabled(False):
        return body(*args)
