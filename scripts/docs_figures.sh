#!/usr/bin/env bash
# Make the pictures the documentation shows (docs/figures/*.png) again, each from a real run of the project's
# own commands on this machine (CPU is enough), then copy it into docs/figures. Runs go under runs/docs/
# (git-ignored) and are reused where their config is unchanged (the demo's runs are keyed by their config).
#
#   bash scripts/docs_figures.sh [demo|convert|slurm|inspect|search|recall|recall_deep|recall_2hop|all]...     (default: all)
#
#   demo     attnxfer demo        -> demo_curves.png, demo_attention.png, demo_agreement.png, mae_reconstructions.png,
#                                    study_curves.png (its copy and distillation students are one study)
#   convert  the demo's MAE teacher converted into a ReLU-linear encoder without labels, then attnxfer inspect
#                                                 -> convert_cls_maps.png
#   slurm    a two-point attnxfer submit --sweep on a loopback SLURM cluster (root: the tests' fixture
#            installs and starts it), then attnxfer inspect of the two students -> slurm_sweep_agreement.png
#   inspect  attnxfer inspect's per-stage query pictures on the tiny Swin, PVTv2 and Hiera models of
#            tests/families, on an animal-mnist image at 32 px -> inspect_*_stage*.png
#   search   the demo's supervised teacher, then attnxfer search -c search/demo -> search_demo_pareto.png
#   recall   the recall teacher (recall/teacher, exported), the zoo converted from it in one study
#            (recall/convert_zoo), the selector's hybrids under budgets 1.25x-2.5x (recall/convert_budgets) and the
#            search's proxy against the zoo (benchmarks/zoo_proxy.py) -> recall_pareto.png (about 2 hours here)
#   recall_deep  the four-block recall teacher (recall/teacher_deep, exported), the selector's hybrids at 1.5x and
#            2x held at 4,096 tokens (recall/convert_budgets_deep), every uniform placement of one and of two
#            softmax blocks (recall/convert_interleave_deep), all timed in one benchmarks/hybrid_speed.py run at
#            4,096 tokens -> recall_pareto_deep.png (about 2 hours here)
#   recall_2hop  the six-block two-hop recall teacher (recall/teacher_2hop, exported), the selector's hybrids at
#            1.5x and 2x held at 4,096 tokens (recall/convert_budgets_2hop), every uniform placement of two and of
#            three softmax blocks (recall/convert_interleave_2hop), the other candidates in every block
#            (recall/convert_single_2hop), timed in one benchmarks/hybrid_speed.py run -> recall_pareto_2hop.png
#            (about 3 hours here: the teacher 43 min, the studies side by side on one thread each)
#
# convert and slurm use the demo's MAE teacher: run demo first (or together: `all` runs them in order).
# tests/project/test_docs_site.py checks that every figure the pages show is made here.
set -euo pipefail
cd "$(dirname "$0")/.."
AX=${ATTNXFER:-.venv/bin/attnxfer}
PY=${PYTHON:-.venv/bin/python}
RUNS=runs/docs
FIG=docs/figures
mkdir -p "$RUNS"

mae_teacher() { # the last demo's MAE encoder (recipe demo/mae_pretrain), exported in timm's layout where the
    # demo publishes it (a mae-<hash>/ of other settings, an earlier demo's, may lie beside the current one)
    local found="$RUNS/demo/mae/export"
    [ -f "$found/model.safetensors" ] || { echo "no MAE teacher in $RUNS/demo: run \`bash $0 demo\` first" >&2; exit 1; }
    echo "$found"
}

demo_runs() { # the last demo's MAE run and its copy/distillation study, one a line, as its results.json names them
    "$PY" - "$RUNS/demo/results.json" <<'PY'
import json, sys
from pathlib import Path

results = json.loads(Path(sys.argv[1]).read_text())
print(results["teachers"]["mae"]["run_dir"])
runs = [Path(seeds[0]["run_dir"]).parent for seeds in results["rows"].values()]
print(next(p for p in runs if p.name.startswith("mae_study-")))
PY
}

demo() {
    "$AX" demo --out "$RUNS/demo"
    cp "$RUNS/demo/curves.png" "$FIG/demo_curves.png"
    cp "$RUNS/demo/attention.png" "$FIG/demo_attention.png"
    cp "$RUNS/demo/agreement.png" "$FIG/demo_agreement.png"
    local runs # this demo's, not an earlier one's of other settings beside them
    runs=$(demo_runs)
    cp "$(ls "${runs%%$'\n'*}"/pictures/val-reconstruction-step*.png | tail -n 1)" "$FIG/mae_reconstructions.png"
    cp "${runs#*$'\n'}/study.png" "$FIG/study_curves.png"
}

convert() {
    local teacher
    teacher=$(mae_teacher)
    "$AX" convert -c convert/demo_relu_linear "teacher.spec=local-dir:$teacher" data.labels=false \
        transfer.logit_distill=0 "run_dir=$RUNS/convert_mae_relu_linear"
    "$AX" inspect "local-dir:$teacher" "$RUNS/convert_mae_relu_linear/stage2" --data animal_mnist \
        --out "$RUNS/inspect_convert" --overwrite
    cp "$(ls "$RUNS"/inspect_convert/cls_maps_*_img0.png | head -n 1)" "$FIG/convert_cls_maps.png"
}

slurm() {
    local teacher cluster="$RUNS/slurm-cluster"
    teacher=$(mae_teacher)
    eval "$("$PY" tests/cluster/slurm/loopback_cluster.py start "$cluster" 2 | grep '^export ')"
    trap '"$PY" tests/cluster/slurm/loopback_cluster.py stop "$cluster"' RETURN
    rm -rf "$RUNS/sweep-atd"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # two jobs share the machine: a thread each (the jobs inherit it)
    "$AX" submit -c demo/distill "teacher.spec=local-dir:$teacher" "run_dir=$RUNS/sweep-atd" \
        --sweep transfer.atd_weight=0.3,3 --time 120 --wait
    "$AX" inspect "local-dir:$teacher" "$RUNS"/sweep-atd/000_* "$RUNS"/sweep-atd/001_* --data animal_mnist \
        --out "$RUNS/inspect_sweep" --overwrite
    cp "$RUNS/inspect_sweep/curves.png" "$FIG/slurm_sweep_agreement.png"
}

inspect() {
    "$PY" - "$RUNS/inspect_hier" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [".", "tests"]  # the tests import their helpers as top-level modules
from attnxfer.apps.inspect.inspect import LoadedModel, write_report
from attnxfer.analysis.compare import compare_attention
from attnxfer.data import build_dataset
from tests.families.test_inspect_hier import _models

out = Path(sys.argv[1])
image = build_dataset("animal_mnist", "val")[0][0]  # one real image, 28 px, one channel
x = F.interpolate(image[None], size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
for family, picture, figure in (
    ("swin", "queries_student_stage0_img0.png", "inspect_swin_stage0.png"),
    ("pvt_v2", "queries_student_stage0_img0.png", "inspect_pvt_v2_stage0.png"),
    ("hiera", "queries_student_stage1_img0.png", "inspect_hiera_stage1.png"),
):
    teacher, student = _models(family, 0), _models(family, 1)
    insp = compare_attention(teacher, {"student": student}, [x], floor_images=1)
    t, s = LoadedModel("teacher", teacher, "tests/families"), LoadedModel("student", student, "tests/families")
    write_report(out / family, insp, t, {"student": s}, x)
    shutil.copy(out / family / picture, Path("docs/figures") / figure)
EOF
}

search() {
    "$AX" train -c demo/teacher "run_dir=$RUNS/teacher"
    [ -f "$RUNS/teacher/export/model.safetensors" ] ||
        "$AX" export "$RUNS/teacher" "$RUNS/teacher/export" --weights raw
    OMP_NUM_THREADS=1 "$AX" search -c search/demo "teacher.spec=local-dir:$RUNS/teacher/export" \
        "run_dir=$RUNS/search"
    cp "$RUNS/search/pareto.png" "$FIG/search_demo_pareto.png"
}

recall() {
    local out=runs/recall # the recipes' own run_dir: the page's commands name these folders
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    [ -f "$out/teacher/export/model.safetensors" ] || {
        "$AX" train -c recall/teacher && "$AX" export "$out/teacher" "$out/teacher/export"
    }
    "$AX" study -c recall/convert_zoo
    "$AX" study -c recall/convert_budgets
    "$PY" benchmarks/zoo_proxy.py "$out/convert_zoo" --out "$out/zoo_proxy" search.fit_steps=40 \
        search.fit_batches=4 search.held_out_images=256
    "$PY" scripts/recall_pareto.py "$out/convert_zoo" "$out/convert_budgets" --out "$FIG/recall_pareto.png"
}

recall_deep() {
    local out=runs/recall
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    [ -f "$out/teacher_deep/export/model.safetensors" ] || {
        "$AX" train -c recall/teacher_deep && "$AX" export "$out/teacher_deep" "$out/teacher_deep/export"
    }
    "$AX" study -c recall/convert_budgets_deep
    "$AX" study -c recall/convert_interleave_deep
    local h=hedgehog s=softmax # the deep studies' students, one comma-separated name per block
    "$PY" benchmarks/hybrid_speed.py --tokens 4097 --width 64 --heads 2 --patch 4 --mlp-ratio 2 --batch 2 \
        --repeats 9 --attentions hedgehog performer focused_linear --json "$out/hybrid_speed_deep.json" \
        --hybrids "$s,focused_linear,performer,$s" "$s,focused_linear,performer,performer" "$s,$h,$h,$h" \
        "$h,$s,$h,$h" "$h,$h,$s,$h" "$h,$h,$h,$s" "$s,$h,$s,$h" "$h,$s,$h,$s"
    "$PY" scripts/recall_pareto.py "$out/convert_budgets_deep" "$out/convert_interleave_deep" \
        --speeds "$out/hybrid_speed_deep.json" --against auto_1.5 auto_2 --title "Recall, four-block teacher" \
        --out "$FIG/recall_pareto_deep.png"
}

recall_2hop() {
    local out=runs/recall
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # one thread each: the two studies run side by side
    [ -f "$out/teacher_2hop/export/model.safetensors" ] || {
        "$AX" train -c recall/teacher_2hop && "$AX" export "$out/teacher_2hop" "$out/teacher_2hop/export"
    }
    "$AX" study -c recall/convert_budgets_2hop &
    local budgets=$!
    "$AX" study -c recall/convert_interleave_2hop
    wait "$budgets"
    "$AX" study -c recall/convert_single_2hop
    local h=hedgehog s=softmax p=performer f=focused_linear # one comma-separated name per block
    "$PY" benchmarks/hybrid_speed.py --tokens 4097 --width 64 --depth 6 --heads 2 --patch 4 --mlp-ratio 2 \
        --batch 2 --repeats 9 --threads 1 --attentions $h $p $f --json "$out/hybrid_speed_2hop.json" \
        --hybrids "$s,$s,$f,$s,$f,$p" "$s,$s,$f,$f,$f,$p" "$s,$h,$h,$s,$h,$h" "$h,$s,$h,$h,$s,$h" \
        "$h,$h,$s,$h,$h,$s" "$s,$h,$s,$h,$s,$h" "$h,$s,$h,$s,$h,$s"
    "$PY" scripts/recall_pareto.py "$out/convert_budgets_2hop" "$out/convert_interleave_2hop" \
        "$out/convert_single_2hop" --speeds "$out/hybrid_speed_2hop.json" --against auto_1.5 auto_2 --title "Recall in two hops, six blocks" \
        --out "$FIG/recall_pareto_2hop.png"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] && [ "${targets[0]}" != all ] || targets=(demo convert slurm inspect search recall recall_deep recall_2hop)
for target in "${targets[@]}"; do
    case "$target" in
    demo | convert | slurm | inspect | search | recall | recall_deep | recall_2hop) echo "== $target" && "$target" ;;
    *) echo "unknown target $target (demo, convert, slurm, inspect, search, recall, recall_deep, recall_2hop, all)" >&2 && exit 2 ;;
    esac
done
