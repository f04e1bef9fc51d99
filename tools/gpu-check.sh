#!/usr/bin/env bash
# The GPU checks, as one prepared run on a lent GPU machine (DEVELOPERS.md,
# "GPU work"): the GPU-marked tests and the real-CuPy cells of the collective
# battery, then the device benchmarks beside gloo on torch CUDA tensors.
#
#   tools/gpu-check.sh [tests] [bench] [quick]     (default: tests bench)
#
# Run from the project root. Where pyzmq is missing (the GPU machine), it is
# installed from .whl/ (../shared/tools/device-wheels.sh fills it). Logs go to
# $OUT (default /tmp/gpu-check); a short table is printed last.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ! python3 -c "import zmq" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .whl/*.whl \
        || exit 1
    export PYTHONPATH="$HOME/site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
phases=${*:-tests bench}
summary="$OUT/summary.txt"
: > "$summary"
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, numpy, cupy, zmq; print('python', sys.version.split()[0], \
'numpy', numpy.__version__, 'cupy', cupy.__version__, 'pyzmq', zmq.__version__, \
'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())"
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
    nproc
} 2>&1 | tee -a "$summary"

step() {    # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$summary"
}

for phase in $phases; do
    case $phase in
    tests)
        step gpu-tests 180 python3 -m pytest -q -ra -p no:cacheprovider --timeout 90 \
            --junitxml="$OUT/gpu-tests.xml" \
            tests/test_collectives_gpu.py tests/test_mesh_gpu_p2p.py \
            "tests/test_collectives_torchdist.py::test_ddp_with_ranks_sharing_one_gpu" \
            tests/test_collectives.py -k "gpu or ddp or (cupy and not fakecupy)"
        tail -n 25 "$OUT/gpu-tests.log" | grep -E "passed|failed|error|FAILED|ERROR|SKIPPED" \
            | cut -c1-220 >> "$summary"
        ;;
    quick)
        step gpu-quick 120 python3 -m pytest -q -x -ra -p no:cacheprovider --timeout 60 \
            "tests/test_collectives_gpu.py::test_collectives_on_cupy_arrays_one_gpu[2-1]" \
            tests/test_mesh_gpu_p2p.py
        tail -n 15 "$OUT/gpu-quick.log" | cut -c1-220 >> "$summary"
        ;;
    retest)     # the tests that failed last time: RETEST="node ids"
        step gpu-retest 150 python3 -m pytest -q -ra -p no:cacheprovider --timeout 90 $RETEST
        tail -n 12 "$OUT/gpu-retest.log" | cut -c1-220 >> "$summary"
        ;;
    diag)       # what the GPU host costs (tools/gpu_probe.py), the host path beside gloo
        step probe 120 bash -c "python3 tools/gpu_probe.py costs; for n in 1 2 4; do \
python3 tools/gpu_probe.py contend \$n; done; python3 tools/gpu_probe.py profile ipc 65536 4; \
python3 tools/gpu_probe.py profile staged 65536 4; python3 tools/gpu_probe.py profile ipc 8 2"
        grep -E "^(costs|contend|profile)" "$OUT/probe.log" >> "$summary"
        step bench-4-host 80 python3 -m collectives.tools.bench -n 4 --sizes 8,64K,16M,256M \
            --compare gloo
        grep -E "^  +[0-9]" "$OUT/bench-4-host.log" | cut -c1-140 | sed "s/^/4 host /" \
            >> "$summary"
        step bench-4-simple 60 python3 -m collectives.tools.bench --device cuda --path simple \
            -n 4 --sizes 64K,16M,256M
        grep -E "^  +[0-9]" "$OUT/bench-4-simple.log" | cut -c1-140 | sed "s/^/4 simple /" \
            >> "$summary"
        MESH_COLL_SEGMENT=8M step bench-4-seg8M 60 python3 -m collectives.tools.bench \
            --device cuda --path ring -n 4 --sizes 16M,256M
        grep -E "^  +[0-9]" "$OUT/bench-4-seg8M.log" | cut -c1-140 | sed "s/^/4 ring 8M /" \
            >> "$summary"
        ;;
    bench)
        sizes=8,1K,64K,1M,16M,64M,256M
        for path in ipc staged ring; do
            step "bench-4-$path" 80 python3 -m collectives.tools.bench --device cuda \
                --path "$path" -n 4 --sizes "$sizes" --compare gloo
            grep -E "^#  +size|^  +[0-9]" "$OUT/bench-4-$path.log" | cut -c1-140 \
                | sed "s/^/4 ranks $path /" >> "$summary"
        done
        for path in ipc staged; do
            step "bench-2-$path" 35 python3 -m collectives.tools.bench --device cuda \
                --path "$path" -n 2 --sizes 8,1M,64M --compare gloo
            grep -E "^  +[0-9]" "$OUT/bench-2-$path.log" | cut -c1-140 \
                | sed "s/^/2 ranks $path /" >> "$summary"
        done
        ;;
    esac
done
echo "----- summary"
cat "$summary"
