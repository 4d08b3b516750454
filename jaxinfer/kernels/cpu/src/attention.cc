// The decode attention (attention.h) for one instruction set: build.py compiles this unit once
// per set with its -m flags and -DJAXINFER_ISA=<name>, and the compiler vectorizes the lane
// loops for it.
#include "attention.h"

#define JAXINFER_ENTRY2(isa) jaxinfer_attention_##isa
#define JAXINFER_ENTRY(isa) JAXINFER_ENTRY2(isa)

void JAXINFER_ENTRY(JAXINFER_ISA)(const Attention& a, int64_t begin, int64_t end,
                                  float* scratch) {
  attention_tasks(a, begin, end, scratch);
}
