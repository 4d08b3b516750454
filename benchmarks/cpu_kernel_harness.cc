// One-thread timing of the CPU kernels' activation quantization (Prepare) and one ISA's
// product loop on SmolLM2's MLP shapes, with no XLA around them: the figures in
// benchmarks/README.md ("after the AVX2 kernel rework"). The argument picks the weight format:
// q4_1 (int4, groups of 32, zero points; the default), q8_0 (int8, groups of 32) or int8 (one
// group per output channel).
// Build and run from the repository root (KFN picks the path; the AVX-512 one needs a CPU
// with AVX-512 VNNI to run):
//   S=jaxinfer/kernels/cpu/src; I=$(python -c "import jax; print(jax.ffi.include_dir())")
//   F="-O3 -std=c++17 -fno-math-errno"
//   g++ $F -c $S/isa_scalar.cc -o /tmp/s.o && g++ $F -mavx2 -mfma -c $S/isa_avx2.cc -o /tmp/a.o
//   g++ $F -mavx2 -mfma -mavxvnni -c $S/isa_avx2.cc -o /tmp/v.o
//   g++ $F -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma -c $S/isa_avx512.cc -o /tmp/z.o
//   g++ $F -w -I$I -I$S -DKFN=jaxinfer_int8_rows_avx2 benchmarks/cpu_kernel_harness.cc \
//       /tmp/s.o /tmp/a.o /tmp/v.o /tmp/z.o -o /tmp/harness && /tmp/harness q4_1
#include "ffi.cc"
#ifndef KFN  // the product loop to time
#define KFN jaxinfer_int8_rows_avx2
#endif
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
int main(int argc, char** argv) {
  const std::string format = argc > 1 ? argv[1] : "q4_1";
  const int bits = format == "q4_1" ? 4 : 8;
  std::mt19937 g(0);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> nd;
  int shapes[][2] = {{1536, 576}, {576, 1536}};
  for (auto& sh : shapes) {
    int64_t out = sh[0], in = sh[1], group = format == "int8" ? in : 32;
    std::vector<uint8_t> vals(out * in * bits / 8);
    for (auto& v : vals) v = byte(g);
    std::vector<float> sc(out * in / group), zs(out * in / group);
    for (auto& s : sc) s = nd(g) * 0.01f;
    for (auto& z : zs) z = nd(g) * 0.01f;
    for (int rows : {1, 4, 5, 8, 32}) {
      std::vector<float> x(rows * in), y(rows * out);
      for (auto& v : x) v = nd(g);
      Problem p{};
      p.rows = rows; p.parts = 1; p.out = out; p.in = in; p.group = group; p.bits = bits;
      p.x = x.data(); p.values = vals.data(); p.scales = sc.data(); p.zeros = bits == 4 ? zs.data() : nullptr; p.y = y.data();
      int iters = 200;
      double tp = 1e9, tk = 1e9;
      for (int rep = 0; rep < 5; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        Prepared pr;
        for (int i = 0; i < iters; ++i) Prepare(p, true, pr);
        auto t1 = std::chrono::steady_clock::now();
        p.qx = pr.qx.data(); p.dx = pr.dx.data(); p.xsum = pr.xsum.data();
        for (int i = 0; i < iters; ++i) KFN(p, 0, out);
        auto t2 = std::chrono::steady_clock::now();
        tp = std::min(tp, std::chrono::duration<double>(t1 - t0).count() / iters);
        tk = std::min(tk, std::chrono::duration<double>(t2 - t1).count() / iters);
      }
      double macs = double(rows) * out * in;
      printf("%s %4ld x %4ld rows %2d: prepare %7.1f us  kernel %7.1f us  %5.1f GMAC/s\n",
             format.c_str(), out, in, rows, tp * 1e6, tk * 1e6, macs / tk / 1e9);
    }
  }
}
