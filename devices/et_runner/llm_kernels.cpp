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
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// One query row against `count` cached positions: scaled scores, softmax, weighted sum of values.
// Key and value rows are `stride` floats apart (the cache's [position, kv head, dim] layout).
struct AttendRow {
  const float* query;
  const float* keys;
  const float* values;
  int64_t stride;
  int64_t count;
  int64_t dim;
  float factor;
  float* weights;  // count floats of scratch
  float* result;
};

void attend_portable(const AttendRow& row) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < row.count; ++j) {
    row.weights[j] = dot(row.query, row.keys + j * row.stride, row.dim) * row.factor;
    top = std::max(top, row.weights[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < row.count; ++j) {
    row.weights[j] = std::exp(row.weights[j] - top);
    total += row.weights[j];
  }
  const float inverse = 1.0f / total;
  // 16 output columns at a time, summed over the positions in registers: adding into the
  // output itself stored and reloaded it for every position (it may alias the values).
  int64_t d0 = 0;
  for (; d0 + 16 <= row.dim; d0 += 16) {
    float block[16] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f,
                       0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t j = 0; j < row.count; ++j) {
      const float* value = row.values + j * row.stride + d0;
      const float w = row.weights[j];
      for (int k = 0; k < 16; ++k) block[k] += w * value[k];
    }
    for (int k = 0; k < 16; ++k) row.result[d0 + k] = block[k] * inverse;
  }
  for (; d0 < row.dim; ++d0) {
    float sum = 0.0f;
    for (int64_t j = 0; j < row.count; ++j) sum += row.weights[j] * row.values[j * row.stride + d0];
    row.result[d0] = sum * inverse;
  }
}

#if defined(__x86_64__)
// The same row in AVX-512, chosen at run time where the CPU has it: the portable build targets
// baseline x86-64 (SSE2), and in the C++ runner this op was 15% of a SmolLM2 int4 decode step's
// CPU time (perf), a fifth of it in scalar expf. Head dims that are multiples of 16 up to 128.
constexpr int64_t kAvx512MaxBlocks = 8;

// Cephes' expf, shared by the SIMD paths: e^x = 2^n * e^r, n = round(x / ln2), r = x - n ln2 in two
// parts (|r| <= ln2 / 2), e^r = 1 + r + r^2 * poly(r) with poly of degree 5; x clamped where e^x
// leaves the normal floats (softmax feeds x <= 0).
constexpr struct {
  float lowest = -87.3365448f;
  float log2e = 1.44269504088896341f;
  float ln2_high = 0.693359375f;
  float ln2_low = -2.12194440e-4f;
  float poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                   4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
} kExp{};

__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  // 2^n * e^r (kExp), n applied by scalef.
  x = _mm512_max_ps(x, _mm512_set1_ps(kExp.lowest));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kExp.log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExp.ln2_high), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExp.ln2_low), r);
  __m512 y = _mm512_set1_ps(kExp.poly[0]);
  for (int k = 1; k < 6; ++k) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExp.poly[k]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

__attribute__((target("avx512f"))) void attend_avx512(const AttendRow& row) {
  const int64_t blocks = row.dim / 16;
  __m512 query[kAvx512MaxBlocks];
  for (int64_t b = 0; b < blocks; ++b) query[b] = _mm512_loadu_ps(row.query + 16 * b);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < row.count; ++j) {
    const float* key = row.keys + j * row.stride;
    __m512 sum = _mm512_mul_ps(query[0], _mm512_loadu_ps(key));
    for (int64_t b = 1; b < blocks; ++b) sum = _mm512_fmadd_ps(query[b], _mm512_loadu_ps(key + 16 * b), sum);
    const float score = _mm512_reduce_add_ps(sum) * row.factor;
    row.weights[j] = score;
    top = std::max(top, score);
  }
  const __m512 shift = _mm512_set1_ps(top);
  __m512 totals = _mm512_setzero_ps();
  for (int64_t j = 0; j < row.count; j += 16) {
    const __mmask16 mask = row.count - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (row.count - j)) - 1u);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row.weights + j), shift));
    _mm512_mask_storeu_ps(row.weights + j, mask, e);
    totals = _mm512_mask_add_ps(totals, mask, totals, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(totals));
  __m512 acc[kAvx512MaxBlocks];
  for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < row.count; ++j) {
    const float* value = row.values + j * row.stride;
    const __m512 w = _mm512_set1_ps(row.weights[j]);
    for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(value + 16 * b), acc[b]);
  }
  for (int64_t b = 0; b < blocks; ++b) _mm512_storeu_ps(row.result + 16 * b, _mm512_mul_ps(acc[b], inverse));
}

// The same in AVX2 + FMA (most x86 laptops have no AVX-512): head dims that are multiples of 8 up to 128.
constexpr int64_t kAvx2MaxBlocks = 16;

__attribute__((target("avx2,fma"))) inline float sum_avx2(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  // As exp_avx512, with 2^n built in the exponent bits (n >= -126 after the clamp: a normal float).
  x = _mm256_max_ps(x, _mm256_set1_ps(kExp.lowest));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kExp.log2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExp.ln2_high), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExp.ln2_low), r);
  __m256 y = _mm256_set1_ps(kExp.poly[0]);
  for (int k = 1; k < 6; ++k) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExp.poly[k]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

__attribute__((target("avx2,fma"))) void attend_avx2(const AttendRow& row) {
  const int64_t blocks = row.dim / 8;
  __m256 query[kAvx2MaxBlocks];
  for (int64_t b = 0; b < blocks; ++b) query[b] = _mm256_loadu_ps(row.query + 8 * b);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < row.count; ++j) {
    const float* key = row.keys + j * row.stride;
    __m256 sum = _mm256_mul_ps(query[0], _mm256_loadu_ps(key));
    for (int64_t b = 1; b < blocks; ++b) sum = _mm256_fmadd_ps(query[b], _mm256_loadu_ps(key + 8 * b), sum);
    const float score = sum_avx2(sum) * row.factor;
    row.weights[j] = score;
    top = std::max(top, score);
  }
  const __m256 shift = _mm256_set1_ps(top);
  __m256 totals = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= row.count; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row.weights + j), shift));
    _mm256_storeu_ps(row.weights + j, e);
    totals = _mm256_add_ps(totals, e);
  }
  float total = sum_avx2(totals);
  for (; j < row.count; ++j) {
    row.weights[j] = std::exp(row.weights[j] - top);
    total += row.weights[j];
  }
  const __m256 inverse = _mm256_set1_ps(1.0f / total);
  __m256 acc[kAvx2MaxBlocks];
  for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm256_setzero_ps();
  for (int64_t p = 0; p < row.count; ++p) {
    const float* value = row.values + p * row.stride;
    const __m256 w = _mm256_set1_ps(row.weights[p]);
    for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + 8 * b), acc[b]);
  }
  for (int64_t b = 0; b < blocks; ++b) _mm256_storeu_ps(row.result + 8 * b, _mm256_mul_ps(acc[b], inverse));
}
#endif

using AttendFn = void (*)(const AttendRow&);

// The widest path the CPU has for this head dim. RANKDOWN_ET_ATTENTION=portable|avx2 caps it (tests
// run each path on one machine; a slower path is never chosen over a faster one otherwise).
AttendFn attend_for(int64_t dim) {
#if defined(__x86_64__)
  const char* cap = std::getenv("RANKDOWN_ET_ATTENTION");
  const std::string limit = cap == nullptr ? "" : cap;
  if (limit == "portable") return attend_portable;
  if (limit != "avx2" && dim % 16 == 0 && dim / 16 <= kAvx512MaxBlocks && __builtin_cpu_supports("avx512f")) {
    return attend_avx512;
  }
  if (dim % 8 == 0 && dim / 8 <= kAvx2MaxBlocks && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return attend_avx2;
  }
#endif
  return attend_portable;
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
  const AttendFn attend = attend_for(dim);
  executorch::extension::parallel_for(0, batch * n * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(static_cast<size_t>(length));
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / (n * heads), i = (index / heads) % n, h = index % heads, kvh = h / group;
      const int64_t offset = (b * length * kv_heads + kvh) * dim;
      // causal: query i attends to positions 0 .. start_pos + i
      attend({qd + index * dim, kd + offset, vd + offset, kv_heads * dim, start_pos + i + 1, dim, factor,
              weights.data(), od + index * dim});
    }
  });
  return out;
}

}  // namespace rankdown_llm_kernels

EXECUTORCH_LIBRARY(llama, "update_cache.out", rankdown_llm_kernels::update_cache_out);
EXECUTORCH_LIBRARY(llama, "custom_sdpa.out", rankdown_llm_kernels::custom_sdpa_out);
