// Philox4x32-10 and the constants of the projection spec (attrkernels/kernels/projection.py).
#pragma once
#include <cstdint>

namespace ak {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

constexpr uint32_t kStreamRademacher = 0x52414445u;  // "RADE"
constexpr uint32_t kStreamGaussian = 0x47415553u;    // "GAUS"

constexpr int kBlockCols = 128;  // columns per Philox block (Rademacher: one call per block)
constexpr int kLanes = 32;       // Gaussian: 32 Philox calls per block, word j -> cols 32j + l

// The round keys (k0, k1) of the 10 rounds, computed once per seed.
struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
  explicit PhiloxKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
  }
};

// Philox4x32-10 of one counter (c0, c1, c2, c3); out[0..3] are the four 32-bit words.
inline void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                          const PhiloxKeys& key, uint32_t out[4]) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(c0) * kPhiloxM0;
    const uint64_t p1 = static_cast<uint64_t>(c2) * kPhiloxM1;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ key.k0[r];
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ key.k1[r];
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

}  // namespace ak
