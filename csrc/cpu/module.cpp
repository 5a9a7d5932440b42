// attrkernels._C: the CPU kernels, with the instruction set chosen at run time.
//
// Tensors cross the boundary as raw data pointers plus shapes; the Python wrappers
// (attrkernels/kernels/*.py) own validation, dtypes, contiguity and lifetimes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <map>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "sketch.hpp"

namespace py = pybind11;

namespace ak {
namespace {

std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  f["sse4.2"] = __builtin_cpu_supports("sse4.2");
  f["avx"] = __builtin_cpu_supports("avx");
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["fma"] = __builtin_cpu_supports("fma");
  f["f16c"] = __builtin_cpu_supports("f16c");
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512dq"] = __builtin_cpu_supports("avx512dq");
  f["avx512bw"] = __builtin_cpu_supports("avx512bw");
  f["avx512vl"] = __builtin_cpu_supports("avx512vl");
  f["avx512bf16"] = __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

// "intel", "amd" or "other", from cpuid.
std::string cpu_vendor() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return "intel";
  if (__builtin_cpu_is("amd")) return "amd";
#endif
  return "other";
}

// The processor brand string (cpuid 0x80000002..4), e.g. "AMD EPYC 9R14 96-Core Processor".
std::string cpu_model() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned int regs[12] = {0};
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000004u) {
    for (unsigned int i = 0; i < 3; ++i)
      __get_cpuid(0x80000002u + i, &regs[4 * i], &regs[4 * i + 1], &regs[4 * i + 2], &regs[4 * i + 3]);
    std::string s(reinterpret_cast<const char*>(regs), 48);
    s = s.c_str();  // up to the first NUL
    const auto b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
  }
#endif
  return "";
}

struct Isa {
  const char* name;
  void (*sketch)(const SketchArgs&);
  void (*rows)(const RowsArgs&);
  int (*variant_count)();
  const char* (*variant_name)(int);
};

std::vector<Isa> usable_isas() {
  std::vector<Isa> out;
#if defined(__x86_64__)
  auto f = cpu_features();
  if (f["avx512f"] && f["avx512dq"] && f["avx512bw"] && f["avx512vl"] && f["fma"] && f["f16c"])
    out.push_back({"avx512", &avx512::sketch, &avx512::projection_rows, &avx512::variant_count,
                   &avx512::variant_name});
  if (f["avx2"] && f["fma"] && f["f16c"])
    out.push_back({"avx2", &avx2::sketch, &avx2::projection_rows, &avx2::variant_count,
                   &avx2::variant_name});
#endif
  out.push_back({"generic", &generic::sketch, &generic::projection_rows, &generic::variant_count,
                 &generic::variant_name});
  return out;
}

// The instruction set to use: `name` if given, else $ATTRKERNELS_ISA, else the best usable one.
Isa pick_isa(const std::string& name) {
  std::string want = name;
  if (want.empty()) {
    const char* env = std::getenv("ATTRKERNELS_ISA");
    if (env && *env) want = env;
  }
  auto isas = usable_isas();
  if (want.empty() || want == "auto") return isas.front();
  for (const auto& i : isas)
    if (want == i.name) return i;
  std::string have;
  for (const auto& i : isas) have += std::string(have.empty() ? "" : ", ") + i.name;
  throw std::invalid_argument("instruction set '" + want + "' is not usable on this CPU (usable: " +
                              have + ")");
}

std::vector<std::string> variant_names(const Isa& isa) {
  std::vector<std::string> out;
  for (int i = 0; i < isa.variant_count(); ++i) out.push_back(isa.variant_name(i));
  return out;
}

// The sketch kernel variant of each microarchitecture, measured (benchmarks/sketch.py, Rademacher,
// B = 32, p = 2^20, k = 1024, share of the same-run fp32 matmul peak):
//   AMD EPYC (Zen): "panel" (6 x 64 micro-tile sweeping a 128 x 512 panel in L2): 91%.
//   Intel Xeon (Sapphire Rapids class, AVX-512, 2 FMA ports): "strip12x32" (sketch_impl.inc);
//     "panel" reaches 52-59% there, the strip variants 85-95% of each other (single thread).
// Other vendors, and ISA builds without AVX-512, keep "panel" (unmeasured: no such machine).
std::string default_variant(const Isa& isa) {
  const auto names = variant_names(isa);
  if (std::string(isa.name) == "avx512" && cpu_vendor() == "intel") return "strip12x32";
  return names.front();
}

// The variant to use: `name` if given, else $ATTRKERNELS_SKETCH_VARIANT, else the default.
int pick_variant(const Isa& isa, const std::string& name) {
  std::string want = name;
  if (want.empty()) {
    const char* env = std::getenv("ATTRKERNELS_SKETCH_VARIANT");
    if (env && *env) want = env;
  }
  if (want.empty() || want == "auto") want = default_variant(isa);
  const auto names = variant_names(isa);
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == want) return static_cast<int>(i);
  std::string have;
  for (const auto& n : names) have += std::string(have.empty() ? "" : ", ") + n;
  throw std::invalid_argument("sketch variant '" + want + "' does not exist in the " + isa.name +
                              " build (variants: " + have + ")");
}

// out [P, n] (row-major, row stride n) from parts whose rows, stacked in order, are the n
// columns: part i holds rows_i contiguous rows of P floats. Blocks of BLOCK rows of out are
// filled one at a time (a [BLOCK, n] tile stays in cache while every part streams into it), so
// each cache line of out is written once; a part-by-part copy rewrote each line once per part.
void gather_columns(float* out, int64_t P, int64_t n, const std::vector<uintptr_t>& parts,
                    const std::vector<int64_t>& rows, int threads) {
  constexpr int64_t BLOCK = 256;
  const int64_t blocks = (P + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t p0 = b * BLOCK, p1 = std::min(P, p0 + BLOCK);
    int64_t j = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      const float* part = reinterpret_cast<const float*>(parts[i]);
      for (int64_t r = 0; r < rows[i]; ++r, ++j) {
        const float* src = part + r * P;
        float* dst = out + j;
        for (int64_t q = p0; q < p1; ++q) dst[q * n] = src[q];
      }
    }
  }
}

int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace
}  // namespace ak

PYBIND11_MODULE(_C, m) {
  using namespace ak;
  m.doc() = "attrkernels CPU kernels (C++, OpenMP, run-time instruction-set dispatch)";

  m.def("cpu_features", &cpu_features, "CPU features seen at run time.");
  m.def("cpu_vendor", &cpu_vendor, "CPU vendor from cpuid: 'intel', 'amd' or 'other'.");
  m.def("cpu_model", &cpu_model, "CPU brand string from cpuid ('' where unavailable).");
  m.def(
      "sketch_variants", [](const std::string& isa) { return variant_names(pick_isa(isa)); },
      py::arg("isa") = "", "Sketch kernel variants of an instruction-set build (same bits, different speed).");
  m.def(
      "sketch_variant",
      [](const std::string& name, const std::string& isa) {
        const Isa i = pick_isa(isa);
        return variant_names(i)[pick_variant(i, name)];
      },
      py::arg("name") = "", py::arg("isa") = "",
      "The sketch variant that runs: name, else $ATTRKERNELS_SKETCH_VARIANT, else this CPU's default.");
  m.def(
      "usable_isas",
      []() {
        std::vector<std::string> names;
        for (const auto& i : usable_isas()) names.push_back(i.name);
        return names;
      },
      "Instruction-set builds of the kernels that can run here, best first.");
  m.def("isa", [](const std::string& name) { return std::string(pick_isa(name).name); },
        py::arg("name") = "", "The instruction set the kernels will use.");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("default_threads", &default_threads);

  m.def(
      "sketch",
      [](uintptr_t x, int dtype, int64_t B, int64_t p, int64_t ldx, uintptr_t out, int64_t ldo,
         int64_t k, uint64_t seed, int kind, uint64_t row0, bool accumulate, int threads,
         uintptr_t nonfinite, const std::string& isa, const std::string& variant, uintptr_t colsum) {
        SketchArgs a;
        a.x = reinterpret_cast<const void*>(x);
        a.dtype = static_cast<DType>(dtype);
        a.B = B;
        a.p = p;
        a.ldx = ldx;
        a.out = reinterpret_cast<float*>(out);
        a.ldo = ldo;
        a.k = k;
        a.seed = seed;
        a.kind = static_cast<Kind>(kind);
        a.row0 = row0;
        a.accumulate = accumulate;
        a.threads = threads > 0 ? threads : default_threads();
        a.nonfinite = reinterpret_cast<uint8_t*>(nonfinite);
        a.colsum = reinterpret_cast<float*>(colsum);
        const Isa chosen = pick_isa(isa);
        a.variant = pick_variant(chosen, variant);
        py::gil_scoped_release release;
        chosen.sketch(a);
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("p"), py::arg("ldx"), py::arg("out"),
      py::arg("ldo"), py::arg("k"), py::arg("seed"), py::arg("kind"), py::arg("row0"),
      py::arg("accumulate"), py::arg("threads"), py::arg("nonfinite"), py::arg("isa") = "",
      py::arg("variant") = "", py::arg("colsum") = 0,
      "out[B, k] (+)= x[B, p] @ P[row0:row0+p, :k]; colsum[p] += column sums of x if given (raw "
      "pointers; see attrkernels.kernels.sketch).");

  m.def(
      "gather_columns",
      [](uintptr_t out, int64_t P, int64_t n, const std::vector<uintptr_t>& parts,
         const std::vector<int64_t>& rows, int threads) {
        if (parts.size() != rows.size()) throw std::invalid_argument("parts and rows differ in length");
        int64_t total = 0;
        for (auto r : rows) total += r;
        if (total != n) throw std::invalid_argument("the parts' rows do not add up to n");
        py::gil_scoped_release release;
        gather_columns(reinterpret_cast<float*>(out), P, n, parts, rows, threads > 0 ? threads : default_threads());
      },
      py::arg("out"), py::arg("P"), py::arg("n"), py::arg("parts"), py::arg("rows"), py::arg("threads"),
      "out[P, n] = the parts' rows (float32 [rows_i, P] each, contiguous) as columns (raw pointers; see "
      "attrkernels.kernels.columns).");

  m.def(
      "projection_rows",
      [](uintptr_t out, int64_t ldo, uint64_t row0, int64_t nrows, int64_t k, uint64_t seed,
         int kind, int threads, const std::string& isa) {
        RowsArgs a;
        a.out = reinterpret_cast<float*>(out);
        a.ldo = ldo;
        a.row0 = row0;
        a.nrows = nrows;
        a.k = k;
        a.seed = seed;
        a.kind = static_cast<Kind>(kind);
        a.threads = threads > 0 ? threads : default_threads();
        const Isa chosen = pick_isa(isa);
        py::gil_scoped_release release;
        chosen.rows(a);
      },
      py::arg("out"), py::arg("ldo"), py::arg("row0"), py::arg("nrows"), py::arg("k"),
      py::arg("seed"), py::arg("kind"), py::arg("threads"), py::arg("isa") = "",
      "Rows [row0, row0 + nrows) of P into out[nrows, k] (raw pointer).");
}
