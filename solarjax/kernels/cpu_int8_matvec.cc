// XLA FFI handler: y[b, n] = scale[n] * sum_k x[b, k] * w[k, n] with int8 w, fp32 x and y.
//
// Why: XLA:CPU converts int8 weights to float in memory on every decode step, so weight-only
// int8 decode reads more bytes than fp32. This kernel converts 16 (AVX-512) or 8 (AVX2) weights
// at a time in registers and never writes a float copy. Rows of w are streamed contiguously, four
// at a time, into an fp32 accumulator row per batch row (L1-resident at decode sizes). The
// per-channel scale is applied once at the end. Single-threaded: it runs on the XLA thread that
// calls it. Dispatch is decided at run time (__builtin_cpu_supports); a scalar loop is the fallback.
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerStep = 4;

void matvec_scalar(const float* x, const int8_t* w, const float* scale, float* y, int64_t batch,
                   int64_t k_dim, int64_t n_dim) {
  std::memset(y, 0, sizeof(float) * batch * n_dim);
  for (int64_t b = 0; b < batch; ++b) {
    float* yb = y + b * n_dim;
    for (int64_t k = 0; k < k_dim; ++k) {
      const float xv = x[b * k_dim + k];
      const int8_t* wk = w + k * n_dim;
      for (int64_t n = 0; n < n_dim; ++n) yb[n] += xv * static_cast<float>(wk[n]);
    }
    for (int64_t n = 0; n < n_dim; ++n) yb[n] *= scale[n];
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void matvec_avx512(const float* x, const int8_t* w,
                                                                const float* scale, float* y,
                                                                int64_t batch, int64_t k_dim,
                                                                int64_t n_dim) {
  std::memset(y, 0, sizeof(float) * batch * n_dim);
  const int64_t n_vec = n_dim / 16 * 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << (n_dim - n_vec)) - 1u);
#define load(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))
#define load_tail(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail_mask, (p))))
  int64_t k = 0;
  for (; k + kRowsPerStep <= k_dim; k += kRowsPerStep) {
    const int8_t *w0 = w + k * n_dim, *w1 = w0 + n_dim, *w2 = w1 + n_dim, *w3 = w2 + n_dim;
    for (int64_t n = 0; n < n_dim; n += 16) {
      const bool tail = n >= n_vec;
      const __m512 f0 = tail ? load_tail(w0 + n) : load(w0 + n);
      const __m512 f1 = tail ? load_tail(w1 + n) : load(w1 + n);
      const __m512 f2 = tail ? load_tail(w2 + n) : load(w2 + n);
      const __m512 f3 = tail ? load_tail(w3 + n) : load(w3 + n);
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = x + b * k_dim + k;
        float* yb = y + b * n_dim + n;
        __m512 acc = tail ? _mm512_maskz_loadu_ps(tail_mask, yb) : _mm512_loadu_ps(yb);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xb[0]), f0, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xb[1]), f1, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xb[2]), f2, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xb[3]), f3, acc);
        if (tail) _mm512_mask_storeu_ps(yb, tail_mask, acc); else _mm512_storeu_ps(yb, acc);
      }
    }
  }
  for (; k < k_dim; ++k) {  // the last k_dim % 4 rows
    const int8_t* wk = w + k * n_dim;
    for (int64_t n = 0; n < n_dim; n += 16) {
      const bool tail = n >= n_vec;
      const __m512 f = tail ? load_tail(wk + n) : load(wk + n);
      for (int64_t b = 0; b < batch; ++b) {
        float* yb = y + b * n_dim + n;
        __m512 acc = tail ? _mm512_maskz_loadu_ps(tail_mask, yb) : _mm512_loadu_ps(yb);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(x[b * k_dim + k]), f, acc);
        if (tail) _mm512_mask_storeu_ps(yb, tail_mask, acc); else _mm512_storeu_ps(yb, acc);
      }
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    float* yb = y + b * n_dim;
    for (int64_t n = 0; n < n_dim; n += 16) {
      if (n >= n_vec) {
        _mm512_mask_storeu_ps(yb + n, tail_mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask, yb + n),
                                                               _mm512_maskz_loadu_ps(tail_mask, scale + n)));
      } else {
        _mm512_storeu_ps(yb + n, _mm512_mul_ps(_mm512_loadu_ps(yb + n), _mm512_loadu_ps(scale + n)));
      }
    }
  }
#undef load
#undef load_tail
}

__attribute__((target("avx2,fma"))) void matvec_avx2(const float* x, const int8_t* w, const float* scale,
                                                      float* y, int64_t batch, int64_t k_dim, int64_t n_dim) {
  std::memset(y, 0, sizeof(float) * batch * n_dim);
  const int64_t n_vec = n_dim / 8 * 8;
#define load(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))
  int64_t k = 0;
  for (; k + kRowsPerStep <= k_dim; k += kRowsPerStep) {
    const int8_t *w0 = w + k * n_dim, *w1 = w0 + n_dim, *w2 = w1 + n_dim, *w3 = w2 + n_dim;
    for (int64_t n = 0; n < n_vec; n += 8) {
      const __m256 f0 = load(w0 + n), f1 = load(w1 + n), f2 = load(w2 + n), f3 = load(w3 + n);
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = x + b * k_dim + k;
        float* yb = y + b * n_dim + n;
        __m256 acc = _mm256_loadu_ps(yb);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xb[0]), f0, acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xb[1]), f1, acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xb[2]), f2, acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xb[3]), f3, acc);
        _mm256_storeu_ps(yb, acc);
      }
    }
  }
  for (; k < k_dim; ++k) {
    const int8_t* wk = w + k * n_dim;
    for (int64_t n = 0; n < n_vec; n += 8) {
      const __m256 f = load(wk + n);
      for (int64_t b = 0; b < batch; ++b) {
        float* yb = y + b * n_dim + n;
        _mm256_storeu_ps(yb, _mm256_fmadd_ps(_mm256_set1_ps(x[b * k_dim + k]), f, _mm256_loadu_ps(yb)));
      }
    }
  }
  for (int64_t b = 0; b < batch; ++b) {  // tail columns (scalar), then the scale
    float* yb = y + b * n_dim;
    for (int64_t n = n_vec; n < n_dim; ++n) {
      float acc = 0.0f;
      for (int64_t kk = 0; kk < k_dim; ++kk) acc += x[b * k_dim + kk] * static_cast<float>(w[kk * n_dim + n]);
      yb[n] = acc;
    }
    for (int64_t n = 0; n < n_dim; ++n) yb[n] *= scale[n];
  }
#undef load
}

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

const Isa kIsa = detect_isa();

ffi::Error Int8MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || scale.element_count() != wd[1]) {
    return ffi::Error::InvalidArgument("int8_matvec: expected x (B, K), w (K, N), scale (N)");
  }
  const int64_t batch = xd[0], k_dim = xd[1], n_dim = wd[1];
  switch (kIsa) {
    case Isa::kAvx512:
      matvec_avx512(x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(), batch, k_dim, n_dim);
      break;
    case Isa::kAvx2:
      matvec_avx2(x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(), batch, k_dim, n_dim);
      break;
    default:
      matvec_scalar(x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(), batch, k_dim, n_dim);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SolarjaxInt8Matvec, Int8MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Which code path the loaded library runs (0 scalar, 1 AVX2, 2 AVX-512), for bench output.
extern "C" int solarjax_int8_matvec_isa() { return static_cast<int>(kIsa); }
