// The portable path: plain C++ (the compiler's baseline x86-64 or other target).
#include "qmatmul.h"

void jaxinfer_int8_rows_scalar(const Problem& p, int64_t o_begin, int64_t o_end) {
  int8_rows_scalar(p, o_begin, o_end);
}

void jaxinfer_f32_rows_scalar(const Problem& p, int64_t o_begin, int64_t o_end) {
  f32_rows(p, o_begin, o_end);
}
