// CUDA sketch kernels: out[B, k] (+)= x[B, p] @ P[row_offset : row_offset + p, :k].
//
// Loaded at run time through CuPy (attrkernels/kernels/sketch_cuda.py); compiled in CI with nvcc
// for sm_80 and sm_90 so syntax and type errors cannot land.
//
// A block of 128 threads owns 32 rows of x (blockIdx.x), one 128-column block of P (blockIdx.y)
// and a slice of the p axis (blockIdx.z, partial sums added later in a fixed order). For each
// step of 32 rows of P it stages the x tile in shared memory, generates the 32 x 128 tile of P
// (spec: attrkernels/kernels/projection.py; Philox4x32-10, column c = 128 blk + 32 j + l), and
// accumulates in float32:
//   * sketch_f32: x float32 (or any dtype widened to float32), SIMT FMAs; thread t owns column t.
//   * sketch_wmma_f16 / sketch_wmma_bf16: tensor cores (wmma 16x16x16, float32 accumulators);
//     Gaussian tiles are split into 2 (f16) or 3 (bf16) terms so P keeps float32 precision.
// P tiles are unscaled (+-1 or N(0, 1)); results are multiplied by scale = 1/sqrt(k).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#define AK_TB 32   // rows of x per block
#define AK_TP 32   // rows of P per step
#define AK_TN 128  // columns of P per block
#define AK_THREADS 128

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr uint32_t kStreamRademacher = 0x52414445u, kStreamGaussian = 0x47415553u;

__device__ __forceinline__ void philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                       uint64_t seed, uint32_t out[4]) {
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Box-Muller of one word pair, the same float32 algorithm as the CPU kernel.
__device__ __forceinline__ void box_muller(uint32_t wu, uint32_t wa, float& zc, float& zs) {
  const float u = (float)(wu >> 9) * 1.1920928955078125e-07f + 5.960464477539063e-08f;
  const int ub = __float_as_int(u);
  int e = (ub >> 23) - 127;
  float m = __int_as_float((ub & 0x7FFFFF) | 0x3F800000);
  if (m > 1.3333333333333333f) {
    m *= 0.5f;
    e += 1;
  }
  const float f = m - 1.0f;
  float r = 0.13724440336227417f;
  r = r * f - 0.15393517911434174f;
  r = r * f + 0.14060916006565094f;
  r = r * f - 0.16414666175842285f;
  r = r * f + 0.20006904006004333f;
  r = r * f - 0.2500792443752289f;
  r = r * f + 0.33333277702331543f;
  r = r * f - 0.49999934434890747f;
  const float ef = (float)e;
  const float lnu = ef * 0.693359375f + (ef * -2.12194440e-4f + (f + f * f * r));
  const float radius = __fsqrt_rn(lnu * -2.0f);
  const uint32_t q = wa >> 30;
  const float fa = (float)((wa >> 7) & 0x7FFFFFu) * 1.1920928955078125e-07f + 5.960464477539063e-08f;
  const bool upper = fa > 0.5f;
  const float h = upper ? 1.0f - fa : fa;
  const float h2 = h * h;
  float s = -0.004603915847837925f;
  s = s * h2 + 0.07968097180128098f;
  s = s * h2 - 0.6459635496139526f;
  s = s * h2 + 1.5707963705062866f;
  s = s * h;
  float c = -0.020411554723978043f;
  c = c * h2 + 0.25360044836997986f;
  c = c * h2 - 1.2336972951889038f;
  c = c * h2 + 1.0f;
  const bool swap = upper ^ ((q & 1u) != 0);
  float cs = swap ? s : c, sn = swap ? c : s;
  if ((q ^ (q >> 1)) & 1u) cs = -cs;
  if (q >> 1) sn = -sn;
  zc = radius * cs;
  zs = radius * sn;
}

// Fill tile[AK_TP][AK_TN] (float) with rows [grow0, grow0 + AK_TP) of P, block blk, unscaled.
__device__ __forceinline__ void generate_tile(float (*tile)[AK_TN], uint64_t grow0, uint32_t blk,
                                              uint64_t seed, int gaussian) {
  const int t = threadIdx.x;
  if (gaussian) {
    const int l = t & 31;
#pragma unroll 2
    for (int r = t >> 5; r < AK_TP; r += AK_THREADS / 32) {
      const uint64_t row = grow0 + (uint64_t)r;
      uint32_t w[4];
      philox((uint32_t)row, (uint32_t)(row >> 32), blk * 32u + (uint32_t)l, kStreamGaussian, seed, w);
      box_muller(w[0], w[1], tile[r][l], tile[r][32 + l]);
      box_muller(w[2], w[3], tile[r][64 + l], tile[r][96 + l]);
    }
  } else {
    __shared__ uint32_t words[AK_TP][4];
    if (t < AK_TP) {
      const uint64_t row = grow0 + (uint64_t)t;
      philox((uint32_t)row, (uint32_t)(row >> 32), blk, kStreamRademacher, seed, words[t]);
    }
    __syncthreads();
    for (int r = 0; r < AK_TP; ++r) tile[r][t] = ((words[r][t >> 5] >> (t & 31)) & 1u) ? -1.0f : 1.0f;
  }
}

template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

struct Shape {
  int64_t B, p, k, ldx, lds, ldo, slice_rows;
  uint64_t row_offset, seed;
  float scale;
  int gaussian, accumulate;
};

template <class T>
__device__ void sketch_simt(const T* __restrict__ x, float* __restrict__ out, const Shape& s) {
  __shared__ float xs[AK_TB][AK_TP + 1];
  __shared__ float tile[AK_TP][AK_TN];
  const int t = threadIdx.x;
  const int64_t b0 = (int64_t)blockIdx.x * AK_TB;
  const uint32_t blk = blockIdx.y;
  const int64_t p0 = (int64_t)blockIdx.z * s.slice_rows;
  const int64_t p1 = min(s.p, p0 + s.slice_rows);
  float acc[AK_TB];
#pragma unroll
  for (int i = 0; i < AK_TB; ++i) acc[i] = 0.0f;
  for (int64_t r0 = p0; r0 < p1; r0 += AK_TP) {
    for (int e = t; e < AK_TB * AK_TP; e += AK_THREADS) {
      const int i = e / AK_TP, kk = e % AK_TP;
      const int64_t b = b0 + i, r = r0 + kk;
      xs[i][kk] = (b < s.B && r < p1) ? to_float<T>(x[b * s.ldx + r]) : 0.0f;
    }
    generate_tile(tile, s.row_offset + (uint64_t)r0, blk, s.seed, s.gaussian);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < AK_TP; ++kk) {
      const float pv = tile[kk][t];
#pragma unroll
      for (int i = 0; i < AK_TB; ++i) acc[i] = fmaf(xs[i][kk], pv, acc[i]);
    }
    __syncthreads();
  }
  const int64_t col = (int64_t)blk * AK_TN + t;
  if (col >= s.k) return;
  float* o = out + (int64_t)blockIdx.z * s.lds;
  for (int i = 0; i < AK_TB; ++i) {
    const int64_t b = b0 + i;
    if (b >= s.B) break;
    const float v = acc[i] * s.scale;
    o[b * s.ldo + col] = s.accumulate ? o[b * s.ldo + col] + v : v;
  }
}

// Tensor-core path. T is __half or __nv_bfloat16; NTERMS pieces of P (1 when exact).
template <class T, int NTERMS>
__device__ void sketch_wmma(const T* __restrict__ x, float* __restrict__ out, const Shape& s) {
  using namespace nvcuda;
  __shared__ __align__(32) T xs[AK_TB][AK_TP];
  __shared__ __align__(32) T pt[NTERMS][AK_TP][AK_TN];
  __shared__ float tile[AK_TP][AK_TN];
  __shared__ __align__(32) float stage[4][16][16];
  const int t = threadIdx.x, warp = t >> 5;
  const int64_t b0 = (int64_t)blockIdx.x * AK_TB;
  const uint32_t blk = blockIdx.y;
  const int64_t p0 = (int64_t)blockIdx.z * s.slice_rows;
  const int64_t p1 = min(s.p, p0 + s.slice_rows);
  const int nterms = s.gaussian ? NTERMS : 1;
  // warp w owns columns [32 w, 32 w + 32): fragments (row block rb, column block cb).
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int rb = 0; rb < 2; ++rb)
#pragma unroll
    for (int cb = 0; cb < 2; ++cb) wmma::fill_fragment(acc[rb][cb], 0.0f);
  for (int64_t r0 = p0; r0 < p1; r0 += AK_TP) {
    for (int e = t; e < AK_TB * AK_TP; e += AK_THREADS) {
      const int i = e / AK_TP, kk = e % AK_TP;
      const int64_t b = b0 + i, r = r0 + kk;
      xs[i][kk] = (b < s.B && r < p1) ? x[b * s.ldx + r] : T(0.0f);
    }
    generate_tile(tile, s.row_offset + (uint64_t)r0, blk, s.seed, s.gaussian);
    __syncthreads();
    for (int e = t; e < AK_TP * AK_TN; e += AK_THREADS) {
      const int kk = e / AK_TN, c = e % AK_TN;
      // Rows of P beyond p1 multiply zeros of xs; keep them finite.
      float rest = tile[kk][c];
      for (int term = 0; term < nterms; ++term) {
        const T piece = T(rest);
        pt[term][kk][c] = piece;
        rest -= to_float<T>(piece);
      }
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < AK_TP; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
#pragma unroll
      for (int rb = 0; rb < 2; ++rb) wmma::load_matrix_sync(fa[rb], &xs[rb * 16][ks], AK_TP);
      for (int term = 0; term < nterms; ++term) {
#pragma unroll
        for (int cb = 0; cb < 2; ++cb) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, &pt[term][ks][warp * 32 + cb * 16], AK_TN);
#pragma unroll
          for (int rb = 0; rb < 2; ++rb) wmma::mma_sync(acc[rb][cb], fa[rb], fb, acc[rb][cb]);
        }
      }
    }
    __syncthreads();
  }
  float* o = out + (int64_t)blockIdx.z * s.lds;
  const int lane = t & 31;
  for (int rb = 0; rb < 2; ++rb) {
    for (int cb = 0; cb < 2; ++cb) {
      wmma::store_matrix_sync(&stage[warp][0][0], acc[rb][cb], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int i = e / 16, j = e % 16;
        const int64_t b = b0 + rb * 16 + i;
        const int64_t col = (int64_t)blk * AK_TN + warp * 32 + cb * 16 + j;
        if (b < s.B && col < s.k) {
          const float v = stage[warp][i][j] * s.scale;
          o[b * s.ldo + col] = s.accumulate ? o[b * s.ldo + col] + v : v;
        }
      }
      __syncwarp();
    }
  }
}

}  // namespace

#define AK_SHAPE_ARGS                                                                          \
  int64_t B, int64_t p, int64_t k, int64_t ldx, int64_t lds, int64_t ldo, int64_t slice_rows, \
      uint64_t row_offset, uint64_t seed, float scale, int gaussian, int accumulate
#define AK_SHAPE {B, p, k, ldx, lds, ldo, slice_rows, row_offset, seed, scale, gaussian, accumulate}

extern "C" __global__ void __launch_bounds__(AK_THREADS)
    sketch_f32(const float* x, float* out, AK_SHAPE_ARGS) {
  const Shape s = AK_SHAPE;
  sketch_simt<float>(x, out, s);
}

extern "C" __global__ void __launch_bounds__(AK_THREADS)
    sketch_wmma_f16(const __half* x, float* out, AK_SHAPE_ARGS) {
  const Shape s = AK_SHAPE;
  sketch_wmma<__half, 2>(x, out, s);
}

extern "C" __global__ void __launch_bounds__(AK_THREADS)
    sketch_wmma_bf16(const __nv_bfloat16* x, float* out, AK_SHAPE_ARGS) {
  const Shape s = AK_SHAPE;
  sketch_wmma<__nv_bfloat16, 3>(x, out, s);
}
