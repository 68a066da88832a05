// ExecuTorch's LLM attention ops, llama::update_cache.out and llama::custom_sdpa.out, for the
// runner: rankdown's .pte attends through them (export/et_attention.py). The executorch wheel
// ships their kernels only inside libcustom_ops_aot_lib.so, which links libtorch and the Python
// bindings, so a runner for devices without PyTorch cannot link it; these are the same ops'
// semantics for what the export emits (fp32, causal from start_pos, no mask, grouped-query
// heads), in plain C++ on ExecuTorch's thread pool.
//
//   update_cache(value[B, n, H, D], cache[B, L, H, D], start_pos): cache[:, start_pos:start_pos+n] = value
//   custom_sdpa(q[B, n, Hq, D], k[B, L, Hkv, D], v[B, L, Hkv, D], start_pos, mask=None,
//               dropout, is_causal=true, scale): query i attends to positions 0 .. start_pos + i

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace rankdown_llm_kernels {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

bool fp32_4d(const Tensor& t) {
  return t.scalar_type() == ScalarType::Float && t.dim() == 4;
}

// Eight partial sums: one running float sum is a chain the compiler may not reorder, so it stayed
// scalar and latency-bound (SmolLM2 int4 in the runner: this kernel was a third of a decode step).
float dot(const float* a, const float* b, int64_t n) {
  float partial[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int k = 0; k < 8; ++k) partial[k] += a[d + k] * b[d + k];
  }
  float sum = 0.0f;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (int k = 0; k < 8; ++k) sum += partial[k];
  return sum;
}

Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache, const int64_t start_pos,
                         Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, fp32_4d(value) && fp32_4d(cache), InvalidArgument, out,
                      "update_cache: fp32 [batch, seq, heads, head_dim] tensors only");
  const int64_t batch = value.size(0), n = value.size(1), length = cache.size(1);
  ET_KERNEL_CHECK_MSG(ctx, cache.size(0) == batch && cache.size(2) == value.size(2) &&
                      cache.size(3) == value.size(3) && start_pos >= 0 && start_pos + n <= length,
                      InvalidArgument, out, "update_cache: value does not fit the cache at start_pos");
  const int64_t row = value.size(2) * value.size(3);
  const float* src = value.const_data_ptr<float>();
  float* dst = cache.mutable_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(dst + (b * length + start_pos) * row, src + b * n * row, sizeof(float) * n * row);
  }
  return out;
}

Tensor& custom_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const int64_t start_pos, const std::optional<Tensor>& attn_mask, const double dropout_p,
                        const bool is_causal, const std::optional<double> scale, Tensor& out) {
  (void)dropout_p;
  ET_KERNEL_CHECK_MSG(ctx, fp32_4d(q) && fp32_4d(k) && fp32_4d(v), InvalidArgument, out,
                      "custom_sdpa: fp32 [batch, seq, heads, head_dim] tensors only");
  ET_KERNEL_CHECK_MSG(ctx, is_causal && !attn_mask.has_value(), InvalidArgument, out,
                      "custom_sdpa: only causal attention without a mask is built into this runner");
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t length = k.size(1), kv_heads = k.size(2);
  ET_KERNEL_CHECK_MSG(ctx, k.size(0) == batch && k.size(3) == dim && kv_heads > 0 && heads % kv_heads == 0 &&
                      v.size(1) == length && v.size(2) == kv_heads && v.size(3) == dim &&
                      start_pos >= 0 && start_pos + n <= length,
                      InvalidArgument, out, "custom_sdpa: query, key and value shapes disagree");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok, InvalidArgument, out);
  const float factor = scale.has_value() ? static_cast<float>(*scale) : 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t group = heads / kv_heads;
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  executorch::extension::parallel_for(0, batch * n * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(static_cast<size_t>(length));
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / (n * heads), i = (index / heads) % n, h = index % heads, kvh = h / group;
      const float* query = qd + index * dim;
      const int64_t last = start_pos + i;  // inclusive: causal
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j <= last; ++j) {
        const float* key = kd + ((b * length + j) * kv_heads + kvh) * dim;
        weights[j] = dot(query, key, dim) * factor;
        top = std::max(top, weights[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j <= last; ++j) {
        weights[j] = std::exp(weights[j] - top);
        total += weights[j];
      }
      const float inverse = 1.0f / total;
      float* result = od + index * dim;
      // 16 output columns at a time, summed over the positions in registers: adding into the
      // output itself stored and reloaded it for every position (it may alias the values).
      int64_t d0 = 0;
      for (; d0 + 16 <= dim; d0 += 16) {
        float block[16] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f,
                           0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t j = 0; j <= last; ++j) {
          const float* value = vd + ((b * length + j) * kv_heads + kvh) * dim + d0;
          const float w = weights[j];
          for (int k = 0; k < 16; ++k) block[k] += w * value[k];
        }
        for (int k = 0; k < 16; ++k) result[d0 + k] = block[k] * inverse;
      }
      for (; d0 < dim; ++d0) {
        float sum = 0.0f;
        for (int64_t j = 0; j <= last; ++j) sum += weights[j] * vd[((b * length + j) * kv_heads + kvh) * dim + d0];
        result[d0] = sum * inverse;
      }
    }
  });
  return out;
}

}  // namespace rankdown_llm_kernels

EXECUTORCH_LIBRARY(llama, "update_cache.out", rankdown_llm_kernels::update_cache_out);
EXECUTORCH_LIBRARY(llama, "custom_sdpa.out", rankdown_llm_kernels::custom_sdpa_out);
