#!/usr/bin/env bash
# Build ulskip in place on the GPU machine (H200, sm_90; python3 with a CUDA torch, no network) and
# check that the CUDA op loads and matches the reference.
#   bash bench/gpu_build.sh            # log: build/gpu_build.log (override with ULSKIP_BUILD_LOG)
set -euo pipefail
cd "$(dirname "$0")/.."

LOG="${ULSKIP_BUILD_LOG:-build/gpu_build.log}"
mkdir -p "$(dirname "$LOG")"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  python3 - <<'EOF'
import importlib.metadata as md, shutil, sys, torch
def v(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "missing"
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (cuda {torch.version.cuda})  "
      f"setuptools {v('setuptools')}  ninja {'yes' if shutil.which('ninja') else 'no (slow distutils build)'}")
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
  nvcc --version | tail -2
} 2>&1 | tee "$LOG"

t0=$SECONDS
# --no-index: nothing may be fetched (no network there); --no-deps: the machine already has them.
if ! python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . >>"$LOG" 2>&1; then
  # e.g. a setuptools too old for PEP 660 editable installs: build ulskip/_C*.so in place instead,
  # which works when python runs from the repo root.
  echo "pip editable install failed (see $LOG); falling back to setup.py build_ext --inplace" | tee -a "$LOG"
  python3 setup.py build_ext --inplace >>"$LOG" 2>&1 || {
    grep -n -A6 -E "error[: ]|Error:|FAILED:" "$LOG" | grep -v "^.*Traceback" | head -60; exit 1; }
fi
echo "build took $((SECONDS - t0)) s" | tee -a "$LOG"
grep "building ulskip._C" "$LOG" || true  # says whether the CUDA sources were compiled

python3 -c "import torch; from ulskip.kernels import cache_write as cw; assert cw.has_cuda_ops(), 'ulskip._C built without CUDA'; kc, vc = (torch.full((2, 2, 8, 64), float('nan'), device='cuda', dtype=torch.bfloat16) for _ in range(2)); k, v = torch.randn(2, 2, 3, 2, 64, device='cuda', dtype=torch.bfloat16).unbind(0); pos = torch.tensor([[0, 5, 7], [1, 2, 3]], device='cuda'); kr, vr = kc.clone(), vc.clone(); cw.cache_write(kc, vc, k, v, pos); cw.cache_write_ref(kr, vr, k, v, pos); torch.testing.assert_close(kc, kr, rtol=0, atol=0, equal_nan=True); torch.testing.assert_close(vc, vr, rtol=0, atol=0, equal_nan=True); print('ok: torch.ops.ulskip.cache_write (CUDA) matches cache_write_ref')" 2>&1 | tee -a "$LOG"
