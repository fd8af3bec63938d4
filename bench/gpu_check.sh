#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and a CUDA build of torch, run the engine's tests on
# cuda (tests/engine/test_execute_devices.py), then bench/run.py for slerp-merge with --device cuda
# on the 953M and 2x pairs and the 2.5 GB tensor. Everything lands in $OUT (default
# bench/results/gpu): gpu.txt (nvidia-smi), tests.log, bench.log, RESULTS.md, bench.png, results.json.
#
#   bash bench/gpu_check.sh                  # on the GPU machine, from a checkout of this repository
#   bash bench/gpu_check.sh --fetch-wheels   # for a GPU machine without PyPI: on one with PyPI, download
#                                            # the Python 3.12 wheels the check needs beyond torch into
#                                            # .whl/; copy .whl/ along and the check installs them first
#
# Overrides: PYTHON (python3), DEVICE (cuda), LAYERS ("16 32"), BIG (1: also the 2.5 GB tensor),
# REPEATS (2; the 953M pair 3). Exit status: the tests' if they failed, else the benchmark's.
set -uo pipefail
cd "$(dirname "$0")/.."

# what `python -m slerp_plugin mergekit` imports beyond what that image holds, at the pinned versions
NEEDED='^(pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions)=='

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    grep -E "$NEEDED" constraints.txt | xargs python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl || exit 1
    ls .whl
    exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/slerp-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/slerp-site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    >"$OUT/gpu.txt" 2>&1

"$PY" -m pytest -q -p no:cacheprovider -rs tests/engine/test_execute_devices.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

big=--big-tensor
[[ "${BIG:-1}" == 1 ]] || big=--no-big-tensor
# shellcheck disable=SC2086  # LAYERS is a list
"$PY" bench/run.py --systems ours --device "${DEVICE:-cuda}" --layers ${LAYERS:-16 32} "$big" \
    --repeats "${REPEATS:-2}" --target-repeats "$(( ${REPEATS:-2} + 1 ))" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}

[[ $tests -ne 0 ]] && exit "$tests"
exit "$bench"
