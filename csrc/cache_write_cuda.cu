// cache_write on CUDA: one launch writes both K and V (blockIdx.y picks which), one block per (b, t)
// token, threads over Hkv * D in 16-byte vectors when every row is aligned.
//
// No bounds check that needs a host sync (it would break CUDA-graph capture and stall decode): the
// engine validates lengths against max_seq_len on the host before it launches anything. A position
// outside [0, S) is skipped on the device, only so that an engine bug cannot scribble over other
// memory; the CPU version raises for it instead.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // what at::cuda::getCurrentCUDAStream is, minus cuBLAS/cuSPARSE headers

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ops.h"

namespace ulskip {

namespace {

struct Rows {  // one of K / V; strides in elements, 0 for dims of size 1
  void* cache;
  const void* src;
  int64_t cs0, cs1, cs2, cs3;  // cache [B, Hkv, S, D]
  int64_t ss0, ss1, ss2, ss3;  // src   [B, T, Hkv, D]
};

struct Params {
  Rows kv[2];
  const void* pos;
  int64_t ps0, ps1;
  int T, H, D;
  int64_t S;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename cache_t, typename src_t, typename idx_t, int VEC>
__global__ void cache_write_kernel(const Params p) {
  const int b = blockIdx.x / p.T, t = blockIdx.x % p.T;
  const Rows& r = p.kv[blockIdx.y];
  const int64_t pos = static_cast<int64_t>(static_cast<const idx_t*>(p.pos)[b * p.ps0 + t * p.ps1]);
  if (pos < 0 || pos >= p.S) return;  // see the note at the top: engine validates, this only guards memory

  cache_t* cache = static_cast<cache_t*>(r.cache) + b * r.cs0 + pos * r.cs2;
  const src_t* src = static_cast<const src_t*>(r.src) + b * r.ss0 + t * r.ss1;
  const int chunks = p.D / VEC;  // VEC divides D (host checked)
  for (int i = threadIdx.x; i < p.H * chunks; i += blockDim.x) {
    const int h = i / chunks, d = (i - h * chunks) * VEC;
    cache_t* c = cache + h * r.cs1 + d * r.cs3;
    const src_t* s = src + h * r.ss2 + d * r.ss3;
    if constexpr (VEC == 1) {
      *c = static_cast<cache_t>(static_cast<float>(*s));
    } else if constexpr (std::is_same_v<cache_t, src_t>) {  // VEC * sizeof == 16: one 128-bit load/store
      *reinterpret_cast<uint4*>(c) = *reinterpret_cast<const uint4*>(s);
    } else {
      const Vec<src_t, VEC> in = *reinterpret_cast<const Vec<src_t, VEC>*>(s);
      Vec<cache_t, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<cache_t>(static_cast<float>(in.v[j]));
      *reinterpret_cast<Vec<cache_t, VEC>*>(c) = out;
    }
  }
}

Rows make_rows(at::Tensor& cache, const at::Tensor& src) {
  auto st = [](const at::Tensor& x, int d) { return x.size(d) == 1 ? int64_t{0} : x.stride(d); };
  return Rows{cache.data_ptr(), src.const_data_ptr(),
              st(cache, 0), st(cache, 1), st(cache, 2), st(cache, 3),
              st(src, 0), st(src, 1), st(src, 2), st(src, 3)};
}

// Can rows of VEC elements be moved as whole 16-byte (or smaller) vectors?
bool vectorizable(const Rows& r, int D, int vec, int cache_bytes, int src_bytes) {
  if (D % vec != 0 || r.cs3 != 1 || r.ss3 != 1) return false;
  for (int64_t s : {r.cs0, r.cs1, r.cs2, r.ss0, r.ss1, r.ss2})
    if (s % vec != 0) return false;
  return reinterpret_cast<uintptr_t>(r.cache) % (vec * cache_bytes) == 0 &&
         reinterpret_cast<uintptr_t>(r.src) % (vec * src_bytes) == 0;
}

template <typename cache_t, typename src_t, typename idx_t>
void launch(const Params& p, int64_t B) {
  // 16 bytes on the wider side: 8 bf16/fp16 or 4 fp32 per vector (4 when casting fp32 -> half).
  constexpr int VEC = 16 / (sizeof(cache_t) > sizeof(src_t) ? sizeof(cache_t) : sizeof(src_t));
  const bool vec = vectorizable(p.kv[0], p.D, VEC, sizeof(cache_t), sizeof(src_t)) &&
                   vectorizable(p.kv[1], p.D, VEC, sizeof(cache_t), sizeof(src_t));
  const int work = p.H * (vec ? p.D / VEC : p.D);
  const int threads = std::min(256, std::max(32, (work + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(B * p.T), 2);
  // The current stream, so the launch lands in whatever graph the engine is capturing.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec)
    cache_write_kernel<cache_t, src_t, idx_t, VEC><<<grid, threads, 0, stream>>>(p);
  else
    cache_write_kernel<cache_t, src_t, idx_t, 1><<<grid, threads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();  // cudaGetLastError: no sync, fine inside graph capture
}

}  // namespace

void cache_write_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& positions) {
  check_cache_write(k_cache, v_cache, k, v, positions);
  const int64_t B = positions.size(0), T = positions.size(1);
  const int64_t H = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  if (B * T == 0 || H * D == 0) return;
  TORCH_CHECK(B * T <= INT32_MAX && H * D <= INT32_MAX, "ulskip::cache_write: B * T = ", B * T,
              " and Hkv * D = ", H * D, " must each fit in int32");
  const c10::cuda::CUDAGuard guard(k_cache.device());

  Params p{{make_rows(k_cache, k), make_rows(v_cache, v)},
           positions.const_data_ptr(),
           positions.size(0) == 1 ? 0 : positions.stride(0),
           positions.size(1) == 1 ? 0 : positions.stride(1),
           static_cast<int>(T), static_cast<int>(H), static_cast<int>(D), S};
  dispatch_index(positions.scalar_type(), "positions", [&](auto itag) {
    using idx_t = decltype(itag);
    dispatch_float(k_cache.scalar_type(), "k_cache", [&](auto ctag) {
      using cache_t = decltype(ctag);
      dispatch_float(k.scalar_type(), "k", [&](auto stag) {
        using src_t = decltype(stag);
        launch<cache_t, src_t, idx_t>(p, B);
      });
    });
  });
}

}  // namespace ulskip
