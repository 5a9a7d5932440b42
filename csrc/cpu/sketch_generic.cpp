// The sketch kernel built for the generic instruction set (flags: setup.py, ISA_FLAGS).
#define AK_ISA generic
#define AK_ISA_NAME "generic"
#define AK_VEC_BYTES 16
#define AK_MR 3
#define AK_NR 16
#include "sketch_impl.inc"
