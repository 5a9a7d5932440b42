// The sketch kernel built for the avx512 instruction set (flags: setup.py, ISA_FLAGS).
#define AK_ISA avx512
#define AK_ISA_NAME "avx512"
#define AK_VEC_BYTES 64
#define AK_MR 6
#define AK_NR 64
#include "sketch_impl.inc"
