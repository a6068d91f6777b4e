#!/usr/bin/env bash
# Runs the GPU tier, the GPU benchmark and the comparison with other libraries on a CUDA machine,
# and keeps their logs.
#
#     bash gpu_tests/run_on_device.sh [OUTDIR]
#
# Wheels for dependencies the machine lacks (crc32c) may sit in .whl/; they are installed into a
# private target first, for machines that cannot reach a package index. Logs and the JUnit report
# go to OUTDIR (default: $OUT, else /tmp/asyncckpt-gpu).
set -u
out=${1:-${OUT:-/tmp/asyncckpt-gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # absolute: tests run snippets elsewhere
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/asyncckpt-site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/asyncckpt-site"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 - <<'PY'
import platform, importlib.metadata, numpy, cupy
print("python", platform.python_version(), "numpy", numpy.__version__,
      "tensorstore", importlib.metadata.version("tensorstore"),
      "cupy", cupy.__version__, "cuda runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "driver", cupy.cuda.runtime.driverGetVersion())
try:
    import torch; print("torch", torch.__version__)
except Exception as exc:
    print("torch unavailable:", exc)
PY
    nproc; free -g | head -2; df -h /tmp | tail -1
} 2>&1 | tee "$out/env.txt"
# The project's addopts without its `-n auto`: one process on one GPU, with or without pytest-xdist installed.
timeout "${GPU_TESTS_TIMEOUT:-180}" python3 -m pytest gpu_tests -p no:cacheprovider -p no:xdist -q -rfEs \
    -o "addopts=--strict-markers -m 'not slow'" \
    --timeout 60 --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
timeout "${GPU_BENCH_TIMEOUT:-120}" python3 benchmarks/gpu_bench.py ${GPU_BENCH_ARGS:---size-mib 1024 --repeat 3} \
    2>&1 | tee "$out/gpu_bench.log"
if [ "${GPU_COMPARE:-1}" = 1 ]; then  # GPU_COMPARE=0 skips the comparison with other libraries
    timeout "${GPU_COMPARE_TIMEOUT:-300}" python3 benchmarks/gpu_compare.py ${GPU_COMPARE_ARGS:---repeat 2 --timeout 90} \
        2>&1 | tee "$out/gpu_compare.log"
fi
