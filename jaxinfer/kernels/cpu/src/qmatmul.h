// Quantized matrix products y[rows, out] = x[rows, parts * in] @ W^T, one output row range at
// a time. Included by one translation unit per instruction set (isa_*.cc), each compiled with
// its own -m flags; everything here has internal linkage so no ISA's code leaks into another's.
//
// W is a QArray's storage for one layer: values [parts, out, in] int8, or [parts, out, in / 2]
// uint8 with two 4-bit values per byte (per group of G: byte i holds element i in its low
// nibble and element i + G/2 in its high one); scales (and zeros) [parts, out, in / G] fp32.
// w = q * scale (+ zero). Output o contracts over every part: y[r, o] = sum_p x[r, p] . W[p, o].
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

struct Problem {
  int64_t rows, parts, out, in, group, bits;
  const float* x;         // [rows, parts * in]
  const void* values;     // this layer's values
  const float* scales;    // [parts, out, in / group]
  const float* zeros;     // same shape, or nullptr (int8)
  float* y;               // [rows, out]
  // Activations quantized per block of 32 (int8 mode), laid out per (row, part) to match the
  // weight bytes: int8 weights: q[in] in natural order, dx[in / 4] (the block scale of each
  // 4-value lane); int4 weights: q[in] = lo[in / 2] | hi[in / 2] (the elements that meet byte
  // j's low and high nibble), dx[in / 4] = lo lanes [in / 8] | hi lanes [in / 8].
  const int8_t* qx;
  const float* dx;
  const float* xsum;      // [rows, parts, in / group]: each group's sum of (dequantized) x
};

// Each ISA's entry points: outputs [o_begin, o_end) of every row.
typedef void (*RowsFn)(const Problem&, int64_t o_begin, int64_t o_end);

namespace {

inline int64_t ngroups(const Problem& p) { return p.in / p.group; }

inline const uint8_t* weight_row(const Problem& p, int64_t part, int64_t o) {
  int64_t row_bytes = p.bits == 8 ? p.in : p.in / 2;
  return static_cast<const uint8_t*>(p.values) + (part * p.out + o) * row_bytes;
}

// The zero-point term sum_p sum_g zero[p, o, g] * xsum[r, p, g] (int4 only).
inline float zero_term(const Problem& p, int64_t r, int64_t o) {
  if (!p.zeros) return 0.0f;
  int64_t g = ngroups(p);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t part = 0; part < p.parts; ++part) {
    const float* z = p.zeros + (part * p.out + o) * g;
    const float* s = p.xsum + (r * p.parts + part) * g;
    for (int64_t i = 0; i < g; ++i) acc[i % 8] += z[i] * s[i];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// fp32 activations: each 16 weights dequantized to floats and multiplied into 16 partial
// sums (the compiler vectorizes this loop for the translation unit's instruction set).
inline void f32_rows(const Problem& p, int64_t o_begin, int64_t o_end) {
  const int64_t G = p.group, half = G / 2, g_count = ngroups(p), K = p.parts * p.in;
  for (int64_t o = o_begin; o < o_end; ++o) {
    for (int64_t r = 0; r < p.rows; ++r) {
      float acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = 0.0f;
      for (int64_t part = 0; part < p.parts; ++part) {
        const uint8_t* w = weight_row(p, part, o);
        const float* sc = p.scales + (part * p.out + o) * g_count;
        const float* zp = p.zeros ? p.zeros + (part * p.out + o) * g_count : nullptr;
        const float* x = p.x + r * K + part * p.in;
        for (int64_t e = 0; e < p.in; e += 16) {  // in % 32 == 0
          const int64_t g = e / G;
          const float s = sc[g], z = zp ? zp[g] : 0.0f;
          if (p.bits == 8) {
            const int8_t* q = reinterpret_cast<const int8_t*>(w) + e;
            for (int t = 0; t < 16; ++t) acc[t] += (float(q[t]) * s) * x[e + t];
          } else {
            const int64_t in_group = e % G, shift = in_group < half ? 0 : 4;
            const uint8_t* b = w + g * half + (in_group % half);
            for (int t = 0; t < 16; ++t)
              acc[t] += (float((b[t] >> shift) & 15) * s + z) * x[e + t];
          }
        }
      }
      float total = 0.0f;
      for (int t = 0; t < 16; ++t) total += acc[t];
      p.y[r * p.out + o] = total;
    }
  }
}

// int8 activations, portable: integer sums over runs of 16 (int4) or 32 (int8) values, each
// scaled by its activation block's and weight group's scales.
inline void int8_rows_scalar(const Problem& p, int64_t o_begin, int64_t o_end) {
  const int64_t G = p.group, g_count = ngroups(p);
  for (int64_t o = o_begin; o < o_end; ++o) {
    for (int64_t r = 0; r < p.rows; ++r) {
      float acc = 0.0f;
      for (int64_t part = 0; part < p.parts; ++part) {
        const uint8_t* w = weight_row(p, part, o);
        const float* sc = p.scales + (part * p.out + o) * g_count;
        const int64_t at = (r * p.parts + part) * p.in;
        const int8_t* q = p.qx + at;
        const float* dx = p.dx + at / 4;
        if (p.bits == 8) {
          const int8_t* v = reinterpret_cast<const int8_t*>(w);
          for (int64_t e = 0; e < p.in; e += 32) {
            int32_t s = 0;
            for (int t = 0; t < 32; ++t) s += int32_t(v[e + t]) * q[e + t];
            acc += (float(s) * dx[e / 4]) * sc[e / G];
          }
        } else {
          const int64_t n = p.in / 2;
          for (int64_t j = 0; j < n; j += 16) {
            int32_t lo = 0, hi = 0;
            for (int t = 0; t < 16; ++t) {
              lo += int32_t(w[j + t] & 15) * q[j + t];
              hi += int32_t(w[j + t] >> 4) * q[n + j + t];
            }
            acc += (float(lo) * dx[j / 4] + float(hi) * dx[n / 4 + j / 4]) * sc[j / (G / 2)];
          }
        }
      }
      p.y[r * p.out + o] = acc + zero_term(p, r, o);
    }
  }
}

// The branch-free paths' loop over one thread's outputs [o_begin, o_end): tiles of about
// 256 KB of weights, which every block of 4 rows then reads from L2 rather than memory;
// run(std::integral_constant<int, R>, begin, end, r) computes rows [r, r + R) of a tile.
template <typename Run>
inline void tiled_rows(const Problem& p, int64_t o_begin, int64_t o_end, Run run) {
  const int64_t row_bytes = p.parts * (p.bits == 8 ? p.in : p.in / 2);
  const int64_t tile = std::max<int64_t>(1, (256 << 10) / row_bytes);
  for (int64_t begin = o_begin; begin < o_end; begin += tile) {
    const int64_t end = std::min(begin + tile, o_end);
    int64_t r = 0;
    for (; r + 4 <= p.rows; r += 4) run(std::integral_constant<int, 4>(), begin, end, r);
    switch (p.rows - r) {
      case 3: run(std::integral_constant<int, 3>(), begin, end, r); break;
      case 2: run(std::integral_constant<int, 2>(), begin, end, r); break;
      case 1: run(std::integral_constant<int, 1>(), begin, end, r); break;
    }
  }
}

}  // namespace
