"""Wall time and memory of `attnxfer inspect`'s measurement: ViT-B/16 vs ViT-B/16 (random weights).

One run: 64 images at 224 px (197 tokens, 12 layers x 12 heads), batches of 16, the default settings
(floor on 16 images, top-5, 16 probe rows per image). Reported:

* wall time of `compare_attention` (every metric, the floor and the head assignment), and of the model
  forwards alone (teacher, student, the floor's noisy teacher) on the same images: the rest is the
  map metrics;
* memory: this process's resident high-water mark (VmHWM) growth over the run, beside what every
  N x N map of every layer for all images would take (what the walk never holds) and the budget of one
  layer's row chunk;
* the machine's load average before and after (the machine may be shared: read times with it).

    python benchmarks/inspect_speed.py              # the figure in the report
    python benchmarks/inspect_speed.py --quick      # ViT-Ti, 8 images: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE),) if p not in sys.path]

import torch  # noqa: E402

from attnxfer.analysis import compare_attention, layer_qk  # noqa: E402
from attnxfer.models.attention.numerics import ROW_CHUNK_ELEMENTS  # noqa: E402
from attnxfer.sources import load_teacher  # noqa: E402


def _vm(key: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="vit_tiny_patch16_224 on 8 images")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.quick:
        args.arch, args.images = "vit_tiny_patch16_224", 8
    torch.manual_seed(0)
    teacher, _ = load_teacher(args.arch, pretrained=False)
    torch.manual_seed(1)
    student, _ = load_teacher(args.arch, pretrained=False)
    x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    batches = [x[i : i + args.batch_size] for i in range(0, args.images, args.batch_size)]
    load_before = os.getloadavg()
    rss_before = _vm("VmRSS")

    start = time.perf_counter()
    insp = compare_attention(teacher, {"student": student}, batches, progress=True)
    total = time.perf_counter() - start
    hwm = _vm("VmHWM")

    start = time.perf_counter()
    for i, b in enumerate(batches):
        layer_qk(teacher, b)
        layer_qk(student, b)
        if i * args.batch_size < 16:
            layer_qk(teacher, b[: max(0, 16 - i * args.batch_size)])
    forwards = time.perf_counter() - start

    attn = teacher.blocks[0].attn
    depth, heads, n = len(teacher.blocks), attn.num_heads, insp.tokens["tokens"]
    result = {
        "arch": args.arch,
        "images": args.images,
        "batch_size": args.batch_size,
        "tokens": n,
        "threads": torch.get_num_threads(),
        "compare_attention_s": round(total, 1),
        "model_forwards_s": round(forwards, 1),
        "metrics_s": round(total - forwards, 1),
        "rss_growth_peak_mib": round((hwm - rss_before) / 2**20),
        "all_maps_all_layers_mib": round(args.images * heads * n * n * 4 * depth / 2**20),
        "one_map_tensor_chunk_budget_mib": ROW_CHUNK_ELEMENTS * 4 // 2**20,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "mean_js_layer0": insp.students["student"][0].mean["js"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
