#!/usr/bin/env bash
# The GPU checks in one call on a lent GPU machine (bare: its python3 has torch with CUDA, not our other
# packages; no DCMTK; no network). Run from the repo root with .gpu carried (see bench/README.md):
#   bash bench/gpu_check.sh
# .gpu/whl: cp312 wheels of the packages that machine lacks; .gpu/deb: Debian's DCMTK and the libraries it
# loads, unpacked under /tmp (never into /); .gpu/zoo: the model-zoo configs the CUDA tests copy.
# Each step runs even when an earlier one failed; its log goes to $OUT, a summary of exit codes comes last.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD

# DCMTK: unpacked, reached through wrappers that give only DCMTK's processes its libraries and dictionary
D=/tmp/dcmtk
rm -rf "$D" && mkdir -p "$D/bin"
for f in .gpu/deb/*.deb; do dpkg -x "$f" "$D"; done
for t in storescu storescp echoscu; do
  printf '#!/bin/sh\nD=%s\nLD_LIBRARY_PATH="$D/usr/lib/x86_64-linux-gnu:$D/lib/x86_64-linux-gnu" DCMDICTPATH="$D/usr/share/libdcmtk17/dicom.dic" exec "$D/usr/bin/%s" "$@"\n' "$D" "$t" >"$D/bin/$t"
  chmod +x "$D/bin/$t"
done
export DICOM_NODE_DCMTK_BIN=$D/bin

# the CUDA test that needs model-zoo configs finds them beside the checkout (tests/unit/test_bundle.py)
ZOO="$(dirname "$PWD")/shared/bundles"
if [ ! -d "$ZOO" ]; then mkdir -p "$ZOO" && cp -r .gpu/zoo/* "$ZOO/"; fi

{
  echo "== machine"; uname -a; grep PRETTY_NAME /etc/os-release || true; (ldd --version | head -n 1) || true; nproc
  nvidia-smi || true
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' || true
  python3 -c 'import monai, pydicom, highdicom, pynetdicom, sqlalchemy, numpy, scipy; print("monai", monai.__version__, "pydicom", pydicom.__version__, "highdicom", highdicom.__version__, "pynetdicom", pynetdicom.__version__, "sqlalchemy", sqlalchemy.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__)' || true
  "$D/bin/storescu" --version >"$D/version.txt" 2>&1 && head -n 1 "$D/version.txt" || { cat "$D/version.txt"; echo "the unpacked storescu does not run here"; }
} 2>&1 | tee "$OUT/env.log"

declare -a NAMES CODES SECS
step() {  # step NAME LOG COMMAND...: run, tee to $OUT/LOG, record the exit code; never stops the script
  local name=$1 log=$2 rc=0 t0=$SECONDS
  shift 2
  echo; echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$log" || rc=$?
  NAMES+=("$name"); CODES+=("$rc"); SECS+=($((SECONDS - t0)))
}

mapfile -t CUDA_TESTS < <(grep -rl --include='*.py' 'pytest.mark.cuda' tests)  # the files with CUDA-marked tests
# each step bounded, so the whole script ends within ~8 min (typical: ~4)
step "pytest -m cuda" pytest_cuda.log timeout -k 10 110 python3 -m pytest -q -p no:cacheprovider -m cuda -rs "${CUDA_TESTS[@]}"
step "gpu_real_ct" gpu_real_ct.log timeout -k 10 180 python3 bench/gpu_real_ct.py --devices "cuda cpu" --cpu-threads 16 --slices 300 --json "$OUT/gpu_real_ct.json"
step "bench_latency cuda" bench_latency.log timeout -k 10 150 python3 bench/bench_latency.py --device cuda --models shipped --slices 300

echo
{
  echo "| step | exit code | seconds |"; echo "|---|---|---|"
  for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${CODES[$i]} | ${SECS[$i]} |"; done
  echo; echo "pytest -m cuda: $(tail -n 1 "$OUT/pytest_cuda.log")  (each CUDA test must pass, none skip)"
} | tee "$OUT/summary.md"
