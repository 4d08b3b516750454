// Decode attention against a KV cache, one (row, query, kv head) task at a time: the keys that
// query can see are read where they lie in the cache (dense or paged, fp32 / bf16 / int8 with
// per-token scales), scored, soft-maxed exactly (two passes over the scores) and summed into the
// output. A task's arithmetic depends only on its own query and keys, always in the same order,
// so a row's output is bitwise the same whatever the batch, the number of queries per row and
// the cache length allocated; its work follows its own length, not the batch's longest.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

enum CacheType { kF32 = 0, kBF16 = 1, kS8 = 2 };

struct Attention {
  int64_t batch, queries, heads, kv_heads, head_dim;
  int64_t kv_len;                   // positions a row can hold
  int64_t page_size, pages_per_seq, num_pages;  // paged cache; page_size 0: dense
  int64_t type;                     // CacheType of k and v
  const float* q;                   // [batch, queries, heads, head_dim]
  const void *k, *v;                // this layer: dense [batch, kv_heads, kv_len, head_dim],
                                    // paged [kv_heads, num_pages, page_size, head_dim]
  const float *k_scale, *v_scale;   // int8: the same without head_dim; else nullptr
  const int32_t* page_table;        // [batch, pages_per_seq] (paged)
  const int32_t* positions;         // [batch, queries]; < 0: padding, sees nothing
  const int32_t* kv_lengths;        // [batch] or nullptr
  int64_t window;                   // > 0: keys j with p - j < window; 0: none; < 0: no key
  float softcap, scale;             // softcap 0: none
  const float* sinks;               // [heads] or nullptr
  float* out;                       // [batch, queries, heads, head_dim]
};

// Tasks [begin, end) of batch * queries * kv_heads, with scratch for one task (see task).
typedef void (*AttentionFn)(const Attention&, int64_t begin, int64_t end, float* scratch);

namespace {

constexpr int kLanes = 16;

// Cache element i of a token as fp32.
template <int TYPE>
inline float element(const void* base, int64_t i) {
  if (TYPE == kF32) return static_cast<const float*>(base)[i];
  if (TYPE == kS8) return float(static_cast<const int8_t*>(base)[i]);
  uint32_t bits = uint32_t(static_cast<const uint16_t*>(base)[i]) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// exp(x) for x <= 0 without a libm call, so the loop over a row's scores vectorizes: Cephes'
// expf (x = n ln 2 + r, a degree-5 polynomial in r, times 2^n), within 2 ulp of expf; 0 below
// -87.3, where expf leaves the normal floats. The same arithmetic on every path and shape.
inline float exp_nonpositive(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  memcpy(&bits, &p, 4);
  bits += int32_t(n) << 23;
  float out;
  memcpy(&out, &bits, 4);
  return x < -87.3f ? 0.0f : out;
}

inline float lanes_sum(const float* acc) {  // a fixed tree over the 16 lanes
  float s[8];
  for (int l = 0; l < 8; ++l) s[l] = acc[l] + acc[l + 8];
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

// The token's index (in tokens, not elements) in this layer's k or v.
inline int64_t token(const Attention& a, int64_t b, int64_t kv, int64_t j) {
  if (a.page_size == 0) return (b * a.kv_heads + kv) * a.kv_len + j;
  int64_t page = a.page_table[b * a.pages_per_seq + j / a.page_size];
  page = page < 0 ? 0 : (page >= a.num_pages ? a.num_pages - 1 : page);
  return (kv * a.num_pages + page) * a.page_size + j % a.page_size;
}

// a . element<TYPE>(b) over n values, in kLanes partial sums (vectorized without reordering).
template <int TYPE>
inline float dot(const float* a, const void* b, int64_t at, int64_t n) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[d + l] * element<TYPE>(b, at + d + l);
  for (int l = 0; d + l < n; ++l) acc[l] += a[d + l] * element<TYPE>(b, at + d + l);
  return lanes_sum(acc);
}

// scratch: G * (kv_len + head_dim + 1) floats (scores, scaled queries, softmax totals).
template <int TYPE>
void task(const Attention& a, int64_t t, float* scratch) {
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads;
  const int64_t kv = t % a.kv_heads, bq = t / a.kv_heads, b = bq / a.queries;
  const float* q = a.q + (bq * a.heads + kv * G) * D;  // this kv head's G query heads
  float* out = a.out + (bq * a.heads + kv * G) * D;
  const int64_t p = a.positions[bq];
  int64_t end = p + 1 < a.kv_len ? p + 1 : a.kv_len;
  if (a.kv_lengths && a.kv_lengths[b] < end) end = a.kv_lengths[b];
  int64_t start = 0;
  if (a.window > 0 && p - a.window + 1 > 0) start = p - a.window + 1;
  const int64_t n = p < 0 || a.window < 0 ? 0 : end - start;
  for (int64_t i = 0; i < G * D; ++i) out[i] = 0.0f;
  if (n <= 0) return;  // nothing visible: zeros, as in the reference

  float* scores = scratch;  // [G, n]
  float* qs = scratch + G * n;  // [G, D]: the queries times the softmax scale
  float* total = qs + G * D;  // [G]
  for (int64_t i = 0; i < G * D; ++i) qs[i] = a.scale * q[i];
  for (int64_t j = 0; j < n; ++j) {  // each key read once for the G heads that share it
    const int64_t at = token(a, b, kv, start + j);
    const float ks = TYPE == kS8 ? a.k_scale[at] : 1.0f;
    for (int64_t g = 0; g < G; ++g) {
      float s = dot<TYPE>(qs + g * D, a.k, at * D, D) * ks;
      if (a.softcap > 0.0f) s = a.softcap * tanhf(s / a.softcap);
      scores[g * n + j] = s;
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // exact softmax weights: the max, then exps in order
    float* s = scores + g * n;
    const float sink = a.sinks ? a.sinks[kv * G + g] : -INFINITY;
    float best = sink;
    for (int64_t j = 0; j < n; ++j) best = s[j] > best ? s[j] : best;
    for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - best);
    float sum = a.sinks ? exp_nonpositive(sink - best) : 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += s[j];
    total[g] = sum;
  }
  for (int64_t j = 0; j < n; ++j) {  // out_g = sum_j w_gj v_j / total_g, keys in order
    const int64_t at = token(a, b, kv, start + j);
    const float vs = TYPE == kS8 ? a.v_scale[at] : 1.0f;
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * n + j] * vs;
      float* o = out + g * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w * element<TYPE>(a.v, at * D + d);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] /= total[g];
}

template <int TYPE>
void tasks(const Attention& a, int64_t begin, int64_t end, float* scratch) {
  for (int64_t t = begin; t < end; ++t) task<TYPE>(a, t, scratch);
}

inline void attention_tasks(const Attention& a, int64_t begin, int64_t end, float* scratch) {
  if (a.type == kF32) return tasks<kF32>(a, begin, end, scratch);
  if (a.type == kBF16) return tasks<kBF16>(a, begin, end, scratch);
  tasks<kS8>(a, begin, end, scratch);
}

}  // namespace
