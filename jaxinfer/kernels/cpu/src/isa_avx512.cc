// AVX-512 (F, BW, VL) + VNNI: 64 weight bytes per step, vpdpbusd accumulates unsigned weight
// nibbles (or |w| against sign-adjusted activations for int8) times int8 activations.
#include <immintrin.h>

#include "qmatmul.h"

namespace {

constexpr int kMaxRows = 4;  // activation rows sharing each loaded weight chunk


// The last 16, 32 or 48 bytes of a weight row, zero-extended (masked byte loads are slow on
// some CPUs, Zen 4 among them).
inline __m512i load_tail(const uint8_t* w, int64_t left) {
  const __m256i a = left >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))
                               : _mm256_zextsi128_si256(
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  __m512i v = _mm512_zextsi256_si512(a);
  if (left == 48)
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 32)), 2);
  return v;
}

// n < 4 floats into the low lanes (no read past them).
inline __m128 load_few(const float* f, int64_t n) {
  if (n >= 4) return _mm_loadu_ps(f);
  if (n == 1) return _mm_load_ss(f);
  const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f)));
  return n == 2 ? two : _mm_insert_ps(two, _mm_load_ss(f + 2), 0x20);
}

// How the weight scales of a 64-byte chunk map onto its 16 lanes: lane l of the chunk at
// byte `at` lies in group (at + 4 l) / bytes_per_group (a chunk spans at most 4 groups).
struct Lanes {
  __m512i pattern;  // lane -> group offset within the chunk
  int shift;        // log2(bytes per group); -1: one group per row
  explicit Lanes(const Problem& p) {
    const int64_t bpg = p.bits == 8 ? p.group : p.group / 2;
    alignas(64) int32_t idx[16];
    for (int l = 0; l < 16; ++l) idx[l] = bpg < 64 ? (4 * l) / int(bpg) : 0;
    pattern = _mm512_load_si512(idx);
    shift = ngroups(p) > 1 ? __builtin_ctzll(bpg) : -1;  // groups are powers of two
  }
  __m512 scales(const float* sc, int64_t at, int64_t g_count) const {
    if (shift < 0) return _mm512_set1_ps(sc[0]);
    const int64_t first = at >> shift;
    const int64_t count = g_count - first < 4 ? g_count - first : 4;
    const __m128 s = load_few(sc + first, count);  // the row's last groups: no read past them
    return _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(s));
  }
};

// acc plus the zero-point terms of output o for row r, 16 groups per step (the activation
// sums are padded, the zeros are not).
inline __m512 add_zero_terms(const Problem& p, int64_t r, int64_t o, __m512 acc) {
  if (!p.zeros) return acc;
  const int64_t g = ngroups(p);
  for (int64_t part = 0; part < p.parts; ++part) {
    const float* z = p.zeros + (part * p.out + o) * g;
    const float* s = p.xsum + (r * p.parts + part) * g;
    int64_t i = 0;
    for (; i + 16 <= g; i += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(z + i), _mm512_loadu_ps(s + i), acc);
    if (i < g) {
      const __mmask16 live = __mmask16((1u << (g - i)) - 1);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, z + i), _mm512_loadu_ps(s + i), acc);
    }
  }
  return acc;
}

template <int R>
void block(const Problem& p, const Lanes& lanes, int64_t o, int64_t r0) {
  const int64_t g_count = ngroups(p);
  const int64_t row_bytes = p.bits == 8 ? p.in : p.in / 2;
  const __m512i nibble = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  const bool same_block = p.group == 32;
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
      // Activation loads read the prepared (padded) buffer whole, against zero weight bytes.
      const __m512i v = left >= 64 ? _mm512_loadu_si512(w + at) : load_tail(w + at, left);
      const __m512 swl = lanes.scales(sc, at, g_count);
      if (p.bits == 8) {
        const __mmask64 negative = _mm512_movepi8_mask(v);
        const __m512i magnitude = _mm512_abs_epi8(v);
        for (int r = 0; r < R; ++r) {
          __m512i xq = _mm512_loadu_si512(q[r] + at);
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
          __m512i s_lo = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(q[r] + at));
          const __m512i x_hi = _mm512_loadu_si512(q[r] + n + at);
          __m512 t;
          if (same_block) {  // groups of 32: a byte's two nibbles meet one activation block
            t = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(s_lo, hi, x_hi));
            t = _mm512_mul_ps(t, _mm512_loadu_ps(dx[r] + at / 4));
          } else {
            __m512i s_hi = _mm512_dpbusd_epi32(zero, hi, x_hi);
            t = _mm512_mul_ps(_mm512_cvtepi32_ps(s_lo), _mm512_loadu_ps(dx[r] + at / 4));
            t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_hi),
                                _mm512_loadu_ps(dx[r] + n / 4 + at / 4), t);
          }
          acc[r] = _mm512_fmadd_ps(t, swl, acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    p.y[(r0 + r) * p.out + o] = _mm512_reduce_add_ps(add_zero_terms(p, r0 + r, o, acc[r]));
}

// The fast path below: rows of whole 64-byte chunks plus at most one 32-byte half (every int8
// weight, int4 with in % 64 == 0), without `block`'s per-chunk branches, so the compiler keeps
// every accumulator in a register. GPC: weight groups per 64-byte chunk (1, 2 or 4). int4
// groups of 32 (GGUF Q4_0 / Q4_1 / Q4_K) add both nibbles' products in one integer sum, as
// they meet one activation block. A half chunk's upper lanes are zero in weights, activations
// and their scales alike, so they add nothing. One output at a time: reading two or four
// weight rows interleaved (each activation load shared) halved the bandwidth of a product
// streamed from memory, [49,152 x 576] int8 at 1 row: 33 -> 16 GB/s.
template <bool HALF>
inline __m512i load_bytes(const void* at) {
  if (HALF) return _mm512_zextsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(at)));
  return _mm512_loadu_si512(at);
}

template <bool HALF>
inline __m512 load_floats(const float* at) {
  return HALF ? _mm512_zextps256_ps512(_mm256_loadu_ps(at)) : _mm512_loadu_ps(at);
}

// The weight scale of each lane of the chunk at byte `at` (`shift`: log2 of the bytes per
// group, 62 for one group per row); no read past the row's last group.
template <int GPC, bool HALF>
inline __m512 chunk_scales(const float* sc, int64_t at, int shift) {
  if (GPC == 1) return _mm512_set1_ps(sc[at >> shift]);
  const float* first = sc + (GPC == 2 ? at / 32 : at / 16);
  const __m128 s = load_few(first, HALF ? GPC / 2 : GPC);
  const __m512i lanes = GPC == 2
      ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
      : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(s));
}

struct Rows {  // where one part's weights and activations start
  const uint8_t* w;
  const float* sc;
  const int8_t* q;
  const float* dx;
  int64_t stride, n;
  int shift;
};

template <int R, int BITS, int GPC, bool HALF>
__attribute__((always_inline)) inline void chunk(const Rows& t, int64_t at, __m512 (&acc)[R]) {
  constexpr bool kG32 = BITS == 4 && GPC == 4;
  const __m512i nibble = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  const __m512i v = load_bytes<HALF>(t.w + at);
  // int8: |w| and w's sign mask; int4: low and high nibbles
  const __mmask64 negative = BITS == 8 ? _mm512_movepi8_mask(v) : 0;
  const __m512i a = BITS == 8 ? _mm512_abs_epi8(v) : _mm512_and_si512(v, nibble);
  const __m512i b = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  const __m512 swl = chunk_scales<GPC, HALF>(t.sc, at, t.shift);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int8_t* x = t.q + r * t.stride + at;
    const float* d = t.dx + (r * t.stride + at) / 4;
    const __m512i x0 = load_bytes<HALF>(x);
    const __m512 d0 = load_floats<HALF>(d);
    __m512 s;
    if (BITS == 8) {
      const __m512i signed_x = _mm512_mask_sub_epi8(x0, negative, zero, x0);
      s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, a, signed_x)), d0);
    } else {
      const __m512i x1 = load_bytes<HALF>(x + t.n);
      const __m512i lo = _mm512_dpbusd_epi32(zero, a, x0);
      if (kG32) {
        s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(lo, b, x1)), d0);
      } else {
        const __m512 d1 = load_floats<HALF>(d + t.n / 4);
        s = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d0);
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, b, x1)), d1, s);
      }
    }
    acc[r] = _mm512_fmadd_ps(s, swl, acc[r]);
  }
}

template <int R, int BITS, int GPC>
void block_fast(const Problem& p, int shift, int64_t o, int64_t r0) {
  const int64_t row_bytes = BITS == 8 ? p.in : p.in / 2;
  const int64_t whole = row_bytes & ~int64_t(63);
  Rows t;
  t.stride = p.parts * p.in;
  t.n = p.in / 2;
  t.shift = shift;
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t part = 0; part < p.parts; ++part) {
    t.w = weight_row(p, part, o);
    t.sc = p.scales + (part * p.out + o) * ngroups(p);
    t.q = p.qx + (r0 * p.parts + part) * p.in;
    t.dx = p.dx + ((r0 * p.parts + part) * p.in) / 4;
    for (int64_t at = 0; at < whole; at += 64) chunk<R, BITS, GPC, false>(t, at, acc);
    if (whole < row_bytes) chunk<R, BITS, GPC, true>(t, whole, acc);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    p.y[(r0 + r) * p.out + o] = _mm512_reduce_add_ps(add_zero_terms(p, r0 + r, o, acc[r]));
}

template <int BITS, int GPC>
void rows_fast(const Problem& p, int64_t o_begin, int64_t o_end) {
  const int64_t bytes_per_group = BITS == 8 ? p.group : p.group / 2;
  const int shift = ngroups(p) == 1 ? 62 : __builtin_ctzll(bytes_per_group);
  tiled_rows(p, o_begin, o_end, [&](auto rows, int64_t begin, int64_t end, int64_t r) {
    for (int64_t o = begin; o < end; ++o)
      block_fast<decltype(rows)::value, BITS, GPC>(p, shift, o, r);
  });
}

// The fast path's instance for p, or nullptr (int4 with in % 64 == 32).
inline RowsFn fast_rows(const Problem& p) {
  const int64_t bytes_per_group = p.bits == 8 ? p.group : p.group / 2;
  const int gpc = ngroups(p) == 1 || bytes_per_group >= 64 ? 1 : int(64 / bytes_per_group);
  if (p.bits == 8) return gpc == 1 ? rows_fast<8, 1> : rows_fast<8, 2>;
  if (p.in % 64) return nullptr;
  return gpc == 1 ? rows_fast<4, 1> : gpc == 2 ? rows_fast<4, 2> : rows_fast<4, 4>;
}

}  // namespace

void jaxinfer_int8_rows_avx512(const Problem& p, int64_t o_begin, int64_t o_end) {
  if (const RowsFn fast = fast_rows(p)) return fast(p, o_begin, o_end);
  const Lanes lanes(p);
  for (int64_t o = o_begin; o < o_end; ++o) {
    int64_t r = 0;
    for (; r + kMaxRows <= p.rows; r += kMaxRows) block<kMaxRows>(p, lanes, o, r);
    switch (p.rows - r) {
      case 3: block<3>(p, lanes, o, r); break;
      case 2: block<2>(p, lanes, o, r); break;
      case 1: block<1>(p, lanes, o, r); break;
    }
  }
}

void jaxinfer_f32_rows_avx512(const Problem& p, int64_t o_begin, int64_t o_end) {
  f32_rows(p, o_begin, o_end);
}
