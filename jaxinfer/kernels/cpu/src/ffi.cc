// The XLA FFI handler: prepares the activations once per call, then splits the outputs over
// XLA's intra-op thread pool. Every output is computed by the same code whatever the number
// of rows or threads, so a row's result does not depend on the batch it came in.
#include <cpuid.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "attention.h"
#include "qmatmul.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

void jaxinfer_int8_rows_scalar(const Problem&, int64_t, int64_t);
void jaxinfer_f32_rows_scalar(const Problem&, int64_t, int64_t);
void jaxinfer_int8_rows_avx2(const Problem&, int64_t, int64_t);
void jaxinfer_f32_rows_avx2(const Problem&, int64_t, int64_t);
void jaxinfer_int8_rows_avx2vnni(const Problem&, int64_t, int64_t);
void jaxinfer_f32_rows_avx2vnni(const Problem&, int64_t, int64_t);
void jaxinfer_int8_rows_avx512(const Problem&, int64_t, int64_t);
void jaxinfer_f32_rows_avx512(const Problem&, int64_t, int64_t);
void jaxinfer_attention_scalar(const Attention&, int64_t, int64_t, float*);
void jaxinfer_attention_avx2(const Attention&, int64_t, int64_t, float*);
void jaxinfer_attention_avx512(const Attention&, int64_t, int64_t, float*);

namespace {

// Instruction sets, as the `isa` attribute names them (0: the best this CPU and OS allow).
enum Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx2Vnni = 3, kAvx512Vnni = 4 };

const RowsFn kInt8Rows[] = {nullptr, jaxinfer_int8_rows_scalar, jaxinfer_int8_rows_avx2,
                            jaxinfer_int8_rows_avx2vnni, jaxinfer_int8_rows_avx512};
const RowsFn kF32Rows[] = {nullptr, jaxinfer_f32_rows_scalar, jaxinfer_f32_rows_avx2,
                           jaxinfer_f32_rows_avx2vnni, jaxinfer_f32_rows_avx512};
const AttentionFn kAttention[] = {nullptr, jaxinfer_attention_scalar, jaxinfer_attention_avx2,
                                  jaxinfer_attention_avx2, jaxinfer_attention_avx512};

// Bit i set: Isa i runs here. Checks both CPUID and that the OS saves the vector state
// (XGETBV), so an instruction set the kernel has not enabled is never used.
int DetectIsas() {
  int isas = 1 << kScalar;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return isas;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12);
  if (!osxsave) return isas;
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool os_avx = (xcr0_lo & 0x6) == 0x6, os_avx512 = (xcr0_lo & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return isas;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31), avx512vnni = c & (1u << 11);
  __get_cpuid_count(7, 1, &a, &b, &c, &d);
  const bool avxvnni = a & (1u << 4);
  if (os_avx && avx2 && fma) isas |= 1 << kAvx2;
  if (os_avx && avx2 && fma && avxvnni) isas |= 1 << kAvx2Vnni;
  if (os_avx512 && avx512f && avx512bw && avx512vl && avx512vnni && fma) isas |= 1 << kAvx512Vnni;
  return isas;
}

const int kIsas = DetectIsas();

int BestIsa() {
  for (int isa = kAvx512Vnni; isa > kScalar; --isa)
    if (kIsas & (1 << isa)) return isa;
  return kScalar;
}

// Activations quantized per block of 32 values (llama.cpp's Q8_0 rounding: d = amax / 127,
// q = round-half-even(x / d)), laid out as Problem describes for the weight's bit width.
struct Prepared {
  std::vector<int8_t> qx;
  std::vector<float> dx, xsum;
};

// round-half-even in the default rounding mode without a libm call (|v| <= 2^22 here): the
// compiler vectorizes the loops below for the baseline target.
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

void Prepare(const Problem& p, bool quantize, Prepared& out) {
  const int64_t K = p.parts * p.in, g_count = ngroups(p), pad = 64;
  if (quantize) {
    out.qx.assign(p.rows * K + pad, 0);
    out.dx.assign(p.rows * K / 4 + pad, 0.0f);
  }
  out.xsum.assign(p.rows * p.parts * g_count + pad, 0.0f);
  std::vector<int8_t> q(p.in);
  std::vector<float> d(p.in / 32);
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t part = 0; part < p.parts; ++part) {
      const int64_t at = (r * p.parts + part) * p.in;
      const float* x = p.x + r * K + part * p.in;
      float* xsum = out.xsum.data() + (r * p.parts + part) * g_count;
      if (!quantize) {
        for (int64_t g = 0; g < g_count; ++g) {
          float s = 0.0f;
          for (int64_t e = g * p.group; e < (g + 1) * p.group; ++e) s += x[e];
          xsum[g] = s;
        }
        continue;
      }
      for (int64_t b = 0; b < p.in / 32; ++b) {
        const float* xb = x + 32 * b;
        float amax = 0.0f;
        for (int t = 0; t < 32; ++t) {
          const float a = std::fabs(xb[t]);
          amax = a > amax ? a : amax;
        }
        const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        int32_t sum = 0;
        for (int t = 0; t < 32; ++t) {
          q[32 * b + t] = int8_t(round_even(xb[t] * inv));
          sum += q[32 * b + t];
        }
        d[b] = scale;
        xsum[32 * b / p.group] += scale * float(sum);
      }
      int8_t* qx = out.qx.data() + at;
      float* dx = out.dx.data() + at / 4;
      if (p.bits == 8) {
        std::copy(q.begin(), q.end(), qx);
        for (int64_t l = 0; l < p.in / 4; ++l) dx[l] = d[l / 8];
      } else {  // byte j of group g: element g*G + j%(G/2) (low nibble) and + G/2 (high)
        const int64_t half = p.group / 2, n = p.in / 2;
        for (int64_t g = 0; g < g_count; ++g) {
          std::copy_n(q.data() + g * p.group, half, qx + g * half);
          std::copy_n(q.data() + g * p.group + half, half, qx + n + g * half);
          for (int64_t l = 0; l < half / 4; ++l) {  // a lane's 4 values lie in one block
            dx[g * half / 4 + l] = d[(g * p.group + 4 * l) / 32];
            dx[n / 4 + g * half / 4 + l] = d[(g * p.group + half + 4 * l) / 32];
          }
        }
      }
    }
  }
}

// Runs fn(begin, end) over [0, total) in chunks on the calling thread and XLA's intra-op pool.
struct Work {
  std::function<void(int64_t, int64_t)> fn;
  int64_t total, chunk, n_chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      fn(c * chunk, std::min((c + 1) * chunk, total));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t chunk,
                 std::function<void(int64_t, int64_t)> fn) {
  auto work = std::make_shared<Work>();
  work->fn = std::move(fn);
  work->total = total;
  work->chunk = chunk;
  work->n_chunks = (total + chunk - 1) / chunk;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads, work->n_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  // Only chunks another thread has claimed (and is running) remain: wait for them.
  while (work->done.load(std::memory_order_acquire) < work->n_chunks) std::this_thread::yield();
}

ffi::Error CheckIsa(int64_t& isa) {
  if (isa == kAuto) isa = BestIsa();
  if (isa < kScalar || isa > kAvx512Vnni || !(kIsas & (1 << isa)))
    return ffi::Error::InvalidArgument("instruction set not available on this CPU");
  return ffi::Error::Success();
}

int64_t Clamp(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer values,
                   ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> zeros,
                   ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int64_t bits,
                   int64_t group, int64_t isa, int64_t act_int8) {
  // values [layers, parts, out, in_stored]; x [rows, parts * in]; y [rows, out].
  auto vd = values.dimensions();
  if (vd.size() != 4 || x.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("qmatmul: values must be 4-d and x 2-d");
  Problem p{};
  const int64_t layers = vd[0];
  p.parts = vd[1];
  p.out = vd[2];
  p.in = bits == 8 ? vd[3] : vd[3] * 2;
  p.rows = x.dimensions()[0];
  p.group = group;
  p.bits = bits;
  if (x.dimensions()[1] != p.parts * p.in || p.in % 32 || group % 32)
    return ffi::Error::InvalidArgument("qmatmul: shapes do not match");
  if (ffi::Error e = CheckIsa(isa); e.failure()) return e;
  const int64_t index = Clamp(*layer.typed_data(), layers);
  const int64_t layer_elems = p.parts * p.out * vd[3];
  const int64_t layer_groups = p.parts * p.out * (p.in / group);
  p.values = static_cast<const uint8_t*>(values.untyped_data()) + index * layer_elems;
  p.scales = scales.typed_data() + index * layer_groups;
  p.zeros = bits == 4 ? zeros.typed_data() + index * layer_groups : nullptr;
  p.x = x.typed_data();
  p.y = y->typed_data();
  Prepared prepared;
  Prepare(p, act_int8 != 0, prepared);
  p.qx = prepared.qx.data();
  p.dx = prepared.dx.data();
  p.xsum = prepared.xsum.data();

  const RowsFn rows_fn = act_int8 ? kInt8Rows[isa] : kF32Rows[isa];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  ParallelFor(pool, p.out, std::max<int64_t>(8, p.out / (8 * threads)),
              [&](int64_t begin, int64_t end) { rows_fn(p, begin, end); });
  return ffi::Error::Success();
}


ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::Buffer<ffi::F32> k_scale,
                           ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> page_table,
                           ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> kv_lengths,
                           ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::F32> sinks,
                           ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out,
                           int64_t paged, int64_t has_lengths, int64_t has_window,
                           int64_t has_sinks, float softcap, float scale, int64_t isa) {
  // q, out [batch, queries, heads, head_dim]; k, v: dense [layers, batch, kv_heads, kv_len,
  // head_dim] or paged [layers, kv_heads, num_pages, page_size, head_dim].
  auto qd = q.dimensions(), kd = k.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || k.element_type() != v.element_type() ||
      !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("attention: q must be 4-d, k and v 5-d and alike");
  Attention a{};
  a.batch = qd[0];
  a.queries = qd[1];
  a.heads = qd[2];
  a.head_dim = qd[3];
  a.kv_heads = paged ? kd[1] : kd[2];
  if (kd[4] != a.head_dim || a.heads % a.kv_heads || (!paged && kd[1] != a.batch))
    return ffi::Error::InvalidArgument("attention: q and the cache do not match");
  if (paged) {
    a.num_pages = kd[2];
    a.page_size = kd[3];
    a.pages_per_seq = page_table.dimensions()[1];
    a.kv_len = a.pages_per_seq * a.page_size;
  } else {
    a.kv_len = kd[3];
  }
  switch (k.element_type()) {
    case ffi::DataType::F32: a.type = kF32; break;
    case ffi::DataType::BF16: a.type = kBF16; break;
    case ffi::DataType::S8: a.type = kS8; break;
    default: return ffi::Error::InvalidArgument("attention: the cache must be f32, bf16 or s8");
  }
  if (ffi::Error e = CheckIsa(isa); e.failure()) return e;
  const int64_t index = Clamp(*layer.typed_data(), kd[0]);
  const int64_t layer_tokens = kd[1] * kd[2] * kd[3];
  const int64_t layer_bytes = layer_tokens * a.head_dim * (a.type == kF32 ? 4 : 3 - a.type);
  a.k = static_cast<const char*>(k.untyped_data()) + index * layer_bytes;
  a.v = static_cast<const char*>(v.untyped_data()) + index * layer_bytes;
  if (a.type == kS8) {
    a.k_scale = k_scale.typed_data() + index * layer_tokens;
    a.v_scale = v_scale.typed_data() + index * layer_tokens;
  }
  a.q = q.typed_data();
  a.page_table = paged ? page_table.typed_data() : nullptr;
  a.positions = positions.typed_data();
  a.kv_lengths = has_lengths ? kv_lengths.typed_data() : nullptr;
  a.window = has_window ? std::max<int64_t>(*window.typed_data(), 0) : 0;
  if (has_window && a.window == 0) a.window = -1;  // a window of 0 sees nothing
  a.softcap = softcap;
  a.scale = scale;
  a.sinks = has_sinks ? sinks.typed_data() : nullptr;
  a.out = out->typed_data();
  const AttentionFn fn = kAttention[isa];
  const size_t scratch_size = a.heads / a.kv_heads * (a.kv_len + a.head_dim + 1);
  ParallelFor(pool, a.batch * a.queries * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // grown once per thread, never cleared
    if (scratch.size() < scratch_size) scratch.resize(scratch_size);
    fn(a, begin, end, scratch.data());
  });
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("act_int8"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("paged")
                                  .Attr<int64_t>("has_lengths")
                                  .Attr<int64_t>("has_window")
                                  .Attr<int64_t>("has_sinks")
                                  .Attr<float>("softcap")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("isa"));

extern "C" int jaxinfer_cpu_isas() { return kIsas; }
#pragma GCC visibility pop
