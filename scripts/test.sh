#!/usr/bin/env bash
# The whole test suite in two lanes at once: the SLURM tests (a real cluster on loopback; mostly waiting
# on the scheduler: signals, requeues, time limits) beside every other test, those in two pytest-xdist
# workers (a test file stays on one worker: its module fixtures are built once) of one intra-op thread
# each: with two threads each, the workers and the SLURM lane spin on 2 cores and gain nothing
# (docs/testing.md has the timings). Same tests as a plain `pytest -q`. Extra arguments go to both
# lanes (e.g. -x, --durations=20; -n 8 on a bigger machine). Exit status: the first lane that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
slurm_log=$(mktemp "${TMPDIR:-/tmp}/attnxfer-slurm-lane.XXXXXX")
trap 'rm -f "$slurm_log"' EXIT # printed below; not left in /tmp
"$py" -m pytest -q -p no:cacheprovider -m slurm "$@" >"$slurm_log" 2>&1 &
slurm_pid=$!
OMP_NUM_THREADS=1 "$py" -m pytest -q -n 2 --dist loadfile -m "not slurm" "$@"
rest=$?
wait "$slurm_pid"
slurm=$?
echo "---- SLURM lane (pytest -m slurm) ----"
cat "$slurm_log"
[ "$slurm" -eq 5 ] && slurm=0 # no SLURM test collected (ATTNXFER_SKIP_SLURM=1): nothing failed
[ "$rest" -ne 0 ] && exit "$rest"
exit "$slurm"
