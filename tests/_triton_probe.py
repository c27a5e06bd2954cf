"""A probe for what the installed Triton's interpreter can run, imported only inside the interpreter worker of
`test_triton_ce` (the kernel below must be decorated under ``TRITON_INTERPRET=1``)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_to_a_runtime_bound(X, Y, N, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < N, other=0.0)
    tl.store(Y + tl.arange(0, BLOCK), acc)


def interpreter_loops_to_a_runtime_bound() -> str | None:
    """None if a kernel loop whose bound is a runtime argument (as in every CE kernel) runs under this
    process's interpreter and sums right; otherwise what went wrong. Triton 3.6's interpreter (torch 2.11's
    triton, the lent GPU machines' image) raises "only 0-dimensional arrays can be converted to Python
    scalars" on such a loop; 3.8's runs it."""
    x, y = torch.arange(40, dtype=torch.float32), torch.zeros(16)
    try:
        _sum_to_a_runtime_bound[(1,)](x, y, 40, BLOCK=16)
    except Exception as e:  # the interpreter's own error, whatever its type
        return f"{type(e).__name__}: {e}"
    return None if y.sum().item() == x.sum().item() else f"summed to {y.sum().item()}, not {x.sum().item()}"
