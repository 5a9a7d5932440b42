// The CPU sketch kernel's interface: out[B, k] (+)= x[B, p] @ P[row0 : row0 + p, :k].
#pragma once
#include <cstdint>

namespace ak {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };
enum class Kind : int { rademacher = 0, gaussian = 1 };

struct SketchArgs {
  const void* x = nullptr;  // [B, p], row stride ldx elements, dtype
  DType dtype = DType::f32;
  int64_t B = 0, p = 0, ldx = 0;
  float* out = nullptr;  // [B, k] float32, row stride ldo
  int64_t ldo = 0;
  int64_t k = 0;
  uint64_t seed = 0;
  Kind kind = Kind::rademacher;
  uint64_t row0 = 0;        // global row of P that x's column 0 multiplies
  bool accumulate = false;  // out += x P (else out = x P)
  int threads = 1;
  uint8_t* nonfinite = nullptr;  // [B] set to 1 for rows of x holding NaN or Inf (optional)
  // [p] (optional): colsum[i] += sum_b x[b, i], summed over b in order (b = 0, 1, ...), while x
  // is read for the first column group: the same bits for any thread count and variant.
  float* colsum = nullptr;
  // Kernel variant: index into variant_name() of the ISA build (0 = "panel"). Variants differ in
  // loop order and micro-tile only; they give the same bits (same per-chunk summation order).
  int variant = 0;
};

// Rows [row0, row0 + nrows) of P, all k columns, into out (row stride ldo).
struct RowsArgs {
  float* out = nullptr;
  int64_t ldo = 0;
  uint64_t row0 = 0;
  int64_t nrows = 0, k = 0;
  uint64_t seed = 0;
  Kind kind = Kind::rademacher;
  int threads = 1;
};

// One implementation per instruction set; module.cpp picks one at run time.
#define AK_DECLARE_ISA(name)                     \
  namespace name {                               \
  void sketch(const SketchArgs& args);           \
  void projection_rows(const RowsArgs& args);    \
  const char* describe();                        \
  int variant_count();                           \
  const char* variant_name(int i);               \
  }
AK_DECLARE_ISA(generic)
AK_DECLARE_ISA(avx2)
AK_DECLARE_ISA(avx512)
#undef AK_DECLARE_ISA

}  // namespace ak
