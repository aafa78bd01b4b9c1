// See vector_copy.h. The AVX2 path is picked at run time, so the extension
// still loads on x86-64 CPUs without AVX2.
#include "vector_copy.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define STRATA_VECTOR_COPY_X86 1
#endif

namespace stratacache {

#ifdef STRATA_VECTOR_COPY_X86
namespace {

// 128 bytes per iteration (four 32-byte lanes); n must be a multiple of 128.
// Stream: non-temporal stores (dst 32-byte aligned), fenced at the end.
template <bool Stream>
__attribute__((target("avx2"))) void copy_avx2(uint8_t* dst, const uint8_t* src, size_t n) {
  for (size_t i = 0; i < n; i += 128) {
    __m256i v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32 * k));
    for (int k = 0; k < 4; ++k) {
      auto* to = reinterpret_cast<__m256i*>(dst + i + 32 * k);
      if constexpr (Stream)
        _mm256_stream_si256(to, v[k]);
      else
        _mm256_storeu_si256(to, v[k]);
    }
  }
  if constexpr (Stream) _mm_sfence();
}

const bool kHaveAvx2 = __builtin_cpu_supports("avx2");

}  // namespace
#endif

void vector_copy(uint8_t* dst, const uint8_t* src, size_t n) {
#ifdef STRATA_VECTOR_COPY_X86
  if (kHaveAvx2 && n >= 4096) {
    const size_t body = n / 128 * 128;
    copy_avx2<false>(dst, src, body);
    if (n > body) std::memcpy(dst + body, src + body, n - body);
    return;
  }
#endif
  if (n) std::memcpy(dst, src, n);
}

void stream_copy(uint8_t* dst, const uint8_t* src, size_t n) {
#ifdef STRATA_VECTOR_COPY_X86
  if (kHaveAvx2 && n >= 4096) {
    // Regular stores up to dst's next 32-byte boundary and for the tail; streaming between.
    const size_t head = (32 - (reinterpret_cast<uintptr_t>(dst) & 31)) & 31;
    const size_t body = (n - head) / 128 * 128;
    std::memcpy(dst, src, head);
    copy_avx2<true>(dst + head, src + head, body);
    std::memcpy(dst + head + body, src + head + body, n - head - body);
    return;
  }
#endif
  vector_copy(dst, src, n);
}

}  // namespace stratacache
