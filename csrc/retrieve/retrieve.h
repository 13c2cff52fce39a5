// The fused retrieval kernel's entry point (csrc/retrieve/kernel.cpp). It trusts its arguments:
// csrc/bindings/retrieve_module.cpp checks them before calling it.
#pragma once

#include <cstdint>

#include "../common/isa.h"

namespace horen {

enum KeyType { K_F32 = 0, K_F64 = 1, K_BF16 = 2, K_F16 = 3 };

struct Problem {
    const void* q;        // [B, d] compute dtype, contiguous
    const void* k;        // [N, d] key dtype, rows of stride ks elements, columns contiguous
    int64_t B, N, d, ks;
    double beta, alpha, threshold, eps;
    int64_t steps;
    int64_t* out_index;   // [B]
    void* out_score;      // [B] compute dtype
    bool* out_matched;    // [B]
    int nthreads;
};

// Fills out_index / out_score / out_matched (SPEC 3). f64: compute in float64 (else float32; float64
// keys need float64 compute). Releases nothing: call it without the GIL.
void retrieve(const Problem& p, KeyType key_type, bool f64, Isa isa);

// How much faster the batched score loops run as the split scores of `isa` (Isa::avx512bf16:
// AVX512_BF16 dot products; Isa::amx: AMX-BF16 tiles) than as the float32 FMAs of Isa::avx512, on
// this CPU: the time of one batched pass over an L2-resident tile (scores and weighted sums, 16
// queries) with the FMAs over its time with the split scores, for bfloat16 and float32 keys (0
// where the CPU lacks `isa`, or for any other isa).
// Measured, not assumed: on Zen 4 a 512-bit bfloat16 dot product issues at the rate of a 512-bit
// FMA and does twice its multiply-adds, on a Sapphire Rapids Xeon at half that rate; other CPUs
// differ. horen_fast/native.py measures it once per process.
struct SplitSpeedup { double bf16_keys = 0, f32_keys = 0; };
SplitSpeedup measure_split_speedup(Isa isa);

}  // namespace horen
