// AVX2 + FMA, with AVX-VNNI's vpdpbusd when compiled with -mavxvnni, else vpmaddubsw +
// vpmaddwd (no saturation: |w| <= 128 and |x| <= 127, so pair sums stay under 2^15).
// 32 weight bytes per step.
#include <immintrin.h>

#include "qmatmul.h"

namespace {

constexpr int kMaxRows = 4;

inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// The sum of two such products (pairs of nibble products stay under 2^15 too).
inline __m256i dot2_u8s8(__m256i u, __m256i s, __m256i u2, __m256i s2) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s), u2, s2);
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u, s), _mm256_maddubs_epi16(u2, s2));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// log2(bytes per weight group), or -1 for one group per row.
inline int group_shift(const Problem& p) {
  if (ngroups(p) == 1) return -1;
  const int64_t bpg = p.bits == 8 ? p.group : p.group / 2;
  return __builtin_ctzll(bpg);  // groups are powers of two
}

// acc plus the zero-point terms of output o for row r, 8 groups per step (the activation
// sums are padded, the zeros are not).
inline __m256 add_zero_terms(const Problem& p, int64_t r, int64_t o, __m256 acc) {
  if (!p.zeros) return acc;
  const int64_t g = ngroups(p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t part = 0; part < p.parts; ++part) {
    const float* z = p.zeros + (part * p.out + o) * g;
    const float* s = p.xsum + (r * p.parts + part) * g;
    int64_t i = 0;
    for (; i + 8 <= g; i += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(z + i), _mm256_loadu_ps(s + i), acc);
    if (i < g) {
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(g - i)), lane);
      acc = _mm256_fmadd_ps(_mm256_maskload_ps(z + i, live), _mm256_loadu_ps(s + i), acc);
    }
  }
  return acc;
}

template <int R>
void block(const Problem& p, int shift, int64_t o, int64_t r0) {
  const int64_t g_count = ngroups(p);
  const int64_t row_bytes = p.bits == 8 ? p.in : p.in / 2;
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i tail = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);  // a 16-byte tail (int4)
  const bool same_block = p.group == 32;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
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
    for (int64_t at = 0; at < row_bytes; at += 32) {
      const bool full = row_bytes - at >= 32;
      const __m256i v = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + at))
                             : _mm256_maskload_epi32(reinterpret_cast<const int*>(w + at), tail);
      // Each 16-byte half lies in one group.
      int64_t g_lo = shift < 0 ? 0 : at >> shift, g_hi = shift < 0 ? 0 : (at + 16) >> shift;
      if (g_hi >= g_count) g_hi = g_count - 1;
      const __m256 swl = _mm256_set_m128(_mm_set1_ps(sc[g_hi]), _mm_set1_ps(sc[g_lo]));
      if (p.bits == 8) {
        const __m256i magnitude = _mm256_abs_epi8(v);
        for (int r = 0; r < R; ++r) {
          __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + at));
          __m256i s = dot_u8s8(magnitude, _mm256_sign_epi8(xq, v));
          __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(dx[r] + at / 4));
          acc[r] = _mm256_fmadd_ps(t, swl, acc[r]);
        }
      } else {
        const __m256i lo = _mm256_and_si256(v, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        const int64_t n = p.in / 2;
        for (int r = 0; r < R; ++r) {
          // The prepared activations are padded, so a full load past a tail reads zeros' peers
          // that meet zero weight bytes.
          __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + at));
          __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + n + at));
          __m256 t;
          if (same_block) {  // groups of 32: a byte's two nibbles meet one activation block
            t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot2_u8s8(lo, x_lo, hi, x_hi)),
                              _mm256_loadu_ps(dx[r] + at / 4));
          } else {
            t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8s8(lo, x_lo)),
                              _mm256_loadu_ps(dx[r] + at / 4));
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(hi, x_hi)),
                                _mm256_loadu_ps(dx[r] + n / 4 + at / 4), t);
          }
          acc[r] = _mm256_fmadd_ps(t, swl, acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    p.y[(r0 + r) * p.out + o] = hsum(add_zero_terms(p, r0 + r, o, acc[r]));
}

// Rows of whole 32-byte chunks, which is every weight but int4 with in % 64 == 32: the same
// sums as `block`, without its per-chunk branches, so the compiler keeps every accumulator in
// a register. int4 groups of 32 (GGUF Q4_0 / Q4_1 / Q4_K) add both nibbles' products in one
// integer sum (they meet one activation block), and a chunk's two 16-byte halves lie in two
// groups; otherwise a chunk lies in one group (`shift`: log2 of the bytes per group, 62 for
// one group per row). One output at a time: reading several weight rows interleaved, each
// activation load shared, was faster with the weights in cache but halved the bandwidth of a
// product streamed from memory, [49,152 x 576] int8 at 1 row: 2.1 -> 1.0 ms.
template <int R, int BITS, bool G32>
void block_fast(const Problem& p, int shift, int64_t o, int64_t r0) {
  const int64_t g_count = ngroups(p), row_bytes = BITS == 8 ? p.in : p.in / 2, n = p.in / 2;
  const int64_t stride = p.parts * p.in;  // between rows of the prepared activations
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t part = 0; part < p.parts; ++part) {
    const uint8_t* w = weight_row(p, part, o);
    const float* sc = p.scales + (part * p.out + o) * g_count;
    const int8_t* q = p.qx + (r0 * p.parts + part) * p.in;
    const float* dx = p.dx + ((r0 * p.parts + part) * p.in) / 4;
    for (int64_t at = 0; at < row_bytes; at += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + at));
      // int8: |w| and w; int4: low and high nibbles
      const __m256i a = BITS == 8 ? _mm256_abs_epi8(v) : _mm256_and_si256(v, nibble);
      const __m256i b = BITS == 8 ? v : _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      __m256 swl;
      if (G32) {
        const __m128 two =
            _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sc + at / 16)));
        swl = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), halves);
      } else {
        swl = _mm256_set1_ps(sc[at >> shift]);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* x = q + r * stride + at;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256 d0 = _mm256_loadu_ps(dx + r * stride / 4 + at / 4);
        __m256 t;
        if (BITS == 8) {
          t = _mm256_cvtepi32_ps(dot_u8s8(a, _mm256_sign_epi8(x0, b)));
          t = _mm256_mul_ps(t, d0);
        } else {
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + n));
          if (G32) {
            t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot2_u8s8(a, x0, b, x1)), d0);
          } else {
            const __m256 d1 = _mm256_loadu_ps(dx + r * stride / 4 + n / 4 + at / 4);
            t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8s8(a, x0)), d0);
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(b, x1)), d1, t);
          }
        }
        acc[r] = _mm256_fmadd_ps(t, swl, acc[r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    p.y[(r0 + r) * p.out + o] = hsum(add_zero_terms(p, r0 + r, o, acc[r]));
}

template <int BITS, bool G32>
void rows_fast(const Problem& p, int64_t o_begin, int64_t o_end) {
  const int shift = ngroups(p) == 1 ? 62 : __builtin_ctzll(BITS == 8 ? p.group : p.group / 2);
  tiled_rows(p, o_begin, o_end, [&](auto rows, int64_t begin, int64_t end, int64_t r) {
    for (int64_t o = begin; o < end; ++o)
      block_fast<decltype(rows)::value, BITS, G32>(p, shift, o, r);
  });
}

}  // namespace

#ifdef __AVXVNNI__
#define ENTRY(name) jaxinfer_##name##_avx2vnni
#else
#define ENTRY(name) jaxinfer_##name##_avx2
#endif

void ENTRY(int8_rows)(const Problem& p, int64_t o_begin, int64_t o_end) {
  if (p.bits == 8) return rows_fast<8, false>(p, o_begin, o_end);
  if (p.in % 64 == 0) {
    if (p.group == 32) return rows_fast<4, true>(p, o_begin, o_end);
    return rows_fast<4, false>(p, o_begin, o_end);
  }
  const int shift = group_shift(p);
  for (int64_t o = o_begin; o < o_end; ++o) {
    int64_t r = 0;
    for (; r + kMaxRows <= p.rows; r += kMaxRows) block<kMaxRows>(p, shift, o, r);
    switch (p.rows - r) {
      case 3: block<3>(p, shift, o, r); break;
      case 2: block<2>(p, shift, o, r); break;
      case 1: block<1>(p, shift, o, r); break;
    }
  }
}

void ENTRY(f32_rows)(const Problem& p, int64_t o_begin, int64_t o_end) {
  f32_rows(p, o_begin, o_end);
}
