// cache_write: scatter the new tokens' K/V rows into one slot of the compact KV cache.
// Reference: ulskip.ops.cache_write_ref. CPU version here, CUDA version in cache_write_cuda.cu.
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include "ops.h"

namespace ulskip {

namespace {

bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

}  // namespace

void check_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& positions) {
  constexpr const char* op = "ulskip::cache_write: ";
  TORCH_CHECK(k_cache.dim() == 4, op, "k_cache must be [B, Hkv, S, D] (4-d), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache shape ", v_cache.sizes(),
              " must equal k_cache shape ", k_cache.sizes());
  TORCH_CHECK(positions.dim() == 2, op, "positions must be [B, T] (2-d), got shape ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt, op,
              "positions has dtype ", dtype_name(positions.scalar_type()), "; allowed: torch.int64, torch.int32");
  TORCH_CHECK(is_float_dtype(k_cache.scalar_type()), op, "k_cache has dtype ", dtype_name(k_cache.scalar_type()),
              "; allowed: torch.float32, torch.float16, torch.bfloat16");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, "v_cache dtype ",
              dtype_name(v_cache.scalar_type()), " must equal k_cache dtype ", dtype_name(k_cache.scalar_type()));
  TORCH_CHECK(is_float_dtype(k.scalar_type()), op, "k has dtype ", dtype_name(k.scalar_type()),
              "; allowed: torch.float32, torch.float16, torch.bfloat16");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), op, "v dtype ", dtype_name(v.scalar_type()),
              " must equal k dtype ", dtype_name(k.scalar_type()));

  const int64_t B = k_cache.size(0), H = k_cache.size(1), D = k_cache.size(3);
  const int64_t T = positions.size(1);
  TORCH_CHECK(positions.size(0) == B, op, "positions shape ", positions.sizes(), " has batch ",
              positions.size(0), " but the cache slot ", k_cache.sizes(), " has batch B = ", B);
  const std::vector<int64_t> want{B, T, H, D};
  TORCH_CHECK(k.sizes() == want, op, "k must be [B, T, Hkv, D] = ", at::IntArrayRef(want),
              " (k_cache ", k_cache.sizes(), ", positions ", positions.sizes(), "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == want, op, "v must be [B, T, Hkv, D] = ", at::IntArrayRef(want),
              " (v_cache ", v_cache.sizes(), ", positions ", positions.sizes(), "), got ", v.sizes());

  const auto dev = k_cache.device();
  TORCH_CHECK(v_cache.device() == dev && k.device() == dev && v.device() == dev && positions.device() == dev, op,
              "all tensors must be on one device; got k_cache ", dev, ", v_cache ", v_cache.device(), ", k ",
              k.device(), ", v ", v.device(), ", positions ", positions.device());
}

namespace {

template <typename cache_t, typename src_t, typename idx_t>
void write_rows(at::Tensor& cache, const at::Tensor& src, const idx_t* pos, int64_t ps0, int64_t ps1) {
  const int64_t B = src.size(0), T = src.size(1), H = src.size(2), D = src.size(3);
  const int64_t cs0 = cache.stride(0), cs1 = cache.stride(1), cs2 = cache.stride(2), cs3 = cache.stride(3);
  const int64_t ss0 = src.stride(0), ss1 = src.stride(1), ss2 = src.stride(2), ss3 = src.stride(3);
  cache_t* c = cache.data_ptr<cache_t>();
  const src_t* s = src.const_data_ptr<src_t>();
  // One (b, t) row of H*D elements per iteration; group small rows so a task is worth a thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * D));
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / T, t = i % T;
      const int64_t p = static_cast<int64_t>(pos[b * ps0 + t * ps1]);
      for (const auto h : c10::irange(H)) {
        cache_t* crow = c + b * cs0 + h * cs1 + p * cs2;
        const src_t* srow = s + b * ss0 + t * ss1 + h * ss2;
        // Through float: exact for every pair of our dtypes, rounding once as Tensor.to does.
        for (const auto d : c10::irange(D)) crow[d * cs3] = static_cast<cache_t>(static_cast<float>(srow[d * ss3]));
      }
    }
  });
}

}  // namespace

void cache_write_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& positions) {
  check_cache_write(k_cache, v_cache, k, v, positions);
  const int64_t B = positions.size(0), T = positions.size(1), S = k_cache.size(2);
  const int64_t ps0 = positions.stride(0), ps1 = positions.stride(1);
  dispatch_index(positions.scalar_type(), "positions", [&](auto itag) {
    using idx_t = decltype(itag);
    const idx_t* pos = positions.const_data_ptr<idx_t>();
    // Validate every position before the first write: a bad call leaves the cache untouched.
    for (const auto b : c10::irange(B)) {
      for (const auto t : c10::irange(T)) {
        const int64_t p = static_cast<int64_t>(pos[b * ps0 + t * ps1]);
        TORCH_CHECK(0 <= p && p < S, "ulskip::cache_write: positions[", b, ", ", t, "] = ", p,
                    " is out of range for a cache of length S = ", S, " (allowed: 0 <= position < ", S, ")");
      }
    }
    dispatch_float(k_cache.scalar_type(), "k_cache", [&](auto ctag) {
      using cache_t = decltype(ctag);
      dispatch_float(k.scalar_type(), "k", [&](auto stag) {
        using src_t = decltype(stag);
        write_rows<cache_t, src_t, idx_t>(k_cache, k, pos, ps0, ps1);
        write_rows<cache_t, src_t, idx_t>(v_cache, v, pos, ps0, ps1);
      });
    });
  });
}

// Shapes only: lets FakeTensor / torch.compile trace the op (it returns nothing, mutates in place).
void cache_write_meta(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& positions) {
  check_cache_write(k_cache, v_cache, k, v, positions);
}

}  // namespace ulskip
