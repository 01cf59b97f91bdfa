"""Builds ulskip and its compiled core ulskip._C (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .          # against the torch already installed

csrc/*.cpp are always compiled (CPU ops + op registration). csrc/*.cu are added when torch is a CUDA
build and nvcc is found; then ULSKIP_WITH_CUDA is defined so the CUDA impls get registered.
TORCH_CUDA_ARCH_LIST picks the GPU archs (9.0 for the H200); ULSKIP_FORCE_CPU=1 skips CUDA.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # the usual cause: pip's isolated build env, which has no torch
    raise RuntimeError(
        "building ulskip needs the installed torch; run `pip install --no-build-isolation -e .`"
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    # setuptools wants sources relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def with_cuda():
    if os.environ.get("ULSKIP_FORCE_CPU", "0") == "1":
        return False
    if not torch.version.cuda or CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def extensions():
    cpp, cu = rel("csrc/*.cpp"), rel("csrc/*.cu")
    cxx = ["-O3"]
    if with_cuda() and cu:
        nvcc = ["-O3", "-lineinfo"]
        print(f"ulskip: building ulskip._C with CUDA {torch.version.cuda} "
              f"(TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})")
        return [CUDAExtension("ulskip._C", cpp + cu, define_macros=[("ULSKIP_WITH_CUDA", None)],
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc})]
    print("ulskip: building ulskip._C for the CPU only (no CUDA torch or no nvcc)")
    return [CppExtension("ulskip._C", cpp, extra_compile_args={"cxx": cxx})]


# ulskip.kernels lives in the top-level folder kernels/, mapped in here so it is never importable as
# a top-level `kernels` (a Hugging Face package of that name is probed for by transformers).
packages = find_packages(include=["ulskip", "ulskip.*"])
package_dir = {}
if os.path.isdir(os.path.join(ROOT, "kernels")):
    packages.append("ulskip.kernels")
    package_dir["ulskip.kernels"] = "kernels"

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
