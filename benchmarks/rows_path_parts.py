"""What is left to win in the CPU distillation step: the two leads for the 1.45×-plain target, measured.

The ``rows`` CE path (`attnxfer.transfer.losses`) walks each distilled layer in row chunks: two logits GEMMs,
softmax(z_t), log_softmax(z_s), a dot product, exp and a subtraction, two gradient GEMMs. Two changes
were proposed to bring the CPU step from about 1.5× to 1.45× a plain step at N = 197:

  teacher core  the loss already computes P̄_t per chunk; P̄_t V_t there would replace the teacher block's own
                attention core (SDPA). Gain per layer = SDPA(q_t, k_t, v_t) - the extra P̄_t V_t GEMMs.
  fusion        the chunk's element-wise passes as one compiled kernel (torch.compile, inductor's C++
                backend) instead of five eager kernels. Gain per chunk = eager - compiled.

Both are timed on one layer of the tiny pair at the benchmark's shape (B = 8, 3 heads of 64, N = 197,
the rows path's own chunking), one thread, interleaved rounds; the step-time fraction divides the gain
by a plain student step's time, which ``--plain-ms`` takes from ``transfer_step.py``'s table.

    python benchmarks/rows_path_parts.py
    python benchmarks/rows_path_parts.py --plain-ms 555 --layers 12
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE), _HERE) if p not in sys.path]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _measure import format_table, machine_info  # noqa: E402

from attnxfer.models.attention.numerics import row_slices  # noqa: E402
from attnxfer.train.timing import interleaved_timings  # noqa: E402
from attnxfer.transfer.losses import rows_path_chunk  # noqa: E402


def _elementwise(z_t: torch.Tensor, z_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows path's per-chunk element-wise work as it writes it (in place, a dot product): the CE sum and
    dz = P_s - P̄_t."""
    p_t = torch.softmax(z_t, dim=-1)
    log_p_s = torch.log_softmax(z_s, dim=-1)
    ce = -torch.dot(p_t.reshape(-1), log_p_s.reshape(-1))
    return ce, log_p_s.exp_().sub_(p_t)


def _elementwise_for_compile(z_t: torch.Tensor, z_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, out of place: the form inductor fuses best (compiling the in-place form measured slower than
    eager here), so the fusion lead gets its best case."""
    p_t = torch.softmax(z_t, dim=-1)
    log_p_s = torch.log_softmax(z_s, dim=-1)
    return -(p_t * log_p_s).sum(), log_p_s.exp() - p_t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--layers", type=int, default=12, help="distilled layers of the pair (default 12)")
    p.add_argument("--plain-ms", type=float, default=None, help="a plain step's time, for the step fraction")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    B, H, N, d = args.batch, args.heads, args.tokens, args.head_dim
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    chunks = list(row_slices(0, N, rows_path_chunk(q, N)))
    p_t = [torch.softmax(torch.randn(B, H, r.stop - r.start, N), dim=-1) for r in chunks]
    z = [(torch.randn(B, H, r.stop - r.start, N), torch.randn(B, H, r.stop - r.start, N)) for r in chunks]
    fused = torch.compile(_elementwise_for_compile, dynamic=False)
    for z_t, z_s in z:  # compile every chunk shape before timing
        fused(z_t, z_s)

    def eager_chunks():
        for z_t, z_s in z:
            _elementwise(z_t.clone(), z_s.clone())

    def fused_chunks():
        for z_t, z_s in z:
            fused(z_t.clone(), z_s.clone())

    def clones():  # the clones both element-wise variants pay for (they work in place)
        for z_t, z_s in z:
            z_t.clone(), z_s.clone()

    fns = {
        "teacher SDPA (one layer)": lambda: F.scaled_dot_product_attention(q, k, v),
        "P_t V_t over the chunks": lambda: [torch.matmul(pt, v) for pt in p_t],
        "element-wise, eager": eager_chunks,
        "element-wise, compiled": fused_chunks,
        "clones (subtracted)": clones,
    }
    t = {
        name: 1e3 * tm.median
        for name, tm in interleaved_timings(fns, device=device, repeats=args.repeats).items()
    }
    core_gain = t["teacher SDPA (one layer)"] - t["P_t V_t over the chunks"]
    fusion_gain = t["element-wise, eager"] - t["element-wise, compiled"]
    rows = [{"part": name, "ms": ms} for name, ms in t.items()]
    print(f"B={B} heads={H} d={d} N={N}, {len(chunks)} chunks of the rows path, {args.threads} thread(s)")
    print(format_table(rows, [("part", "part", "s"), ("ms", "ms per layer", ".3f")]))
    # the teacher stops at the q/k projection of its last transferred layer: one core fewer than layers
    layers = {"teacher core": args.layers - 1, "fusion": args.layers}
    gains = {"teacher core": core_gain * layers["teacher core"], "fusion": fusion_gain * layers["fusion"]}
    for lead, ms in gains.items():
        frac = f" = {ms / args.plain_ms:.3f}x a plain step" if args.plain_ms else ""
        print(f"{lead}: {ms:+.1f} ms per step over {layers[lead]} layers{frac}")
    return {"ms": t, "gain_ms": gains, "machine": machine_info(device)}


if __name__ == "__main__":
    main()
