// The ulskip op library: schemas (torch.ops.ulskip.*) and their CPU / Meta / CUDA kernels.
// Python imports this as ulskip._C (see ulskip/_ext.py); importing it is what registers the ops.
#include <pybind11/pybind11.h>  // not torch/extension.h: the module binds nothing, and that header costs ~40 s
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(ulskip, m) {
  // k_cache / v_cache: one slot [B, Hkv, S, D], any strides; k / v: [B, T, Hkv, D]; positions [B, T].
  m.def("cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor positions) -> ()");
}

TORCH_LIBRARY_IMPL(ulskip, CPU, m) {
  m.impl("cache_write", &ulskip::cache_write_cpu);
}

TORCH_LIBRARY_IMPL(ulskip, Meta, m) {
  m.impl("cache_write", &ulskip::cache_write_meta);
}

#ifdef ULSKIP_WITH_CUDA
TORCH_LIBRARY_IMPL(ulskip, CUDA, m) {
  m.impl("cache_write", &ulskip::cache_write_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ulskip compiled ops; they live in torch.ops.ulskip once this module is imported";
#ifdef ULSKIP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
