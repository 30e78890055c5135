#!/usr/bin/env bash
# The device check: one run of at most 8 minutes on a lent GPU, from the repository root
# with PYTHONPATH=. (set here when unset).
#
#   bash experiments/device_check.sh [--data_dir=.dev/mnist] [--precision=both]
#       [--out=DIR] [--budget=SECONDS]
#   DEVICE_CHECK_PLATFORM=cpu DEVICE_CHECK_TINY=1 bash experiments/device_check.sh
#
# What it runs, in this order (each part under `timeout`, its time the smaller of its
# own and what is left of --budget, default 450 s, less 15 s kept for the table):
#   env               Python, jax (backend, devices), PyTorch (CUDA), nvidia-smi: env.json
#   bench-P           experiments/benchmark.py --config=seed --platform=gpu --precision=P
#                     --repeats=1 (10 epochs per stage, all of MNIST): sae_jax cold,
#                     sae_jax warm, PyTorch on CUDA; P is default (TF32 on both sides)
#                     first, then highest (full float32) after the tests and the sweep;
#                     --precision=default|highest runs one
#   seed-D            experiments/mnist.py --config=seed --epochs=2 --config.dtype=D, D
#                     float32 then bfloat16 (computed in D on float32 params): test
#                     accuracy, wall seconds, and the time per step of every stage's
#                     second epoch (the first compiles, or reads the default cache)
#   one-device,       with two devices or more (else a status line "one device"): the
#   all-devices       seed-float32 run (one epoch) on the first device alone
#                     (CUDA_VISIBLE_DEVICES=0), then data parallel over all of them
#   tests             the test suite on the GPU at highest matmul precision
#                     (JAX_DEFAULT_MATMUL_PRECISION=highest: the tolerances are set for
#                     float32, not TF32), pytest -n <cores> --dist loadfile, GPU memory
#                     not preallocated, without the files that run on the CPU by design
#                     (test_readme, test_notebook, test_mutate, test_benchmark,
#                     test_device_check, commands/test_distributed)
#   sweep             experiments/sweep.py --config=sda3 --seeds=5: one vmapped sweep of 5
#                     seeds, a fresh compilation cache
#   tests-cpu-rerun   the tests that failed on the GPU, again on the CPU (JAX_PLATFORMS=cpu):
#                     which failures are the GPU's own
#   tests-tf32        the numerical test files at JAX's default precision (TF32 on the
#                     GPU), to find the tolerances too tight for TF32 (not on the CPU)
# What it writes, into --out (default $OUT, else device_check_out): device_check.md (one
# markdown table: every figure, its target, the file and key it came from), status.tsv
# (each part's exit status, seconds and time), <part>.log, env.json, bench-P.json (the
# benchmark's --json), tests.xml, tests-cpu-rerun.xml, tests-tf32.xml (JUnit),
# sweep/sweep.json, <run>/summary.json and <run>/metrics.jsonl of each training run. Call
# it with a limit of about 500 s (--budget plus the kill margin).
#
# DEVICE_CHECK_PLATFORM=cpu runs it on the CPU; DEVICE_CHECK_TINY=1 shrinks every part
# (the tiny benchmark config on 100 examples, one epoch; tests/config/test_schema.py
# only, without xdist; a tiny sweep of 2 seeds; tiny's training runs on the bundled
# sample, every epoch), so that tests/test_device_check.py can run it: about a minute of
# CPU time.
# Exit status: 0 when every part ran and exited 0, 1 when one did not, 2 for a bad flag.
set -u

DATA_DIR=.dev/mnist
PRECISION=both
OUT_DIR=${OUT:-device_check_out}
BUDGET=450
for arg in "$@"; do
    case $arg in
        --data_dir=*) DATA_DIR=${arg#*=} ;;
        --precision=*) PRECISION=${arg#*=} ;;
        --out=*) OUT_DIR=${arg#*=} ;;
        --budget=*) BUDGET=${arg#*=} ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: $arg: unknown flag (see --help)" >&2; exit 2 ;;
    esac
done
PLATFORM=${DEVICE_CHECK_PLATFORM:-gpu}
TINY=${DEVICE_CHECK_TINY:-0}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.}

fail() { echo "error: $1" >&2; exit 2; }
case $PLATFORM in cpu | gpu) ;; *) fail "DEVICE_CHECK_PLATFORM=$PLATFORM: choose cpu or gpu" ;; esac
case $PRECISION in
    both) PRECISIONS="default highest" ;;
    default | highest) PRECISIONS=$PRECISION ;;
    *) fail "--precision=$PRECISION: choose default, highest or both" ;;
esac
[[ $BUDGET =~ ^[0-9]+$ ]] && ((BUDGET >= 30)) || fail "--budget=$BUDGET: a whole number of seconds >= 30"
if [[ $TINY != 1 && ! -d $DATA_DIR ]]; then
    fail "--data_dir=$DATA_DIR: not a directory (the four MNIST IDX files)"
fi
[[ -f experiments/benchmark.py ]] || fail "run it from the repository root"
mkdir -p "$OUT_DIR" || fail "--out=$OUT_DIR: cannot create it"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STATUS=$OUT_DIR/status.tsv
: >"$STATUS"
DEADLINE=$((SECONDS + BUDGET - 15))
FAILED=0

# run_part NAME SECONDS COMMAND...: COMMAND with its output in NAME.log, for at most
# SECONDS (or what is left); one line of status.tsv.
run_part() {
    local name=$1 cap=$2 left start rc
    shift 2
    left=$((DEADLINE - SECONDS))
    ((cap > left)) && cap=$left
    if ((cap < 10)); then
        printf '%s\tskip\t0\t%s\t%s\n' "$name" "$cap" "$*" >>"$STATUS"
        FAILED=1
        return
    fi
    echo "== $name (at most ${cap}s): $*"
    start=$SECONDS
    timeout --kill-after=10 "$cap" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$cap" "$*" >>"$STATUS"
    ((rc == 0)) || FAILED=1
    tail -n 3 "$OUT_DIR/$name.log"
}

WORKERS=$(nproc)
TESTS=(tests --ignore=tests/test_readme.py --ignore=tests/test_notebook.py
    --ignore=tests/test_mutate.py --ignore=tests/test_benchmark.py
    --ignore=tests/test_device_check.py --ignore=tests/commands/test_distributed.py
    --ignore=tests/test_docstrings.py --ignore=tests/test_docs.py --ignore=tests/test_wheel.py
    --ignore=tests/test_types.py)
NUMERIC=(tests/test_models.py tests/test_losses.py tests/test_corruption.py tests/training
    tests/workdir/test_checkpoint.py tests/commands/test_own_data.py
    tests/commands/test_sweep_equals_runs.py tests/test_parallel.py)
BENCH=(--config=seed "--data_dir=$DATA_DIR" --repeats=1)
SWEEP=(--config=sda3 --seeds=5 "--data_dir=$DATA_DIR")
TRAIN=(--config=seed --epochs=2 "--data_dir=$DATA_DIR")
if [[ $TINY == 1 ]]; then
    WORKERS=0
    TESTS=(tests/config/test_schema.py)
    BENCH=(--config=tiny --train_examples=100 --test_examples=50 --epochs=1 --repeats=1)
    SWEEP=(--config=tiny --seeds=2 --epochs=1 --config.train_examples=200
        --config.test_examples=100)
    TRAIN=(--config=tiny)
    [[ $PRECISION == both ]] && PRECISIONS=default
fi
PYTEST=("$PY" -m pytest -q -n "$WORKERS" --dist loadfile -o "cache_dir=$WORK/pytest")
FIRST=${PRECISIONS%% *}
REST=${PRECISIONS#"$FIRST"}
bench() {
    run_part "bench-$1" 120 "$PY" experiments/benchmark.py "${BENCH[@]}" \
        "--platform=$PLATFORM" "--precision=$1" "--json=$OUT_DIR/bench-$1.json"
}

# train NAME VAR=VALUE [FLAGS...]: the training command as a part, into OUT_DIR/NAME,
# with VAR=VALUE in its environment.
train() {
    local name=$1 setting=$2
    shift 2
    run_part "$name" 60 env "$setting" "$PY" experiments/mnist.py "${TRAIN[@]}" \
        "--platform=$PLATFORM" "--workdir=$OUT_DIR/$name" --no_figures "$@"
}

run_part env 30 "$PY" experiments/benchmark_device.py env "$OUT_DIR"
bench "$FIRST"
for dtype in float32 bfloat16; do
    train "seed-$dtype" "DEVICE_CHECK_PART=seed-$dtype" "--config.dtype=$dtype"
done
ONLY=$([[ $PLATFORM == cpu ]] && echo cpu)
DEVICES=$(JAX_PLATFORMS=$ONLY "$PY" -c 'import jax; print(jax.device_count())' 2>/dev/null)
if ((${DEVICES:-0} >= 2)); then
    train one-device CUDA_VISIBLE_DEVICES=0 --epochs=1
    train all-devices DEVICE_CHECK_PART=all-devices --epochs=1
else
    printf 'all-devices\tone device\t0\t0\tjax.device_count() = %s\n' "${DEVICES:-?}" >>"$STATUS"
fi
run_part tests 170 env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    JAX_DEFAULT_MATMUL_PRECISION=highest "${PYTEST[@]}" "--junitxml=$OUT_DIR/tests.xml" \
    "${TESTS[@]}"
run_part sweep 120 "$PY" experiments/sweep.py "${SWEEP[@]}" "--platform=$PLATFORM" \
    "--workdir=$OUT_DIR/sweep" "--compilation_cache=$WORK/sweep-cache"
for precision in $REST; do
    bench "$precision"
done
if grep -q '<failure\|<error' "$OUT_DIR/tests.xml" 2>/dev/null; then
    run_part tests-cpu-rerun 60 env JAX_PLATFORMS=cpu "${PYTEST[@]}" --lf \
        "--junitxml=$OUT_DIR/tests-cpu-rerun.xml" "${TESTS[@]}"
fi
if [[ $PLATFORM != cpu ]]; then
    run_part tests-tf32 90 env XLA_PYTHON_CLIENT_PREALLOCATE=false "${PYTEST[@]}" \
        -o "cache_dir=$WORK/pytest-tf32" "--junitxml=$OUT_DIR/tests-tf32.xml" "${NUMERIC[@]}"
fi
"$PY" experiments/benchmark_device.py table "$OUT_DIR" || FAILED=1
exit "$FAILED"
