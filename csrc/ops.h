// Declarations shared by the CPU (.cpp) and CUDA (.cu) halves of ulskip._C.
// Layouts (B batch, T new tokens, S cache length, Hkv kv heads, D head dim):
//   one cache slot: [B, Hkv, S, D];  new k/v from the projection: [B, T, Hkv, D];  positions: [B, T].
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace ulskip {

// Metadata-only checks (shapes, dtypes, devices): no data is read, so they are safe on CUDA tensors
// inside graph capture. Throws c10::Error (RuntimeError in Python) naming the bad values.
void check_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& positions);

// k_cache[b, :, positions[b, t], :] = k[b, t] (cast to the cache dtype); same for v.
void cache_write_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& positions);
void cache_write_meta(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& positions);
#ifdef ULSKIP_WITH_CUDA
void cache_write_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& positions);
#endif

// "torch.float16" rather than c10's "Half", so messages read like the Python the user wrote.
inline std::string dtype_name(at::ScalarType st) {
  return "torch." + std::string(c10::getDtypeNames(st).first);
}

// Calls f(T{}) with T the C++ type of a cache/activation dtype. Only the three dtypes the engine
// uses, so each op instantiates 3 (or 3x3 for casts) kernels rather than AT_DISPATCH's 4+.
template <typename F>
inline void dispatch_float(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default:
      TORCH_CHECK(false, what, " has dtype ", dtype_name(st), "; allowed: torch.float32, torch.float16, torch.bfloat16");
  }
}

template <typename F>
inline void dispatch_index(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kLong: f(int64_t{}); break;
    case at::kInt: f(int32_t{}); break;
    default:
      TORCH_CHECK(false, what, " has dtype ", dtype_name(st), "; allowed: torch.int64, torch.int32");
  }
}

}  // namespace ulskip
