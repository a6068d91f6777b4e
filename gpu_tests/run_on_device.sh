#!/usr/bin/env bash
# The GPU tier as a developer and CI run it: the versions of everything first, then the GPU tests
# (JUnit report), the GPU benchmarks (gpu_bench.py, gpu_compare.py, gpu_train_overhead.py), all
# into one folder.
#
#     bash gpu_tests/run_on_device.sh [OUTDIR]
#
# OUTDIR defaults to $OUT, else ./gpu-results. It receives env.txt (device, driver, CUDA, torch,
# jax, cupy versions), gpu_tests.xml (JUnit) and gpu_tests.log, and one .md report per benchmark
# with its .log (stderr). Run from the repository root with the package installed (pip install -e
# ".[cuda,test]"); PYTHON picks the interpreter (default python3).
#
# Exit status: 0 when the tests pass and every benchmark ran; 1 when something failed (the other
# steps still run); 2 without a usable GPU -- the tier still runs and its report shows every test
# skipped with the reason, the benchmarks are skipped, and a CI runner that lost its GPU goes red
# instead of passing empty.
#
# Wheels for dependencies the machine lacks (crc32c) may sit in .whl/; they are installed into a
# private target first, for machines that cannot reach a package index. Time limits per step (s):
# GPU_TESTS_TIMEOUT, GPU_BENCH_TIMEOUT, GPU_COMPARE_TIMEOUT, GPU_TRAIN_TIMEOUT; arguments:
# GPU_BENCH_ARGS, GPU_COMPARE_ARGS, GPU_TRAIN_ARGS; GPU_COMPARE=0 skips the comparison with other
# libraries.
set -uo pipefail
out=${1:-${OUT:-./gpu-results}}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # absolute: tests run snippets elsewhere
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU with torch and CuPy
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/asyncckpt-site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/asyncckpt-site"
fi

# Versions first; the last line says whether there is a GPU the tier can use (CuPy sees a device).
"$python" - <<'PY' 2>&1 | tee "$out/env.txt"
import importlib.metadata, platform, shutil, subprocess, warnings

def show(what, probe):
    try:
        print(f"{what}: {probe()}")
    except Exception as exc:
        print(f"{what}: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

def smi():
    if shutil.which("nvidia-smi") is None:
        raise FileNotFoundError("nvidia-smi not on PATH")
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    return "; ".join(subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.split("\n")).strip("; ")

def cupy_info():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cupy
    runtime = cupy.cuda.runtime
    return (f"{cupy.__version__}, CUDA runtime {runtime.runtimeGetVersion()}, driver API {runtime.driverGetVersion()}, "
            f"{runtime.getDeviceCount()} device(s)")

def torch_info():
    import torch
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "no CUDA device"
    name = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{torch.__version__} ({cuda}{name})"

def jax_info():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jax
    return f"{jax.__version__} (devices: {', '.join(sorted({d.platform for d in jax.devices()}))})"

def packages():
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("numpy", "tensorstore", "asyncckpt"))

show("device, driver, memory (nvidia-smi)", smi)
show("cupy", cupy_info)
show("torch", torch_info)
show("jax", jax_info)
show("python", lambda: f"{platform.python_version()} on {platform.platform()}")
show("packages", packages)

def usable():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cupy
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("CuPy sees no CUDA device")
    return "yes"

show("GPU for the tier", usable)
PY
{ echo "cores: $(nproc)"; free -g | head -2; df -h "$out" | tail -1; } 2>&1 | tee -a "$out/env.txt"
if grep -q '^GPU for the tier: yes$' "$out/env.txt"; then
    gpu=1
else
    gpu=0
    why=$(sed -n 's/^GPU for the tier: unavailable (\(.*\))$/\1/p' "$out/env.txt")
    echo "run_on_device: no usable GPU (${why:-see $out/env.txt}): the tests are reported skipped," \
        "the benchmarks are not run" >&2
fi

status=0
exec 3>&2  # the console, for step's own messages while a step's stderr goes to its log
step() {  # step NAME TIMEOUT COMMAND...: run it under a time limit, remember a failure (not inside a pipeline)
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&3
    timeout "$limit" "$@"
    local code=$?
    if [ "$code" -ne 0 ]; then
        echo "run_on_device: $name failed with status $code$([ "$code" -eq 124 ] && echo " (over ${limit} s)")" >&3
        status=1
    fi
    return "$code"
}

# The project's addopts without its `-n auto`: one process on one GPU, with or without pytest-xdist installed.
step "GPU tests" "${GPU_TESTS_TIMEOUT:-300}" "$python" -m pytest gpu_tests -p no:cacheprovider -p no:xdist -q -rfEsx \
    -o "addopts=--strict-markers -m 'not slow'" --timeout 60 --junitxml "$out/gpu_tests.xml" 2>&1 \
    | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ "$gpu" = 1 ]; then
    # shellcheck disable=SC2086 # the *_ARGS are word lists
    step "gpu_bench.py" "${GPU_BENCH_TIMEOUT:-120}" "$python" benchmarks/gpu_bench.py \
        ${GPU_BENCH_ARGS:---size-mib 1024 --repeat 3} >"$out/gpu_bench.md" 2>"$out/gpu_bench.log"
    cat "$out/gpu_bench.md"
    if [ "${GPU_COMPARE:-1}" = 1 ]; then
        # shellcheck disable=SC2086
        step "gpu_compare.py" "${GPU_COMPARE_TIMEOUT:-300}" "$python" benchmarks/gpu_compare.py \
            ${GPU_COMPARE_ARGS:---repeat 2 --timeout 90} >"$out/gpu_compare.md" 2>"$out/gpu_compare.log"
        cat "$out/gpu_compare.md"
    fi
    # shellcheck disable=SC2086
    step "gpu_train_overhead.py" "${GPU_TRAIN_TIMEOUT:-900}" "$python" benchmarks/gpu_train_overhead.py \
        ${GPU_TRAIN_ARGS:---steps 100 --every 1,10,100} --output "$out/gpu_train_overhead.md" \
        >/dev/null 2>"$out/gpu_train_overhead.log"
    cat "$out/gpu_train_overhead.md" 2>/dev/null
fi
echo "run_on_device: results in $out" >&2
if [ "$gpu" = 0 ]; then
    exit 2
fi
exit "$status"
