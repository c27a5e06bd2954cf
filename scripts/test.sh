#!/usr/bin/env bash
# The whole test suite in two lanes at once: the SLURM tests (a real cluster on loopback; mostly waiting
# on the scheduler: signals, requeues, time limits) beside every other test. Same tests as a plain
# `pytest -q`, about the SLURM lane's length less wall time on a 2-core machine.
# Extra arguments go to both lanes (e.g. -x, --durations=20). Exit status: the first lane that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
slurm_log=$(mktemp "${TMPDIR:-/tmp}/attnxfer-slurm-lane.XXXXXX")
"$py" -m pytest -q -p no:cacheprovider -m slurm "$@" >"$slurm_log" 2>&1 &
slurm_pid=$!
"$py" -m pytest -q -m "not slurm" "$@"
rest=$?
wait "$slurm_pid"
slurm=$?
echo "---- SLURM lane (pytest -m slurm) ----"
cat "$slurm_log"
[ "$slurm" -eq 5 ] && slurm=0 # no SLURM test collected (ATTNXFER_SKIP_SLURM=1): nothing failed
[ "$rest" -ne 0 ] && exit "$rest"
exit "$slurm"
