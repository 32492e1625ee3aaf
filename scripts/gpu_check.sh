#!/usr/bin/env bash
# GPU check of the dense path (issue 6): runs the sample video through every stage at each
# preset (low with dense forced on, medium, high) on a CUDA GPU and prints, per preset, stage
# timings, registered images, fused points, mesh size and peak GPU memory (NVML, sampled every
# 0.2 s). Whole run: under 10 minutes on one T4-class GPU or better (frames 30/50/100).
#
# Target machine: an NVIDIA GPU, Python 3.12, a CUDA 12 or 13 driver (the CUDA 12 runtime of
# pycolmap-cuda12 runs on a newer driver), NO internet, at most 64 MiB carried to it.
#
# Wheels (no index reachable there): pass a folder with --wheels DIR (default ./wheelhouse)
# holding, for cp312 manylinux x86_64:
#   pycolmap_cuda12-4.2.1-*.whl (~73 MB) and its CUDA runtime wheels (nvidia-cuda-runtime-cu12,
#   nvidia-curand-cu12; `pip download pycolmap-cuda12==4.2.1 --python-version 3.12
#   --only-binary=:all: -d wheelhouse` on a connected machine fetches them all), plus
#   trimesh, nvidia-ml-py and the rest of requirements.txt unless already installed.
# The 64 MiB carry limit: split each big wheel on the connected side with
#   split -b 60M FILE.whl FILE.whl.part-
# and carry the parts over several calls into the same ignored folder (files already there are
# kept between calls); this script joins FILE.whl.part-* back into FILE.whl and checks the
# wheel's RECORD by installing it. Or the operator provides the wheels on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=./wheelhouse
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu_check_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    *) echo "usage: $0 [--wheels DIR] [--python PY]" >&2; exit 2 ;;
  esac
done

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. reassemble split wheels, install offline into a venv
if [ -d "$WHEELS" ]; then
  for first in "$WHEELS"/*.whl.part-aa; do
    [ -e "$first" ] || continue
    whl=${first%.part-aa}
    cat "${whl}".part-* > "$whl.tmp" && mv "$whl.tmp" "$whl"
  done
fi
VENV=${VENV:-./.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$VENV/bin/pip" install --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
fi
"$VENV/bin/python" - <<'EOF'
import sys
import pycolmap
print("pycolmap", pycolmap.__version__, "has_cuda", pycolmap.has_cuda)
if not pycolmap.has_cuda:
    sys.exit("pycolmap has no CUDA: install pycolmap-cuda12 (see the header of this script)")
EOF

# 2. each preset, timed, with an NVML sampler for peak memory
mkdir -p "$OUT"
SECONDS=0
for q in low medium high; do
  "$VENV/bin/python" - "$q" "$OUT/$q" <<'EOF'
import json, sys, threading, time
from pathlib import Path

import pynvml

from colmap_pipeline.core import dense, pipeline
from colmap_pipeline.presets import default_preset

quality, out = sys.argv[1], Path(sys.argv[2])
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
base = pynvml.nvmlDeviceGetMemoryInfo(h).used
peak = {"used": base}
stop = threading.Event()

def sample():
    while not stop.is_set():
        peak["used"] = max(peak["used"], pynvml.nvmlDeviceGetMemoryInfo(h).used)
        time.sleep(0.2)

threading.Thread(target=sample, daemon=True).start()
preset = default_preset(quality)
pipeline.write_job(out, "samples/max-heromode.mp4", preset, use_gpu=True)
job = json.loads((out / "job.json").read_text())
job["dense_low"] = True  # the check runs dense at low too
(out / "job.json").write_text(json.dumps(job))
t0 = time.monotonic()
for stage in pipeline.STAGE_ORDER:
    pipeline.run_stage(stage, out)
stop.set()
res = json.loads((out / "result.json").read_text())
print(json.dumps({
    "quality": quality,
    "wall_s": round(time.monotonic() - t0, 1),
    "timings_s": res["timings_s"],
    "registered_images": res["registered_images"],
    "fused_points": (res.get("dense") or {}).get("fused_points"),
    "mesh": {k: v for k, v in (res.get("meshing") or {}).items() if k.startswith("mesh_")},
    "dense": {k: v for k, v in (res.get("dense") or {}).items() if k != "preset"},
    "peak_gpu_memory_mib": round((peak["used"] - base) / 2**20, 1),
    "gpu": pynvml.nvmlDeviceGetName(h),
}, indent=1))
EOF
done
echo "total ${SECONDS} s"
