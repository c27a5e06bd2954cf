"""Is the search's proxy honest? Full conversions of candidates spanning a finished search's Pareto front.

For ``--count`` candidates picked along the front (evenly by speed; the next Pareto ranks fill up a short
front), plus the search's winner and the hand-designed zoo member with the best proxy score, this runs
the whole conversion (the `attnxfer convert` command the search's pareto.md gives its winner: the search's
``convert_recipe`` on the searched teacher and data, stage 1 + stage 2, the same budget for every candidate)
and reports Spearman's rank correlation (``scipy.stats.spearmanr``, rho and p-value) between the proxy score
(held-out map KL after the search's short stage 1; lower is better) and the final top-1, whatever it is. A
strongly negative rho means the proxy ranks candidates as the full conversion does.

    OMP_NUM_THREADS=1 python benchmarks/search_proxy.py runs/search/demo --count 10 --jobs 2 \
        --zoo all --out runs/search/demo_proxy [key=value ...]   # overrides for every conversion

Writes OUT/proxy.json and OUT/proxy.md (one row per conversion: formula, proxy KL, speed, top-1 with its
95 % Wilson interval, recovered share of the teacher's top-1, seconds). Each conversion's own report is in
OUT/NN/report.md; a rerun skips conversions whose report.json exists (a rerun that picks
other candidates, e.g. another --count, needs a new --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scipy.stats import spearmanr

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE),) if p not in sys.path]  # attnxfer from this checkout

from attnxfer.apps.run.uncertainty import correct_count, format_top1  # noqa: E402
from attnxfer.apps.search import winner_command, winner_of  # noqa: E402
from attnxfer.checkpoints.resume_point import ResumePoint  # noqa: E402
from attnxfer.config import TrainConfig  # noqa: E402
from attnxfer.config.overrides import merge_values  # noqa: E402
from attnxfer.models.attention import transferable_attentions  # noqa: E402
from attnxfer.search import SearchState, objectives, pareto_ranks  # noqa: E402
from attnxfer.sources.teacher import load_teacher  # noqa: E402


def pick(state: SearchState, count: int, min_speed: float, zoo: str = "best") -> list[dict]:
    """``count`` candidates spanning the front (then the next ranks), plus the winner and the zoo member with
    the best proxy score (``zoo="all"``: every fitted zoo member)."""
    done = state.evaluated
    ranks = pareto_ranks([objectives(c) for c in done])
    chosen: list[dict] = []
    for rank in range(max(ranks) + 1):
        members = sorted((c for c, r in zip(done, ranks) if r == rank), key=lambda c: -c["speed"])
        room = count - len(chosen)
        if room <= 0:
            break
        if len(members) <= room:
            chosen += members
        else:  # evenly along this front, both ends included
            chosen += [members[round(i * (len(members) - 1) / max(1, room - 1))] for i in range(room)]
    front = [c for c, r in zip(done, ranks) if r == 0]
    extra = [winner_of(front, min_speed)]
    members = [c for c in done if c["origin"].startswith("zoo:")]
    if members:
        extra += members if zoo == "all" else [min(members, key=lambda c: c["kl"])]
    for c in extra:
        if c is not None and all(c["formula"] != d["formula"] for d in chosen):
            chosen.append(c)
    return chosen


def convert_one(
    index: int, cand: dict, cfg: TrainConfig, depth: int, out: Path, overrides: list[str]
) -> dict:
    run = out / f"{index:02d}"
    report = run / "report.json"
    if not report.is_file():
        # pareto.md's command (`python -m attnxfer convert ...`); a later key wins over its run_dir and teacher
        argv = shlex.split(winner_command(cfg, cand["formula"], depth))
        cmd = [sys.executable, "-m", *argv, f"run_dir={run}", "log.progress=false", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (out / f"{index:02d}.log").write_text(shlex.join(cmd) + "\n" + res.stdout + res.stderr)
        if res.returncode != 0:
            return {**cand, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    r = json.loads(report.read_text())
    names = r["student"]["spec"]["attention"]  # one name, or one per block where the search fitted some
    if cand["formula"] not in ([names] if isinstance(names, str) else names):  # a rerun that picked others
        return {
            **cand,
            "error": f"{run} holds {r['student']['spec']['attention']}'s conversion: give a new --out",
        }
    return {
        **cand,
        "run_dir": str(run),
        "top1": r["student_top1"],
        "after_stage1": r["top1"]["after_stage1"],
        "teacher_top1": r["top1"]["teacher"],
        "recovered_pct": r["recovered_pct"],
        "val_size": r["data"]["val_size"],
        "seconds": r["seconds"]["total"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished `attnxfer search` RUN_DIR")
    p.add_argument("--count", type=int, default=10, help="candidates along the front (default 10)")
    p.add_argument("--jobs", type=int, default=1, help="conversions at once (each OMP_NUM_THREADS threads)")
    p.add_argument("--out", default=None, help="default RUN_DIR/proxy")
    p.add_argument(
        "--zoo", choices=("best", "all"), default="best", help="convert the best zoo member by proxy, or all"
    )
    args, extra = p.parse_known_args()
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides for every conversion are key=value)")
    point = ResumePoint.find(args.run_dir, verify_hash=False)  # the newest generation the search saved
    if point is None:
        p.error(f"{args.run_dir} holds no saved search generation (checkpoints/): give a search's RUN_DIR")
    if "state" not in point.state:  # another command's checkpoint, e.g. a training run's
        p.error(
            f"{args.run_dir} holds another command's checkpoints, not a search's: give a search's RUN_DIR"
        )
    cfg = merge_values(TrainConfig(), point.state["config"])
    state = SearchState.from_dict(point.state["state"])
    out = Path(args.out or Path(args.run_dir) / "proxy")
    out.mkdir(parents=True, exist_ok=True)
    chosen = pick(state, args.count, cfg.search.min_speed, args.zoo)
    # the teacher's attention layers: a search of some (search.layers) converts those, the others keep softmax
    t = cfg.teacher
    teacher, _ = load_teacher(t.spec, arch=t.arch, revision=t.revision, cache_dir=t.cache_dir)
    depth = len(transferable_attentions(teacher))
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda ic: convert_one(ic[0], ic[1], cfg, depth, out, extra), enumerate(chosen)))
    wall = time.monotonic() - start
    good = [r for r in rows if "error" not in r]
    rho, pvalue = spearmanr([r["kl"] for r in good], [r["top1"] for r in good])
    rho1, pvalue1 = spearmanr([r["kl"] for r in good], [r["after_stage1"] for r in good])
    winner = winner_of(
        [
            c
            for c, r in zip(state.evaluated, pareto_ranks([objectives(c) for c in state.evaluated]))
            if r == 0
        ],
        cfg.search.min_speed,
    )
    summary = {
        "search": args.run_dir,
        "conversions": len(rows),
        "failed": [r for r in rows if "error" in r],
        "spearman_rho": float(rho),
        "spearman_p": float(pvalue),
        "spearman_rho_after_stage1": float(rho1),
        "spearman_p_after_stage1": float(pvalue1),
        "wall_seconds": wall,
        "load_average": os.getloadavg(),
        "winner": winner["formula"] if winner else None,
        "rows": rows,
    }
    (out / "proxy.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"Spearman rho(proxy KL, final top-1) = {rho:.3f} (p = {pvalue:.3g}) over {len(good)} conversions "
        f"({len(rows) - len(good)} failed); {wall / 60:.1f} min wall, load average {os.getloadavg()[0]:.1f}. "
        f"Against top-1 after stage 1 alone: rho = {rho1:.3f} (p = {pvalue1:.3g}).",
        "",
        "| formula | origin | proxy KL | speed | top-1 after stage 1 | final top-1 [95 % Wilson] | recovered | s |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in sorted(good, key=lambda r: r["kl"]):
        n = r["val_size"]
        top1 = format_top1(correct_count(r["top1"], n), n)
        lines.append(
            f"| `{r['formula']}` | {r['origin']} | {r['kl']:.4f} | {r['speed']:.2f} | {r['after_stage1']:.1f} | "
            f"{top1} | {r['recovered_pct']:.1f}% | {r['seconds']:.0f} |"
        )
    for r in rows:
        if "error" in r:
            lines.append(
                f"| `{r['formula']}` | {r['origin']} | {r['kl']:.4f} | {r['speed']:.2f} | failed: {r['error']} | | | |"
            )
    (out / "proxy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
