// The key sketch's CPU passes (csrc/sketch/kernels.cpp). They trust their arguments:
// csrc/bindings/sketch_module.cpp checks them before calling.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "../common/isa.h"

namespace horen { namespace sketch {

struct Args {
    const float* qc;          // [B, rc] the query in the first rc basis directions
    const float* qf;          // [B, rf] ... in the other rf
    const float* perp_t;      // [B] |q outside the first rt directions| (rescue)
    const float* perp_c;      // [B] |q outside the first rc directions|
    const float* perp;        // [B] |q outside the basis|
    const float* cvar;        // [B] 0.5 beta^2 |q outside rt|^2 / (d - rt): times a row's e_t (scan)
    const uint16_t* rows_c;   // [L, rc] bfloat16, contiguous
    const uint16_t* rows_f;   // [L, rf] bfloat16, contiguous
    const float* e_t;         // [L] 1 - |first rt values of y_c|^2 (the tail model's residual)
    const float* e_c;         // [L] 1 - |y_c|^2
    const float* e;           // [L] 1 - |y|^2
    const uint8_t* alive;     // [L]
    const int64_t* excl;      // [B, K] ascending per row, padded with values >= L
    const uint32_t* qpair;    // [B, rc / 2] the coarse query as bfloat16 pairs, or null (set inside)
    int64_t B, rt, rc, rf, L, K, k2;   // rt <= rc: the tail model (scan) or the screen (rescue)
    float beta, slack;
    Isa isa;                  // avx512 (and the split ISAs) or avx2: the blocks of blocks.h; scalar: the generic loops
};

struct ScanOut {
    float* max;       // [B] the tail's weights are relative to exp(max)
    float* z;         // [B] the tail's weight sum
    float* y;         // [B, rt] the tail's weighted coarse rows (first rt columns)
    float* v;         // [B] the tail's weighted e_t
    int64_t* near;    // [B, k2] labels by descending full bound, -1 padding
    float* near_u;    // [B, k2] those bounds, -inf padding
};

// One pass over the rows: the tail and the k2 near keys of each query.
void scan(const Args& a, int threads, const ScanOut& out);

// (query row, label) of every pair whose full bound + slack exceeds floor[row].
std::vector<std::pair<int64_t, int64_t>> rescue(const Args& a, const float* floor, int threads);

// out[i] = q[rows[i]] . keys[slots[i]] (float32 keys with row stride ``stride``, queries [B, d]).
void pair_dots(const float* keys, int64_t stride, const float* q, int64_t d, const int64_t* rows,
               const int64_t* slots, int64_t n, float* out, int threads, Isa isa);

}}  // namespace horen::sketch
