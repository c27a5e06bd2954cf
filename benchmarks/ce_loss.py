"""The distillation loss alone, per CE path, in units of one attention (forward + backward).

The target: the O(N) distillation loss should cost about what one or two extra flash attentions cost. This
times, for one layer's q/k (views of fused qkv outputs, as a ViT block hands them out), the loss's forward
and backward on each CE path (``attention_distillation_loss(path=...)``, the logged KL off as on most
steps) against the student's own attention, ``SDPA(q, k, v)`` forward and backward (flash attention on a
GPU for bf16), in the same interleaved rounds: ``x attn`` is the ratio. Peak memory is the most tensor bytes
live during one call above those live before it.

``--kernels`` reports what the Triton kernels of the ``triton`` path compile to for an H100 (sm_90): registers
and spills per thread (ptxas), shared memory, tensor-core instructions. That needs no GPU (triton ships
ptxas), so it runs here; the timings of ``triton`` need CUDA.

    python benchmarks/ce_loss.py                                  # CPU: rows, sdpa vs attention
    python benchmarks/ce_loss.py --kernels                        # + what the Triton kernels compile to
    python benchmarks/ce_loss.py --device cuda --tokens 197,785,3137 --batch 64,16,4 \
        --ce-paths rows,sdpa,triton                               # the comparison on the GPU
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE), _HERE) if p not in sys.path]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _measure import (  # noqa: E402
    bench_device,
    format_table,
    load_average,
    machine_info,
    mib,
    refuse_triton_off_cuda,
    step_peak_growth,
    write_json,
)

from attnxfer.train.timing import interleaved_timings  # noqa: E402
from attnxfer.transfer.losses import CE_PATHS, attention_distillation_loss  # noqa: E402

#: paths timed here: attention_lse's extra cost is P̄_t K_s beside the student's own attention kernel, which
#: only a whole step shows (benchmarks/transfer_step.py --ce-paths)
PATHS = tuple(p for p in CE_PATHS if not p.needs_student_lse)


def _fused(B: int, N: int, H: int, d: int, dtype, device, seed: int, grad: bool) -> torch.Tensor:
    """A (3, B, H, N, d) view of a (B, N, 3, H, d) qkv output (what a timm ViT block's attention sees)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(device, dtype).requires_grad_(grad)
    return qkv


def _qkv(t: torch.Tensor):
    return t.permute(2, 0, 3, 1, 4).unbind(0)


class Case:
    """One layer's tensors and the calls to time (each: forward and backward)."""

    def __init__(self, B: int, N: int, args: argparse.Namespace):
        dev, dt = args.device, args.dtype
        self.teacher = _fused(B, N, args.teacher_heads, args.teacher_head_dim, dt, dev, seed=1, grad=False)
        self.student = _fused(B, N, args.heads, args.head_dim, dt, dev, seed=2, grad=True)
        self.grad_out = torch.randn(
            B, args.heads, N, args.head_dim, generator=torch.Generator().manual_seed(3)
        )
        self.grad_out = self.grad_out.to(dev, dt)

    def attention(self) -> None:
        q, k, v = _qkv(self.student)
        F.scaled_dot_product_attention(q, k, v).backward(self.grad_out)
        self.student.grad = None

    def loss(self, path: str):
        def run() -> None:
            q_t, k_t, _ = _qkv(self.teacher)
            q_s, k_s, _ = _qkv(self.student)
            attention_distillation_loss(q_t, k_t, q_s, k_s, path=path, with_kl=False).total.backward()
            self.student.grad = None

        return run


def kernel_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Registers, spills and shared memory of every Triton kernel compiled for sm_90 (no GPU needed)."""
    import triton

    from attnxfer.transfer.triton_ce import compile_for_arch

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for groups in (1, 2):
            q_t = torch.zeros(1, args.heads * groups, 197, args.teacher_head_dim, dtype=dtype)
            q_s = torch.zeros(1, args.heads, 197, args.head_dim, dtype=dtype)
            for block_m, block_n in args.tiles or [(None, None)]:
                compiled = compile_for_arch(q_t, q_t, q_s, q_s, block_m=block_m, block_n=block_n)
                for name, kernel in compiled.items():
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                        f.write(kernel.asm["ptx"])
                        f.flush()
                        out = subprocess.run(
                            [ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stderr
                    regs = re.search(r"Used (\d+) registers", out)
                    spills = re.search(r"(\d+) bytes spill stores", out)
                    ptx = kernel.asm["ptx"]
                    rows.append(
                        dict(
                            dtype=str(dtype).removeprefix("torch."),
                            g=groups,
                            tiles=f"{block_m}x{block_n}" if block_m else "default",
                            kernel=name,
                            registers=int(regs.group(1)) if regs else None,
                            spill_bytes=int(spills.group(1)) if spills else None,
                            shared_kib=kernel.metadata.shared / 1024,
                            tensor_cores="wgmma"
                            if "wgmma" in ptx
                            else ("mma" if "mma.sync" in ptx else "no"),
                        )
                    )
    return rows


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m, _, n = item.strip().partition("x")
        out.append((int(m), int(n or m)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(v) for v in text.split(",")]
    p.add_argument("--tokens", type=ints, default=[197, 785], help="token counts N (default 197,785)")
    p.add_argument("--batch", type=ints, default=None, help="batch per N (default: about 1,570 tokens)")
    p.add_argument("--heads", type=int, default=6, help="student heads (default 6, ViT-S)")
    p.add_argument("--head-dim", type=int, default=64, help="student head dim (default 64)")
    p.add_argument("--teacher-heads", type=int, default=None, help="teacher heads (default: the student's)")
    p.add_argument(
        "--teacher-head-dim", type=int, default=None, help="teacher head dim (default: the student's)"
    )
    p.add_argument(
        "--ce-paths",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=None,
        help=f"CE paths to time ({','.join(PATHS)}; default: rows,sdpa, plus triton on cuda)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.add_argument("--kernels", action="store_true", help="also report what the Triton kernels compile to")
    p.add_argument(
        "--tiles",
        type=_pairs,
        default=None,
        help="--kernels tiles, e.g. 64x64,128x64 (default: triton_ce's, 64x64 bf16, 32x32 fp32)",
    )
    p.add_argument(
        "--json", metavar="PATH", default=None, help="also write the tables and machine facts as JSON"
    )
    args = p.parse_args(argv)
    args.device = bench_device(args.device)
    cuda = args.device.type == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.teacher_heads = args.teacher_heads or args.heads
    args.teacher_head_dim = args.teacher_head_dim or args.head_dim
    if args.batch is None:
        args.batch = [max(1, round(1570 / n)) for n in args.tokens]
    if len(args.batch) == 1:
        args.batch = args.batch * len(args.tokens)
    if len(args.batch) != len(args.tokens):
        raise SystemExit(f"--batch: give one value or one per token count ({len(args.tokens)})")
    if args.ce_paths is None:
        args.ce_paths = ["rows", "sdpa"] + (["triton"] if cuda else [])
    unknown = [c for c in args.ce_paths if c not in PATHS]
    if unknown:
        raise SystemExit(f"--ce-paths: unknown or not timed here: {', '.join(unknown)}; choose from {PATHS}")
    refuse_triton_off_cuda(args.ce_paths, args.device)
    if args.teacher_heads % args.heads:
        raise SystemExit("--teacher-heads must be a multiple of --heads")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    print(
        f"ce_loss: student {args.heads}x{args.head_dim}, teacher {args.teacher_heads}x{args.teacher_head_dim}, "
        f"{args.dtype}, device {args.device}, torch {info['torch']}, {info['torch_threads']} threads, "
        f"load {info.get('loadavg_start')}",
        flush=True,
    )
    rows = []
    started = time.perf_counter()
    for N, B in zip(args.tokens, args.batch):
        case = Case(B, N, args)
        fns = {"attention": case.attention, **{f"ce:{p}": case.loss(p) for p in args.ce_paths}}
        timings = interleaved_timings(fns, device=args.device, warmup=args.warmup, repeats=args.repeats)
        base = timings["attention"].median
        for name, fn in fns.items():
            rows.append(
                dict(
                    tokens=N,
                    batch=B,
                    config=name,
                    ms=1e3 * timings[name].median,
                    spread=timings[name].spread,
                    x_attn=timings[name].median / base,
                    peak_mib=mib(step_peak_growth(fn, args.device)),
                    times_ms=[1e3 * t for t in timings[name].times],
                )
            )
    columns = [
        ("tokens", "N", ""),
        ("batch", "batch", ""),
        ("config", "config", ""),
        ("ms", "ms", ".1f"),
        ("spread", "±", ".0%"),
        ("x_attn", "x attn", ".2f"),
        ("peak_mib", "peak MiB", ".1f"),
    ]
    print(format_table(rows, columns))
    kernels = kernel_report(args) if args.kernels else []
    if kernels:
        print("\nTriton kernels compiled for sm_90 (ptxas -v), student and teacher as above:")
        print(
            format_table(
                kernels,
                [
                    ("dtype", "dtype", ""),
                    ("g", "g", ""),
                    ("tiles", "tiles", ""),
                    ("kernel", "kernel", ""),
                    ("registers", "registers", ""),
                    ("spill_bytes", "spill B", ""),
                    ("shared_kib", "shared KiB", ".0f"),
                    ("tensor_cores", "tensor cores", ""),
                ],
            )
        )
    info["loadavg_end"] = load_average()
    info["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n{info['wall_s']:.1f} s; load average at end {info['loadavg_end']}")
    result = dict(benchmark="ce_loss", settings={**vars(args), "device": str(args.device)}, machine=info)
    result.update(rows=rows, kernels=kernels)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
