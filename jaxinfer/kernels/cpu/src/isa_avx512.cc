// AVX-512 (F, BW, VL) + VNNI: 64 weight bytes per step, vpdpbusd accumulates unsigned weight
// nibbles (or |w| against sign-adjusted activations for int8) times int8 activations.
#include <immintrin.h>

#include "qmatmul.h"

namespace {

constexpr int kMaxRows = 4;  // activation rows sharing each loaded weight chunk

// Per-lane weight scales: lane l of a 64-byte chunk starting at byte `at` lies in group
// (at + 4 l) / bytes_per_group; a chunk spans at most 4 groups.
inline __m512 lane_scales(const float* sc, int64_t at, int64_t bytes_per_group, int64_t g_count,
                          __m512i idx_pattern) {
  int64_t first = at / bytes_per_group;
  int64_t count = g_count - first < 4 ? g_count - first : 4;
  __m512 s = _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1), sc + first);
  return _mm512_permutexvar_ps(idx_pattern, s);
}

template <int R>
void block(const Problem& p, int64_t o, int64_t r0) {
  const int64_t g_count = ngroups(p), K = p.parts * p.in;
  const int64_t row_bytes = p.bits == 8 ? p.in : p.in / 2;
  const int64_t bpg = p.bits == 8 ? p.group : p.group / 2;  // bytes per group
  // Lane -> group offset within a chunk (chunks start at multiples of 64 bytes).
  alignas(64) int32_t idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = bpg < 64 ? (4 * l) / int(bpg) : 0;
  const __m512i idx_pattern = _mm512_load_si512(idx);
  const __m512i nibble = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t part = 0; part < p.parts; ++part) {
    const uint8_t* w = weight_row(p, part, o);
    const float* sc = p.scales + (part * p.out + o) * g_count;
    const int8_t* q[R];
    const float* dx[R];
    for (int r = 0; r < R; ++r) {
      int64_t at = ((r0 + r) * p.parts + part) * p.in;
      q[r] = p.qx + at;
      dx[r] = p.dx + at / 4;
    }
    for (int64_t at = 0; at < row_bytes; at += 64) {
      const int64_t left = row_bytes - at;
      const __mmask64 m = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      const __m512i v = _mm512_maskz_loadu_epi8(m, w + at);
      const __m512 swl = lane_scales(sc, at, bpg, g_count, idx_pattern);
      if (p.bits == 8) {
        const __mmask64 negative = _mm512_movepi8_mask(v);
        const __m512i magnitude = _mm512_abs_epi8(v);
        for (int r = 0; r < R; ++r) {
          __m512i xq = _mm512_maskz_loadu_epi8(m, q[r] + at);
          xq = _mm512_mask_sub_epi8(xq, negative, zero, xq);
          __m512i s = _mm512_dpbusd_epi32(zero, magnitude, xq);
          __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(dx[r] + at / 4));
          acc[r] = _mm512_fmadd_ps(t, swl, acc[r]);
        }
      } else {
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        const int64_t n = p.in / 2;
        for (int r = 0; r < R; ++r) {
          __m512i s_lo = _mm512_dpbusd_epi32(zero, lo, _mm512_maskz_loadu_epi8(m, q[r] + at));
          __m512i s_hi = _mm512_dpbusd_epi32(zero, hi, _mm512_maskz_loadu_epi8(m, q[r] + n + at));
          __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s_lo), _mm512_loadu_ps(dx[r] + at / 4));
          t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_hi), _mm512_loadu_ps(dx[r] + n / 4 + at / 4), t);
          acc[r] = _mm512_fmadd_ps(t, swl, acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    p.y[(r0 + r) * p.out + o] = _mm512_reduce_add_ps(acc[r]) + zero_term(p, r0 + r, o);
  (void)K;
}

}  // namespace

void jaxinfer_int8_rows_avx512(const Problem& p, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    int64_t r = 0;
    for (; r + kMaxRows <= p.rows; r += kMaxRows) block<kMaxRows>(p, o, r);
    switch (p.rows - r) {
      case 3: block<3>(p, o, r); break;
      case 2: block<2>(p, o, r); break;
      case 1: block<1>(p, o, r); break;
    }
  }
}

void jaxinfer_f32_rows_avx512(const Problem& p, int64_t o_begin, int64_t o_end) {
  f32_rows(p, o_begin, o_end);
}
