// The sketch kernel built for the avx2 instruction set (flags: setup.py, ISA_FLAGS).
#define AK_ISA avx2
#define AK_ISA_NAME "avx2"
#define AK_VEC_BYTES 32
#define AK_MR 6
#define AK_NR 16
#include "sketch_impl.inc"
