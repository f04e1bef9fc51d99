#!/bin/bash
# A/B of the recorded figures: a base revision against the working tree,
# alternating, in one process tree (load hits both). Run as root from the
# repository root (bench_hosts makes network namespaces):
#     tools/ab.sh BASE [ROUNDS]
# BASE goes into a temporary `git worktree`, removed on the way out.
set -u
base=${1:?usage: tools/ab.sh BASE [ROUNDS]}
rounds=${2:-2}
head=$(pwd)
PY=${PY:-$head/.venv/bin/python}
tree=$(mktemp -d /tmp/ab-base.XXXXXX)
git worktree add -f --detach "$tree" "$base" -q || exit 2
trap 'git -C "$head" worktree remove --force "$tree"; git -C "$head" worktree prune' EXIT
for round in $(seq "$rounds"); do
  for t in "$tree" "$head"; do
    echo "=== $([ "$t" = "$tree" ] && echo "base $base" || echo head) round $round" \
         "$(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    cd "$t"
    export PYTHONPATH=$t
    timeout 300 "$PY" -m mesh.bench --sizes 64K:64M --trials 3 2>&1 | grep -v "^#" | tail -12
    timeout 300 "$PY" -m mesh.bench --transport tcp --sizes 64K:64M --trials 3 2>&1 \
      | grep -v "^#" | tail -12
    timeout 300 "$PY" -m collectives.tools.bench --op all_reduce -n 2 --sizes 8,1M,64M \
      --only meshrun --trials 3 2>&1 | grep -v "^#"
    timeout 300 "$PY" -m collectives.tools.bench --op all_reduce -n 4 --sizes 8,64M \
      --only meshrun --trials 3 2>&1 | grep -v "^#"
    timeout 600 "$PY" -m collectives.tools.bench_hosts --sizes 8,16M,64M --per-host 2 \
      --passes 3 --slow 0 --no-gloo 2>&1 | grep -v "^#" | tail -6
    timeout 600 "$PY" -m collectives.tools.bench_hosts --p2p --sizes 8,64K,1M,16M,64M \
      --per-host 1 --passes 3 --slow 0 --no-gloo 2>&1 | grep -v "^#" | tail -6
    cd "$head"
  done
done
