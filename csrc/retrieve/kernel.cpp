// The fused HoReN retrieval kernel for CPUs (SPEC section 3), built into horen_fast._C; the
// binding that checks its arguments is csrc/bindings/retrieve_module.cpp.
//
// One call runs the whole retrieval for a batch of B queries against N keys:
//   * each damped Hopfield step reads the keys ONCE for all active queries: tiles of keys sized to
//     stay in L2 (csrc/common/machine.h) are scored (q . k), folded into per-query online-softmax
//     statistics (running max and the running weighted key sum, rescaled when the max grows),
//     split over N across OpenMP threads and combined at the end (flash-decoding style); a pass of
//     fewer than BATCH_MIN rows cuts the keys into 4 parts per thread, taken as threads come free;
//   * a pass of one query (decode) streams the keys in groups of 2-4 instead of tiles: each group is
//     scored in the same sweep that adds the group before to the sums (KernelSet::dot_axpy), so that
//     memory keeps streaming while the sums run;
//   * the stop rule ||r - q|| < eps is checked per row; a stopped row keeps q and its cosines of
//     that pass are its final cosines;
//   * the final scores of rows that took every step are NOT recomputed with a second full pass:
//     the cosines of the last pass bound the final cosines (the bound of horen_fast/hopfield.py,
//     final_bound, where it is derived), so only keys whose upper bound exceeds the threshold are
//     rescored exactly, in descending bound order, until the next bound falls below the best exact
//     score. Ties follow the one tie rule of horen_fast/hopfield.py (the lowest index).
//
// Passes of BATCH_MIN (8) or more query rows (prefill, evaluation) run the batched loops of
// csrc/retrieve/batched.h instead: float32 (or float64) FMAs in register blocks of keys x query
// rows (or vectors x rows), queries and sums packed so that a chunk of them stays in L1. Their scores
// can also run on hi/lo bfloat16 splits, as AVX512_BF16 dot products (Isa::avx512bf16,
// csrc/retrieve/bf16_split.h) or AMX-BF16 tile products (Isa::amx, csrc/retrieve/amx_scores.h,
// which for bfloat16 keys also takes the weighted sums); measure_split_speedup() times each against
// the FMAs on this CPU, and horen_fast/native.py takes a split where it is clearly faster.
//
// The inner loops exist three times, for AVX-512, AVX2+FMA and portable scalar code, picked by the
// caller (horen_fast/native.py). They are written once, in the second half of this file, which
// includes itself once per instruction set inside a `#pragma GCC target` region (the same trick as
// Highway's foreach_target). Keys may be float32, bfloat16, float16 or float64; half types are
// widened to float32 in registers. Compute is float32, or float64 when the caller asks.

#ifndef HOREN_KERNEL_BODY
// =================================================================================================
// Part 1: shared types and scalar helpers
// =================================================================================================
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/bf16.h"
#include "../common/exp_poly.h"
#include "../common/isa.h"
#include "../common/machine.h"
#include "../common/threads.h"
#include "retrieve.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace horen {
// The inner loops of one instruction set, for compute type F and key type KT.
template <class F, class KT>
struct KernelSet {
    // out[b * os + j] = Q[b] . K[j]   for j < nj, b < nb (rows of Q contiguous with stride qs),
    // and nrm[j] = ||K[j]||^2 unless nrm is null
    void (*dot)(const KT* K, int64_t ks, int nj, const F* Q, int64_t qs, int nb, int64_t d, F* out,
                int64_t os, F* nrm);
    // acc[b] += sum_j Wt[b * ws + j] K[j]
    // (and, on the way, prefetches the next tile of pfn keys at pf into the cache)
    void (*axpy)(const KT* K, int64_t ks, int nj, const F* Wt, int64_t ws, int nb, int64_t d, F* acc,
                 int64_t as, const KT* pf, int pfn);
    // One query's scan (passes of one row), a group of g = 2 or 4 keys at a time: out[j] = q . K[j]
    // (and nrm[j] = ||K[j]||^2 unless nrm is null) for the group at K while, in the same sweep over
    // d, acc += sum_j w[j] P[j] for the group before at P (still in cache) unless P is null, and
    // the rows of the next group at Kn (unless null) are prefetched as the group's rows end. The
    // keys then stream from memory all the time, instead of waiting while a tile's sums run.
    void (*dot_axpy)(int g, const KT* K, int64_t ks, const F* q, int64_t d, F* out, F* nrm, const KT* P,
                     const F* w, F* acc, const KT* Kn);
    // w[j] = exp(beta * s[j] - m)
    void (*weights)(const F* s, int n, F beta, F m, F* w);
    // x[i] *= c
    void (*scale)(F* x, int64_t n, F c);
    // bfloat16 keys are widened two at a time: the 32-bit lane i of a block of P = paired_block
    // key elements holds elements 2i and 2i+1, which become lane i of two vectors (a shift and a
    // mask). The query and the weighted sum are then kept in the matching order: within each whole
    // block of P elements, the P/2 even elements first, then the P/2 odd ones; the tail (d mod P)
    // stays in natural order. 0 means natural order everywhere.
    int paired_block;
    // The batched loops (csrc/retrieve/batched.h), for passes of BATCH_MIN or more rows: queries and
    // sums packed per block of BR rows as [ceil(d / lanes)][BR][lanes] (vector cv of row r at
    // (cv BR + r) lanes), zero-padded; both run over vectors [cv0, cv1) of d.
    // part[(j BR + r) lanes + l] += partial products of K[j] and row r of the block at Qp, and
    // npart[j lanes + l] of K[j] with itself unless npart is null
    // (prefetch: the call that reads these keys first prefetches the ones it reads next)
    void (*bdot)(const KT* K, int64_t ks, int nj, const F* Qp, int64_t cv0, int64_t cv1, int64_t d, F* part,
                 F* npart, bool prefetch);
    // the scores of all the blocks at once over vectors [cv0, cv1) (block b at Qp + b qbsize,
    // partials at part + b pb, the norms with block 0), in place of bdot where not null, called for
    // the whole of d (Isa::amx: each group of keys is split once, and read row by row)
    void (*bdot_blocks)(const KT* K, int64_t ks, int nj, const F* Qp, int64_t qbsize, int64_t blocks, int64_t cv0,
                        int64_t cv1, int64_t d, F* part, int64_t pb, F* npart);
    // the packed sums of one block += sum_j w[r * ws + j] K[j] (prefetching the same vectors of the
    // pfn key rows at pf, the next tile)
    void (*baxpy)(const KT* K, int64_t ks, int nj, const F* w, int64_t ws, int64_t cv0, int64_t cv1, int64_t d,
                  F* accp, const KT* pf, int pfn);
    // the sums of all the blocks at once over the whole of d (block b's weights at w + b BR ws, its
    // packed sums at accp + b bsize), in place of baxpy where not null (Isa::amx)
    void (*baxpy_blocks)(const KT* K, int64_t ks, int nj, const F* w, int64_t ws, int64_t blocks, int64_t d,
                         F* accp, int64_t bsize, const KT* pf, int pfn);
    int64_t chunk;  // vectors of d per call of bdot / baxpy (a block's chunk stays in L1)
    // bdot takes the queries split into bfloat16 hi/lo (Isa::avx512bf16, csrc/retrieve/bf16_split.h),
    // its scores off by up to SPLIT_REL |q| |k| more than float32 rounding
    bool split;
    // with split: the queries packed for AMX tiles (Isa::amx, csrc/retrieve/amx_scores.h) rather
    // than per vector (csrc/retrieve/bf16_split.h)
    bool tile_pairs;
    int lanes;  // elements of F per vector register
};

// rows of a block of the batched loops, and the rows from which a pass uses them
constexpr int BR = 8;
constexpr int64_t BATCH_MIN = 8;
// error bound of the split scores (csrc/retrieve/bf16_split.h), relative to |q| |k|
constexpr double SPLIT_REL = 2.5e-5;

// natural order -> paired order (see KernelSet::paired_block), and back
template <class F> static void to_paired(const F* src, F* dst, int64_t d, int P) {
    int64_t c = 0;
    if (P > 0)
        for (; c + P <= d; c += P)
            for (int i = 0; i < P / 2; ++i) {
                dst[c + i] = src[c + 2 * i];
                dst[c + P / 2 + i] = src[c + 2 * i + 1];
            }
    for (; c < d; ++c) dst[c] = src[c];
}
template <class F> static void from_paired(const F* src, F* dst, int64_t d, int P) {
    int64_t c = 0;
    if (P > 0)
        for (; c + P <= d; c += P)
            for (int i = 0; i < P / 2; ++i) {
                dst[c + 2 * i] = src[c + i];
                dst[c + 2 * i + 1] = src[c + P / 2 + i];
            }
    for (; c < d; ++c) dst[c] = src[c];
}

}  // namespace horen

// =================================================================================================
// Part 2: the inner loops, once per instruction set
// =================================================================================================

// ---- portable scalar code (also the only path off x86) ----
namespace horen { namespace isa_scalar {
template <class FT>
struct Ops {
    using F = FT;
    using V = FT;
    static constexpr int W = 1;
    static constexpr bool HAS_EXP = false;
    static HOREN_INLINE V exp(V x) { return std::exp(x); }
    static HOREN_INLINE V zero() { return V(0); }
    static HOREN_INLINE V set1(F x) { return x; }
    static HOREN_INLINE V load(const F* p) { return *p; }
    static HOREN_INLINE V loadt(const F* p, int) { return *p; }
    template <class KT> static HOREN_INLINE V lk(const KT* p) { return static_cast<F>(to_float(*p)); }
    static HOREN_INLINE V lk(const double* p) { return static_cast<F>(*p); }
    template <class KT> static HOREN_INLINE V lkt(const KT* p, int) { return lk(p); }
    static HOREN_INLINE void lk2(const bf16_t* p, V& lo, V& hi) {
        lo = static_cast<F>(bf16_to_float(p[0].bits));
        hi = static_cast<F>(bf16_to_float(p[1].bits));
    }
    static HOREN_INLINE V fma(V a, V b, V c) { return a * b + c; }
    static HOREN_INLINE V mul(V a, V b) { return a * b; }
    static HOREN_INLINE void store(F* p, V v) { *p = v; }
    static HOREN_INLINE void storet(F* p, V v, int) { *p = v; }
    static HOREN_INLINE F hsum(V v) { return v; }
};
using OpsF = Ops<float>;
using OpsD = Ops<double>;
constexpr int DOT_JB = 4, DOT_BB = 4, AXPY_J = 4, AXPY_CB = 1;
constexpr int BDOT_JB = 1, BDOT_JBN = 1, BDOT_RB = 8, BAXPY_CB = 1, BAXPY_RB = 8;
#define HOREN_KERNEL_BODY 1
#include "kernel.cpp"  // this file again, HOREN_KERNEL_BODY set
#undef HOREN_KERNEL_BODY
}}  // namespace horen::isa_scalar

#if HOREN_X86
// ---- AVX2 + FMA + F16C ----
HOREN_TARGET_PUSH_AVX2
namespace horen { namespace isa_avx2 {
static HOREN_INLINE __m256i mask32(int n) {  // first n of 8 lanes set
    alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}
static HOREN_INLINE __m256i mask64(int n) {  // first n of 4 lanes set
    alignas(32) static const int64_t m[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 4 - n));
}
static HOREN_INLINE __m128i mask32x4(int n) {
    alignas(16) static const int32_t m[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + 4 - n));
}
static HOREN_INLINE __m256 widen_bf16x8(__m128i x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
template <class T> static HOREN_INLINE __m128i tail16(const T* p, int n) {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, sizeof(uint16_t) * n);
    return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
}
struct OpsF {
    using F = float;
    using V = __m256;
    static constexpr int W = 8;
    static constexpr bool HAS_EXP = true;
    static HOREN_INLINE V exp(V x) { return horen_exp::exp8(x); }  // csrc/common/exp_poly.h
    static HOREN_INLINE V zero() { return _mm256_setzero_ps(); }
    static HOREN_INLINE V set1(F x) { return _mm256_set1_ps(x); }
    static HOREN_INLINE V load(const F* p) { return _mm256_loadu_ps(p); }
    static HOREN_INLINE V loadt(const F* p, int n) { return _mm256_maskload_ps(p, mask32(n)); }
    static HOREN_INLINE V lk(const float* p) { return _mm256_loadu_ps(p); }
    static HOREN_INLINE V lkt(const float* p, int n) { return _mm256_maskload_ps(p, mask32(n)); }
    static HOREN_INLINE V lk(const bf16_t* p) {
        return widen_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static HOREN_INLINE V lkt(const bf16_t* p, int n) { return widen_bf16x8(tail16(p, n)); }
    static HOREN_INLINE void lk2(const bf16_t* p, V& lo, V& hi) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        lo = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
        hi = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    }
    static HOREN_INLINE V lk(const f16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static HOREN_INLINE V lkt(const f16_t* p, int n) { return _mm256_cvtph_ps(tail16(p, n)); }
    static HOREN_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static HOREN_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static HOREN_INLINE void store(F* p, V v) { _mm256_storeu_ps(p, v); }
    static HOREN_INLINE void storet(F* p, V v, int n) { _mm256_maskstore_ps(p, mask32(n), v); }
    static HOREN_INLINE F hsum(V v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
};
struct OpsD {
    using F = double;
    using V = __m256d;
    static constexpr int W = 4;
    static constexpr bool HAS_EXP = false;
    static HOREN_INLINE V exp(V x) { return x; }  // unused
    static HOREN_INLINE V zero() { return _mm256_setzero_pd(); }
    static HOREN_INLINE V set1(F x) { return _mm256_set1_pd(x); }
    static HOREN_INLINE V load(const F* p) { return _mm256_loadu_pd(p); }
    static HOREN_INLINE V loadt(const F* p, int n) { return _mm256_maskload_pd(p, mask64(n)); }
    static HOREN_INLINE V lk(const double* p) { return _mm256_loadu_pd(p); }
    static HOREN_INLINE V lkt(const double* p, int n) { return _mm256_maskload_pd(p, mask64(n)); }
    static HOREN_INLINE V lk(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
    static HOREN_INLINE V lkt(const float* p, int n) { return _mm256_cvtps_pd(_mm_maskload_ps(p, mask32x4(n))); }
    static HOREN_INLINE V lk(const bf16_t* p) {
        __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(x), 16)));
    }
    static HOREN_INLINE V lkt(const bf16_t* p, int n) {
        return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(tail16(p, n)), 16)));
    }
    static HOREN_INLINE void lk2(const bf16_t* p, V& lo, V& hi) {
        __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        lo = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(x, 16)));
        hi = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_and_si128(x, _mm_set1_epi32(static_cast<int>(0xffff0000u)))));
    }
    static HOREN_INLINE V lk(const f16_t* p) {
        return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
    static HOREN_INLINE V lkt(const f16_t* p, int n) { return _mm256_cvtps_pd(_mm_cvtph_ps(tail16(p, n))); }
    static HOREN_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
    static HOREN_INLINE V mul(V a, V b) { return _mm256_mul_pd(a, b); }
    static HOREN_INLINE void store(F* p, V v) { _mm256_storeu_pd(p, v); }
    static HOREN_INLINE void storet(F* p, V v, int n) { _mm256_maskstore_pd(p, mask64(n), v); }
    static HOREN_INLINE F hsum(V v) {
        __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
        return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
    }
};
constexpr int DOT_JB = 4, DOT_BB = 2, AXPY_J = 4, AXPY_CB = 2;
// 16 ymm registers: scores 3 keys x 4 rows = 12 accumulators + 3 key vectors + 1 query (with the
// norms, 2 x 4 + 2 + 2 + 1), sums 3 x 4 + 3 + 1
constexpr int BDOT_JB = 3, BDOT_JBN = 2, BDOT_RB = 4, BAXPY_CB = 3, BAXPY_RB = 4;
#define HOREN_KERNEL_BODY 1
#include "kernel.cpp"  // this file again, HOREN_KERNEL_BODY set
#undef HOREN_KERNEL_BODY
}}  // namespace horen::isa_avx2
HOREN_TARGET_POP

// ---- AVX-512 (F, BW, VL, DQ) ----
HOREN_TARGET_PUSH_AVX512
namespace horen { namespace isa_avx512 {
static HOREN_INLINE __m512 widen_bf16x16(__m256i x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
struct OpsF {
    using F = float;
    using V = __m512;
    static constexpr int W = 16;
    static constexpr bool HAS_EXP = true;
    static HOREN_INLINE V exp(V x) { return horen_exp::exp16(x); }  // csrc/common/exp_poly.h
    static HOREN_INLINE __mmask16 m(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
    static HOREN_INLINE V zero() { return _mm512_setzero_ps(); }
    static HOREN_INLINE V set1(F x) { return _mm512_set1_ps(x); }
    static HOREN_INLINE V load(const F* p) { return _mm512_loadu_ps(p); }
    static HOREN_INLINE V loadt(const F* p, int n) { return _mm512_maskz_loadu_ps(m(n), p); }
    static HOREN_INLINE V lk(const float* p) { return _mm512_loadu_ps(p); }
    static HOREN_INLINE V lkt(const float* p, int n) { return _mm512_maskz_loadu_ps(m(n), p); }
    static HOREN_INLINE V lk(const bf16_t* p) {
        return widen_bf16x16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static HOREN_INLINE V lkt(const bf16_t* p, int n) { return widen_bf16x16(_mm256_maskz_loadu_epi16(m(n), p)); }
    static HOREN_INLINE void lk2(const bf16_t* p, V& lo, V& hi) {
        __m512i x = _mm512_loadu_si512(p);
        lo = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        hi = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
    static HOREN_INLINE V lk(const f16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static HOREN_INLINE V lkt(const f16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m(n), p)); }
    static HOREN_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static HOREN_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static HOREN_INLINE void store(F* p, V v) { _mm512_storeu_ps(p, v); }
    static HOREN_INLINE void storet(F* p, V v, int n) { _mm512_mask_storeu_ps(p, m(n), v); }
    static HOREN_INLINE F hsum(V v) { return _mm512_reduce_add_ps(v); }
};
struct OpsD {
    using F = double;
    using V = __m512d;
    static constexpr int W = 8;
    static constexpr bool HAS_EXP = false;
    static HOREN_INLINE V exp(V x) { return x; }  // unused
    static HOREN_INLINE __mmask8 m(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
    static HOREN_INLINE V zero() { return _mm512_setzero_pd(); }
    static HOREN_INLINE V set1(F x) { return _mm512_set1_pd(x); }
    static HOREN_INLINE V load(const F* p) { return _mm512_loadu_pd(p); }
    static HOREN_INLINE V loadt(const F* p, int n) { return _mm512_maskz_loadu_pd(m(n), p); }
    static HOREN_INLINE V lk(const double* p) { return _mm512_loadu_pd(p); }
    static HOREN_INLINE V lkt(const double* p, int n) { return _mm512_maskz_loadu_pd(m(n), p); }
    static HOREN_INLINE V lk(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
    static HOREN_INLINE V lkt(const float* p, int n) { return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m(n), p)); }
    static HOREN_INLINE __m256 w8(__m128i x) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
    }
    static HOREN_INLINE V lk(const bf16_t* p) {
        return _mm512_cvtps_pd(w8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
    static HOREN_INLINE V lkt(const bf16_t* p, int n) { return _mm512_cvtps_pd(w8(_mm_maskz_loadu_epi16(m(n), p))); }
    static HOREN_INLINE void lk2(const bf16_t* p, V& lo, V& hi) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        lo = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
        hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u)))));
    }
    static HOREN_INLINE V lk(const f16_t* p) {
        return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
    static HOREN_INLINE V lkt(const f16_t* p, int n) {
        return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_maskz_loadu_epi16(m(n), p)));
    }
    static HOREN_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
    static HOREN_INLINE V mul(V a, V b) { return _mm512_mul_pd(a, b); }
    static HOREN_INLINE void store(F* p, V v) { _mm512_storeu_pd(p, v); }
    static HOREN_INLINE void storet(F* p, V v, int n) { _mm512_mask_storeu_pd(p, m(n), v); }
    static HOREN_INLINE F hsum(V v) { return _mm512_reduce_add_pd(v); }
};
constexpr int DOT_JB = 4, DOT_BB = 4, AXPY_J = 8, AXPY_CB = 2;
constexpr int BDOT_JB = 2, BDOT_JBN = 2, BDOT_RB = 8, BAXPY_CB = 2, BAXPY_RB = 8;
#define HOREN_KERNEL_BODY 1
#include "kernel.cpp"  // this file again, HOREN_KERNEL_BODY set
#undef HOREN_KERNEL_BODY
}}  // namespace horen::isa_avx512
HOREN_TARGET_POP

// ---- AVX-512 + AVX512_BF16: the split scores of Isa::avx512bf16 ----
HOREN_TARGET_PUSH_AVX512BF16
namespace horen { namespace isa_avx512bf16 {
#define HOREN_KERNEL_SPLIT 1
#include "bf16_split.h"
#undef HOREN_KERNEL_SPLIT
}}  // namespace horen::isa_avx512bf16
HOREN_TARGET_POP

// ---- AVX-512 + AVX512_BF16 + AMX-BF16: the tile scores of Isa::amx ----
HOREN_TARGET_PUSH_AMX
namespace horen { namespace isa_amx {
#define HOREN_KERNEL_AMX 1
#include "amx_scores.h"
#undef HOREN_KERNEL_AMX
}}  // namespace horen::isa_amx
HOREN_TARGET_POP
#endif  // HOREN_X86

// =================================================================================================
// Part 3: the driver (instruction-set independent) and the dispatch over key and compute types
// =================================================================================================
namespace horen {

template <class F, class KT>
static KernelSet<F, KT> kernels_for(Isa isa) {
#if HOREN_X86
    if (is_avx512(isa)) {
        KernelSet<F, KT> k = isa_avx512::make_kernels<F, KT>();
        // Isa::avx512bf16 / Isa::amx: split scores where they exist (float32 compute, float32 or
        // bfloat16 keys); float16 keys and float64 compute keep the FMA loops
        if constexpr (std::is_same<F, float>::value &&
                      (std::is_same<KT, float>::value || std::is_same<KT, bf16_t>::value)) {
            if (isa == Isa::avx512bf16) {
                k.bdot = &isa_avx512bf16::split_block<KT>;
                k.split = true;
            } else if (isa == Isa::amx) {
                k.bdot_blocks = &isa_amx::amx_blocks<KT>;
                if constexpr (std::is_same<KT, bf16_t>::value) k.baxpy_blocks = &isa_amx::amx_sums;
                k.split = true;
                k.tile_pairs = true;
            }
        }
        return k;
    }
    if (isa == Isa::avx2) return isa_avx2::make_kernels<F, KT>();
#endif
    (void)isa;
    return isa_scalar::make_kernels<F, KT>();
}

// the scores of a batched pass over a tile of nj keys, every block of queries: bdot in chunks of d
// (a block's chunk of queries stays in L1), or bdot_blocks in one call over the whole of d
template <class F, class KT>
static void batched_scores(const KernelSet<F, KT>& ks, const KT* K, int64_t kstride, int nj, const F* Qp,
                           int64_t qbsize, int64_t blocks, int64_t d, F* part, int64_t pb, F* npart) {
    const int64_t dv = (d + ks.lanes - 1) / ks.lanes;
    if (ks.bdot_blocks != nullptr) {
        ks.bdot_blocks(K, kstride, nj, Qp, qbsize, blocks, 0, dv, d, part, pb, npart);
        return;
    }
    for (int64_t cv0 = 0; cv0 < dv; cv0 += ks.chunk)
        for (int64_t blk = 0; blk < blocks; ++blk)
            ks.bdot(K, kstride, nj, Qp + blk * qbsize, cv0, std::min(dv, cv0 + ks.chunk), d, part + blk * pb,
                    blk == 0 ? npart : nullptr, blk == 0);
}

// the weighted sums of a batched pass over a tile of nj keys, every block (block b's weights at
// w + b BR ws, its packed sums at acc + b bsize): baxpy in chunks of d, block 0 prefetching the pfn
// rows of the next tile at pf, or baxpy_blocks in one call
template <class F, class KT>
static void batched_sums(const KernelSet<F, KT>& ks, const KT* K, int64_t kstride, int nj, const F* w, int64_t ws,
                         int64_t blocks, int64_t d, F* acc, int64_t bsize, const KT* pf, int pfn) {
    const int64_t dv = (d + ks.lanes - 1) / ks.lanes;
    if (ks.baxpy_blocks != nullptr) {
        ks.baxpy_blocks(K, kstride, nj, w, ws, blocks, d, acc, bsize, pf, pfn);
        return;
    }
    for (int64_t cv0 = 0; cv0 < dv; cv0 += ks.chunk)
        for (int64_t blk = 0; blk < blocks; ++blk)
            ks.baxpy(K, kstride, nj, w + blk * BR * ws, ws, cv0, std::min(dv, cv0 + ks.chunk), d, acc + blk * bsize,
                     blk == 0 ? pf : nullptr, blk == 0 ? pfn : 0);
}

template <class T> static inline double sq_sum(const T* x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    return s;
}

template <class F, class KT>
class Driver {
public:
    Driver(const Problem& p, const KernelSet<F, KT>& ks, Isa isa) : p_(p), ks_(ks), isa_(isa) {
        const int64_t key_bytes = std::max<int64_t>(1, p.d * static_cast<int64_t>(sizeof(KT)));
        // a tile of keys stays in L2 between its two uses (csrc/common/machine.h: a quarter of one L2)
        int64_t t = machine().tile_bytes / key_bytes;
        t = std::max<int64_t>(8, std::min<int64_t>(256, t));
        tile_ = static_cast<int>(t - t % 8);    // whole register blocks of the dot and axpy loops
        // the batched loops read a tile of keys twice (scores, then sums), each time in chunks of d
        // with all the tile's keys per chunk, so that the queries and the sums are read once per
        // tile, and the sums prefetch the next tile: the two take the L2 (twice the tile above),
        // as measured best on Zen 5 at B = 16 to 64 (a whole L2 each) and on a Sapphire Rapids
        // Xeon (half of one each, 1.1-1.6x faster than a whole; bench/RESULTS.md 2026-12-02)
        int64_t bt = 2 * machine().tile_bytes / key_bytes;
        bt = std::max<int64_t>(8, std::min<int64_t>(512, bt));
        btile_ = static_cast<int>(bt - bt % 8);
        // one query's scan (scan_one) holds two groups of keys in L2, the one it sums and the one
        // it scores: 4 keys each where 4 fit in a tile (a quarter of the L2), else 2 (on a Zen 3
        // EPYC, 512 KiB L2: 2 float32 keys of 14336 ran 1.07-1.16x faster than 4, 4 of 1536
        // 1.1-1.3x faster than 2)
        scan_ = 4 * key_bytes <= machine().tile_bytes ? 4 : 2;
    }

    void run() {
        const int64_t B = p_.B, d = p_.d;
        const F* qin = static_cast<const F*>(p_.q);
        F* score = static_cast<F*>(p_.out_score);
        q_.assign(B * d, F(0));
        std::vector<int64_t> rows;
        for (int64_t b = 0; b < B; ++b) {
            p_.out_index[b] = -1;
            score[b] = std::numeric_limits<F>::quiet_NaN();
            p_.out_matched[b] = false;
            const F* x = qin + b * d;
            bool finite = true;
            for (int64_t i = 0; i < d && finite; ++i) finite = std::isfinite(static_cast<double>(x[i]));
            if (!finite) continue;
            double nrm = std::sqrt(sq_sum(x, d));
            if (!(nrm > 0) || !std::isfinite(nrm)) continue;
            for (int64_t i = 0; i < d; ++i) q_[b * d + i] = static_cast<F>(x[i] / nrm);
            rows.push_back(b);
        }
        // Bound the scratch memory (scores [G, N] and per-thread sums [threads, G, d]) by
        // processing the queries in groups; each group reads the keys once per step.
        const int64_t per_row = p_.N + static_cast<int64_t>(parts() + 1) * d + tile_;
        const int64_t budget = int64_t(1) << 26;  // elements
        const int64_t G = std::max<int64_t>(1, std::min<int64_t>(256, budget / per_row));
        for (size_t g0 = 0; g0 < rows.size(); g0 += G) {
            size_t g1 = std::min(rows.size(), g0 + static_cast<size_t>(G));
            run_group(std::vector<int64_t>(rows.begin() + g0, rows.begin() + g1));
        }
    }

private:
    struct BoundRow {
        int64_t b;        // query row
        int64_t a;        // its row in the scores of the last pass
        double c1, c2, inv_nrm;
    };

    const Problem& p_;
    KernelSet<F, KT> ks_;
    Isa isa_;
    int tile_;
    int btile_;               // keys per tile of the batched loops
    int scan_;                // keys per group of scan_one
    std::vector<F> q_;        // current unit queries [B, d]
    std::vector<F> S_;        // cosines of the current pass [Ba, N]
    std::vector<F> acc_;      // combined weighted key sums [Ba, d]
    std::vector<F> accT_;     // per-thread sums [threads, Ba, d]
    std::vector<F> mT_;       // per-thread running max [threads, Ba]
    std::vector<F> wT_;       // per-thread softmax weights of a tile [threads, Ba, tile]
    std::vector<F> norms_;    // squared key norms [N] (last pass only)
    std::vector<F> Qp_;       // packed queries of the batched loops [blocks][d / lanes][BR][lanes]
    bool split_scores_ = false;  // S_ came from split scores (KernelSet::split)
    std::vector<F> partT_;    // per-thread partial score vectors of the batched loops

    const KT* key(int64_t i) const { return static_cast<const KT*>(p_.k) + i * p_.ks; }

    // the parts a pass splits the keys into (at least 4 keys each): fixed by the threads asked
    // for, the CPUs and N, so that results do not depend on how many threads run them
    int parts() const { return parts_for(p_.nthreads, p_.N / 4); }

    // the parts of a pass of Ba < BATCH_MIN rows: 4 per part of parts() (at least 64 keys each,
    // their per-part sums at most 2^22 elements), taken by the threads as they come free, so that
    // a thread slowed by another process holds up one part, not half of the keys (on a 2-core Zen
    // 3 KVM guest 1.0-1.09x faster at N = 50K, 1.0-1.46x at N = 1K, than one part per thread);
    // like parts(), fixed by the threads asked for, the CPUs and N
    int small_parts(int64_t Ba) const {
        const int64_t t = parts();
        if (t == 1) return 1;
        const int64_t by_keys = std::max<int64_t>(1, p_.N / 64);
        const int64_t by_memory = (int64_t(1) << 22) / std::max<int64_t>(1, Ba * p_.d);
        return static_cast<int>(std::max<int64_t>(t, std::min({4 * t, by_keys, by_memory})));
    }

    int threads_for(int64_t rows) const {
        // a thread only for enough multiply-adds (csrc/common/threads.h), at most one per part
        const int64_t work = 2 * p_.N * p_.d * std::max<int64_t>(1, rows);
        return threads_for_work(work, p_.nthreads, isa_, p_.N / 4);
    }

    void run_group(std::vector<int64_t> active) {
        const int64_t d = p_.d;
        const F alpha = static_cast<F>(p_.alpha);
        const int64_t passes = std::max<int64_t>(p_.steps, 1);
        std::vector<F> Qa, r(d), v(d), nat(d);
        for (int64_t t = 0; t < passes && !active.empty(); ++t) {
            const bool softmax = p_.steps > 0;
            const bool last = t == passes - 1;
            const int64_t Ba = static_cast<int64_t>(active.size());
            const bool batched = Ba >= BATCH_MIN;
            const int order = batched ? 0 : ks_.paired_block;  // the batched loops keep natural order
            if (batched) {
                pass_batched(active, softmax, softmax && last);
            } else {
                Qa.resize(Ba * d);
                for (int64_t a = 0; a < Ba; ++a) to_paired(&q_[active[a] * d], &Qa[a * d], d, order);
                pass(Qa.data(), Ba, softmax, softmax && last);
            }
            std::vector<int64_t> next;
            std::vector<BoundRow> bound_rows;
            std::vector<int64_t> exact_rows;   // index into active: final cosines are S_ rows
            for (int64_t a = 0; a < Ba; ++a) {
                const int64_t b = active[a];
                if (!softmax) { exact_rows.push_back(a); continue; }
                from_paired(&acc_[a * d], nat.data(), d, order);
                const F* acc = nat.data();
                const F* q = &q_[b * d];   // natural order; overwritten below only after its last use
                double rn = std::sqrt(sq_sum(acc, d));
                if (!(rn > 0) || !std::isfinite(rn)) { exact_rows.push_back(a); continue; }  // q stays
                double dist2 = 0, rho = 0;
                for (int64_t i = 0; i < d; ++i) {
                    r[i] = static_cast<F>(acc[i] / rn);
                    double diff = static_cast<double>(r[i]) - q[i];
                    dist2 += diff * diff;
                    rho += static_cast<double>(r[i]) * q[i];
                }
                if (!(std::sqrt(dist2) >= p_.eps)) { exact_rows.push_back(a); continue; }  // stop rule
                double vn2 = 0, perp2 = 0;
                for (int64_t i = 0; i < d; ++i) {
                    v[i] = (1 - alpha) * q[i] + alpha * r[i];
                    vn2 += static_cast<double>(v[i]) * v[i];
                    double rp = static_cast<double>(r[i]) - rho * q[i];
                    perp2 += rp * rp;
                }
                double vn = std::sqrt(vn2);
                F* qdst = &q_[b * d];
                if (!(vn > 1e-30)) {  // (1-a) q + a r vanished: q_M = 0, every final cosine is 0
                    std::fill(qdst, qdst + d, F(0));
                    if (last) finish(b, 0, 0.0);
                    else next.push_back(b);
                    continue;
                }
                for (int64_t i = 0; i < d; ++i) qdst[i] = static_cast<F>(v[i] / vn);
                if (!last) { next.push_back(b); continue; }
                const double a_ = p_.alpha;
                bound_rows.push_back({b, a, (1 - a_) + a_ * rho, a_ * std::sqrt(perp2), 1.0 / vn});
            }
            finish_rows(active, exact_rows, bound_rows);
            active.swap(next);
        }
    }

    // One read of the keys for the Ba queries in Qa: cosines into S_, and, with softmax, the
    // softmax-weighted key sums into acc_ (relative to a common per-row max; their scale does not
    // matter since r = normalize(acc)).
    void pass(const F* Qa, int64_t Ba, bool softmax, bool want_norms) {
        const int64_t N = p_.N, d = p_.d;
        const int np = small_parts(Ba);
        const int nt = threads_for(Ba);
        const int T = tile_;
        S_.resize(Ba * N);
        split_scores_ = false;
        if (want_norms) norms_.resize(N);
        if (softmax) {
            acc_.assign(Ba * d, F(0));
            accT_.resize(static_cast<size_t>(np) * Ba * d);
            mT_.assign(static_cast<size_t>(np) * Ba, -std::numeric_limits<F>::infinity());
            wT_.resize(static_cast<size_t>(np) * Ba * T);
        }
        // contiguous key ranges per part, multiples of 4 keys
        int64_t chunk = (N + np - 1) / np;
        chunk = (chunk + 3) / 4 * 4;
        JoinClock clock(nt);
#pragma omp parallel num_threads(nt)
        {
#pragma omp for schedule(dynamic, 1) nowait
        for (int tid = 0; tid < np; ++tid) {
            const int64_t n0 = std::min<int64_t>(N, tid * chunk), n1 = std::min<int64_t>(N, n0 + chunk);
            F* accT = softmax ? &accT_[static_cast<size_t>(tid) * Ba * d] : nullptr;
            F* m = softmax ? &mT_[static_cast<size_t>(tid) * Ba] : nullptr;
            F* w = softmax ? &wT_[static_cast<size_t>(tid) * Ba * T] : nullptr;
            if (softmax) std::fill(accT, accT + Ba * d, F(0));
            if (softmax && Ba == 1) {
                scan_one(n0, n1, Qa, want_norms, m[0], accT, w);
                continue;
            }
            for (int64_t j0 = n0; j0 < n1; j0 += T) {
                const int nj = static_cast<int>(std::min<int64_t>(T, n1 - j0));
                const KT* kp = key(j0);
                ks_.dot(kp, p_.ks, nj, Qa, d, static_cast<int>(Ba), d, &S_[j0], N,
                        want_norms ? &norms_[j0] : nullptr);
                if (!softmax) continue;
                for (int64_t a = 0; a < Ba; ++a) fold(&S_[a * N + j0], nj, m[a], accT + a * d, w + a * T);
                const int64_t pfn = std::min<int64_t>(T, n1 - (j0 + T));
                ks_.axpy(kp, p_.ks, nj, w, T, static_cast<int>(Ba), d, accT, d,
                         pfn > 0 ? key(j0 + T) : nullptr, static_cast<int>(std::max<int64_t>(0, pfn)));
            }
        }
        clock.thread_done();
        }
        clock.joined();
        if (!softmax) return;
        // Combine the per-part sums after the join (one synchronization per pass; the sums are
        // small next to the keys). Fixed part order: the result depends only on the parts.
        for (int64_t a = 0; a < Ba; ++a) {
            F M = -std::numeric_limits<F>::infinity();
            for (int u = 0; u < np; ++u) M = std::max(M, mT_[static_cast<size_t>(u) * Ba + a]);
            F* dst = &acc_[a * d];
            for (int u = 0; u < np; ++u) {
                F mu = mT_[static_cast<size_t>(u) * Ba + a];
                if (!(mu > -std::numeric_limits<F>::infinity())) continue;
                F f = static_cast<F>(std::exp(mu - M));
                const F* src = &accT_[(static_cast<size_t>(u) * Ba + a) * d];
                for (int64_t c = 0; c < d; ++c) dst[c] += f * src[c];
            }
        }
    }

    // One row's running max m of beta s after the nj cosines at s (its sums acc rescaled when m
    // grows), and their weights exp(beta s - m) into w. m stays at most MARGIN below the row's
    // max: no overflow, few rescales.
    void fold(const F* s, int nj, F& m, F* acc, F* w) const {
        const F beta = static_cast<F>(p_.beta), margin = F(8), ninf = -std::numeric_limits<F>::infinity();
        F tmax = ninf;
        for (int j = 0; j < nj; ++j) tmax = std::max(tmax, beta * s[j]);
        if (tmax > m + margin || (m == ninf && tmax > m)) {
            if (m != ninf) ks_.scale(acc, p_.d, static_cast<F>(std::exp(m - tmax)));
            m = tmax;
        }
        ks_.weights(s, nj, beta, m, w);
    }

    // pass() over the keys [n0, n1) for one row q with softmax, in groups of scan_group keys, each
    // scored in the sweep that adds the group before to the sums (KernelSet::dot_axpy)
    void scan_one(int64_t n0, int64_t n1, const F* q, bool want_norms, F& m, F* acc, F* w) {
        const int64_t d = p_.d;
        const int G = scan_;
        const KT* prev = nullptr;
        int64_t j = n0;
        for (; j + G <= n1; j += G) {
            ks_.dot_axpy(G, key(j), p_.ks, q, d, &S_[j], want_norms ? &norms_[j] : nullptr, prev, w, acc,
                         j + 2 * G <= n1 ? key(j + G) : nullptr);
            fold(&S_[j], G, m, acc, w);
            prev = key(j);
        }
        if (prev != nullptr) ks_.axpy(prev, p_.ks, G, w, G, 1, d, acc, d, nullptr, 0);
        if (j < n1) {
            const int nj = static_cast<int>(n1 - j);
            ks_.dot(key(j), p_.ks, nj, q, d, 1, d, &S_[j], p_.N, want_norms ? &norms_[j] : nullptr);
            fold(&S_[j], nj, m, acc, w);
            ks_.axpy(key(j), p_.ks, nj, w, nj, 1, d, acc, d, nullptr, 0);
        }
    }

    // pass() for Ba >= BATCH_MIN rows with the batched loops (csrc/retrieve/batched.h): the same
    // results into S_ (Ba rows used of ceil(Ba / BR) BR), norms_ and acc_ (natural order).
    void pass_batched(const std::vector<int64_t>& active, bool softmax, bool want_norms) {
        const int64_t N = p_.N, d = p_.d, Ba = static_cast<int64_t>(active.size());
        const int64_t W = ks_.lanes, dv = (d + W - 1) / W, blocks = (Ba + BR - 1) / BR, Bp = blocks * BR;
        const int64_t bsize = dv * BR * W;  // elements of one packed block
        const int64_t qbsize = (dv + 1) / 2 * 2 * BR * W;  // of a block of queries (whole vector pairs)
        const int np = parts();
        const int nt = threads_for(Ba);
        const int T = btile_;
        S_.resize(Bp * N);
        if (want_norms) norms_.resize(N);
        Qp_.assign(blocks * qbsize, F(0));
        for (int64_t a = 0; a < Ba; ++a) {
            const F* src = &q_[active[a] * d];
            if (ks_.tile_pairs) {  // per 32 elements: [16 pairs][BR][2] hi, then lo (csrc/retrieve/amx_scores.h)
                uint16_t* dst = reinterpret_cast<uint16_t*>(&Qp_[(a / BR) * qbsize]) + (a % BR) * 2;
                for (int64_t c = 0; c < d; ++c) {
                    uint16_t* v = dst + (c / 32) * 512 + (c % 32) / 2 * (2 * BR) + c % 2;
                    split_to_bf16(static_cast<float>(src[c]), v, v + 256);
                }
                continue;
            }
            if (ks_.split) {  // pairs of vectors: 2W bfloat16 hi, then 2W lo (csrc/retrieve/bf16_split.h)
                uint16_t* dst = reinterpret_cast<uint16_t*>(&Qp_[(a / BR) * qbsize]) + (a % BR) * 4 * W;
                for (int64_t c = 0; c < d; ++c) {
                    uint16_t* v = dst + (c / (2 * W)) * BR * 4 * W + c % (2 * W);
                    split_to_bf16(static_cast<float>(src[c]), v, v + 2 * W);
                }
                continue;
            }
            F* dst = &Qp_[(a / BR) * qbsize + (a % BR) * W];
            for (int64_t c0 = 0; c0 < d; c0 += W)  // vector c0 / W of row a % BR
                std::copy(src + c0, src + std::min(d, c0 + W), dst + (c0 / W) * BR * W);
        }
        split_scores_ = ks_.split;
        if (softmax) {
            accT_.resize(static_cast<size_t>(np) * blocks * bsize);
            mT_.assign(static_cast<size_t>(np) * Bp, -std::numeric_limits<F>::infinity());
            wT_.resize(static_cast<size_t>(np) * Bp * T);
        }
        const int64_t psize = (blocks * BR + 1) * static_cast<int64_t>(T) * W;  // partials of a part
        partT_.resize(static_cast<size_t>(np) * psize);
        int64_t chunk = (N + np - 1) / np;
        chunk = (chunk + 3) / 4 * 4;
        const F beta = static_cast<F>(p_.beta);
        const F margin = F(8);  // as in fold()
        const F ninf = -std::numeric_limits<F>::infinity();
        JoinClock clock(nt);
#pragma omp parallel num_threads(nt)
        {
#pragma omp for schedule(static, 1) nowait
        for (int tid = 0; tid < np; ++tid) {
            const int64_t n0 = std::min<int64_t>(N, tid * chunk), n1 = std::min<int64_t>(N, n0 + chunk);
            F* accT = softmax ? &accT_[static_cast<size_t>(tid) * blocks * bsize] : nullptr;
            F* m = softmax ? &mT_[static_cast<size_t>(tid) * Bp] : nullptr;
            F* w = softmax ? &wT_[static_cast<size_t>(tid) * Bp * T] : nullptr;
            F* part = &partT_[static_cast<size_t>(tid) * psize];
            if (softmax) std::fill(accT, accT + blocks * bsize, F(0));
            for (int64_t j0 = n0; j0 < n1; j0 += T) {
                const int nj = static_cast<int>(std::min<int64_t>(T, n1 - j0));
                const KT* kp = key(j0);
                const int64_t pb = static_cast<int64_t>(nj) * BR * W;  // partials of one block
                F* npart = part + blocks * pb;
                std::fill(part, npart + nj * W, F(0));
                batched_scores(ks_, kp, p_.ks, nj, Qp_.data(), qbsize, blocks, d, part, pb, want_norms ? npart : nullptr);
                for (int64_t blk = 0; blk < blocks; ++blk)
                    for (int j = 0; j < nj; ++j)
                        for (int r = 0; r < BR; ++r) {
                            const F* v = part + blk * pb + (static_cast<int64_t>(j) * BR + r) * W;
                            F sum = 0;
                            for (int64_t l = 0; l < W; ++l) sum += v[l];
                            S_[(blk * BR + r) * N + j0 + j] = sum;
                        }
                if (want_norms)
                    for (int j = 0; j < nj; ++j) {
                        F sum = 0;
                        for (int64_t l = 0; l < W; ++l) sum += npart[j * W + l];
                        norms_[j0 + j] = sum;
                    }
                if (!softmax) continue;
                for (int64_t a = 0; a < Bp; ++a) {
                    const F* s = &S_[a * N + j0];
                    F tmax = ninf;
                    for (int j = 0; j < nj; ++j) tmax = std::max(tmax, beta * s[j]);
                    if (tmax > m[a] + margin || (m[a] == ninf && tmax > m[a])) {
                        if (m[a] != ninf) {
                            const F f = static_cast<F>(std::exp(m[a] - tmax));
                            F* accb = accT + (a / BR) * bsize + (a % BR) * W;
                            for (int64_t cv = 0; cv < dv; ++cv) ks_.scale(accb + cv * BR * W, W, f);
                        }
                        m[a] = tmax;
                    }
                    ks_.weights(s, nj, beta, m[a], w + a * T);
                }
                // block 0 prefetches (the rows of the next tile, or past the keys: harmless)
                const KT* next = reinterpret_cast<const KT*>(reinterpret_cast<uintptr_t>(kp) +
                                                             static_cast<uintptr_t>(nj * p_.ks) * sizeof(KT));
                batched_sums(ks_, kp, p_.ks, nj, w, T, blocks, d, accT, bsize, next, nj);
            }
        }
        clock.thread_done();
        }
        clock.joined();
        if (!softmax) return;
        acc_.assign(Ba * d, F(0));
        for (int64_t a = 0; a < Ba; ++a) {
            F M = ninf;
            for (int u = 0; u < np; ++u) M = std::max(M, mT_[static_cast<size_t>(u) * Bp + a]);
            F* dst = &acc_[a * d];
            for (int u = 0; u < np; ++u) {
                const F mu = mT_[static_cast<size_t>(u) * Bp + a];
                if (!(mu > ninf)) continue;
                const F f = static_cast<F>(std::exp(mu - M));
                const F* src = &accT_[static_cast<size_t>(u) * blocks * bsize + (a / BR) * bsize + (a % BR) * W];
                for (int64_t c0 = 0; c0 < d; c0 += W) {
                    const F* v = src + (c0 / W) * BR * W;
                    for (int64_t c = c0; c < std::min(d, c0 + W); ++c) dst[c] += f * v[c - c0];
                }
            }
        }
    }

    void finish(int64_t b, int64_t idx, double c) {
        if (c > p_.threshold) {
            p_.out_index[b] = idx;
            static_cast<F*>(p_.out_score)[b] = static_cast<F>(c);
            p_.out_matched[b] = true;
        }
    }

    void finish_rows(const std::vector<int64_t>& active, const std::vector<int64_t>& exact_rows,
                     const std::vector<BoundRow>& bound_rows) {
        const int64_t N = p_.N;
        const int64_t ne = static_cast<int64_t>(exact_rows.size());
        const int64_t nb = static_cast<int64_t>(bound_rows.size());
        // threads only when the rows' work (about N comparisons each, more for long candidate walks)
        // is large: a quarter of what pays for a thread in multiply-adds
        const int64_t rows_work = (ne + nb) * N;
        const int nt = rows_work < min_work_per_thread(isa_) / 4
                           ? 1
                           : std::max(1, std::min<int>({p_.nthreads, machine().cpus, static_cast<int>(ne + nb)}));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
        for (int64_t i = 0; i < ne + nb; ++i) {
            if (i < ne) {
                const int64_t a = exact_rows[i];
                const F* s = &S_[a * N];
                int64_t best = 0;
                F bs = s[0];
                for (int64_t j = 1; j < N; ++j)
                    if (s[j] > bs || (bs != bs && s[j] == s[j])) { bs = s[j]; best = j; }
                finish(active[a], best, bs);
            } else {
                bound_score(bound_rows[i - ne]);
            }
        }
    }

    // Final scoring of a row that took every step, from the bound on its final cosines
    // (horen_fast/hopfield.py, FINAL-SCORE BOUND, plus rounding slack), under the tie rule there.
    void bound_score(const BoundRow& br) {
        const int64_t N = p_.N, d = p_.d;
        const F* s = &S_[br.a * N];
        const double thr = p_.threshold;
        const double unit = std::is_same<F, float>::value ? 5.96e-8 : 1.12e-16;
        const double rel = unit * (4.0 * std::sqrt(static_cast<double>(d)) + 8.0) +  // dot error / |k|
                           (split_scores_ ? SPLIT_REL : 0.0);
        const double slack = std::is_same<F, float>::value ? 2e-6 : 1e-12;
        const double c1 = br.c1, c2 = br.c2, inv = br.inv_nrm, ac1 = std::fabs(c1);
        struct Cand { double ub; int64_t i; };
        std::vector<Cand> cand;
        for (int64_t i = 0; i < N; ++i) {
            const double si = s[i];
            const double kn = std::sqrt(std::max(0.0, static_cast<double>(norms_[i]))) * (1 + rel);
            const double delta = rel * kn + slack;
            // |r.k - rho s| <= sigma |k_perp| <= sigma |k|   (cheap test first)
            double ub = (c1 * si + ac1 * delta + c2 * kn) * inv + slack * (1 + kn);
            if (!(ub > thr) && si == si) continue;
            const double sa = std::max(0.0, std::fabs(si) - delta);
            const double perp = std::sqrt(std::max(0.0, kn * kn - sa * sa));
            ub = (c1 * si + ac1 * delta + c2 * perp) * inv + slack * (1 + kn);
            if (ub > thr || si != si) cand.push_back({si == si ? ub : std::numeric_limits<double>::infinity(), i});
        }
        if (cand.empty()) return;  // every final cosine is <= threshold: no match, no re-read
        auto later = [](const Cand& x, const Cand& y) { return x.ub < y.ub || (x.ub == y.ub && x.i > y.i); };
        std::make_heap(cand.begin(), cand.end(), later);
        std::vector<F> qp(d);
        to_paired(&q_[br.b * d], qp.data(), d, ks_.paired_block);
        const F* q = qp.data();
        double best = -std::numeric_limits<double>::infinity();
        int64_t best_i = -1;
        while (!cand.empty()) {
            const Cand top = cand.front();
            if (top.ub < best) break;
            std::pop_heap(cand.begin(), cand.end(), later);
            cand.pop_back();
            F c;
            ks_.dot(key(top.i), p_.ks, 1, q, d, 1, d, &c, 1, nullptr);
            const double cd = c;
            if (cd > best || (cd == best && top.i < best_i)) { best = cd; best_i = top.i; }
        }
        if (best_i >= 0) finish(br.b, best_i, best);
    }
};

template <class F, class KT>
static void run_typed(const Problem& p, Isa isa) {
    KernelSet<F, KT> ks = kernels_for<F, KT>(isa);
    Driver<F, KT>(p, ks, isa).run();
}

// The two loops of one batched pass over an L2-resident tile (64 keys x 4096 elements of key type
// KT, two blocks of BR queries of small normal values, the B = 16 of prefill and evaluation): the
// scores, then the weighted sums (so that the ratio is that of whole passes; Isa::amx splits each
// key once for all the blocks, so fewer rows gain less), for timing
template <class KT>
struct PassProbe {
    static constexpr int nj = 64, blocks = 2;
    static constexpr int64_t d = 4096;
    const KernelSet<float, KT> ks;
    const int64_t W, dv, qbsize, bsize, pb;
    std::vector<KT> keys;
    std::vector<float> q, part, w, acc;

    explicit PassProbe(Isa isa)
        : ks(kernels_for<float, KT>(isa)), W(ks.lanes), dv((d + W - 1) / W), qbsize((dv + 1) / 2 * 2 * BR * W),
          bsize(dv * BR * W), pb(static_cast<int64_t>(nj) * BR * W), keys(static_cast<size_t>(nj) * d) {
        for (size_t i = 0; i < keys.size(); ++i) {
            if constexpr (std::is_same<KT, float>::value) keys[i] = 0.01f + 1e-4f * static_cast<float>(i % 13);
            else keys[i].bits = static_cast<uint16_t>(0x3c00u + i % 13u);  // bfloat16 near 0.008
        }
        q.assign(static_cast<size_t>(blocks * qbsize), 0.01f);
        part.assign(static_cast<size_t>(blocks * pb + W), 0.0f);
        w.assign(static_cast<size_t>(blocks) * BR * nj, 0.03f);
        acc.assign(static_cast<size_t>(blocks * bsize), 0.0f);
        if (ks.split) {  // bfloat16 hi/lo pairs of small normal values
            uint16_t* s = reinterpret_cast<uint16_t*>(q.data());
            for (size_t i = 0; i < 2 * q.size(); ++i) s[i] = static_cast<uint16_t>(0x3c00u + i % 7u);
        }
    }
    int64_t ns() {  // one pass, in steady-clock ns
        const int64_t a = now_ns();
        batched_scores(ks, keys.data(), d, nj, q.data(), qbsize, blocks, d, part.data(), pb, static_cast<float*>(nullptr));
        batched_sums(ks, keys.data(), d, nj, w.data(), nj, blocks, d, acc.data(), bsize, static_cast<const KT*>(nullptr), 0);
        return now_ns() - a;
    }
};

// The two paths (the FMAs of Isa::avx512, the split scores of `isa`) timed in turn (so that a
// clock change or an interruption hits both), 20 times each after a warm-up, on every CPU at once
// as a pass runs them (one probe per thread); per thread the fastest pass of each, and the ratio
// of their sums over the threads.
template <class KT>
static double split_speedup_for(Isa isa) {
#if HOREN_X86
    if (!isa_supported(isa) || (isa != Isa::avx512bf16 && isa != Isa::amx)) return 0;
    const int nt = std::max(1, machine().cpus);
    std::vector<int64_t> tf(nt, INT64_MAX), ts(nt, INT64_MAX);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        PassProbe<KT> fma(Isa::avx512), split(isa);
        for (int rep = 0; rep < 24; ++rep) {
            const int64_t a = fma.ns(), b = split.ns();
            if (rep >= 4) { tf[t] = std::min(tf[t], a); ts[t] = std::min(ts[t], b); }
        }
    }
    double sf = 0, ss = 0;
    for (int t = 0; t < nt; ++t) { sf += static_cast<double>(tf[t]); ss += static_cast<double>(ts[t]); }
    return sf / std::max(ss, 1.0);
#else
    (void)isa;
    return 0;
#endif
}

SplitSpeedup measure_split_speedup(Isa isa) {
    SplitSpeedup s;
    s.bf16_keys = split_speedup_for<bf16_t>(isa);
    s.f32_keys = split_speedup_for<float>(isa);
    return s;
}

void retrieve(const Problem& p, KeyType key_type, bool f64, Isa isa) {
    if (f64) {
        switch (key_type) {
            case K_F32: return run_typed<double, float>(p, isa);
            case K_F64: return run_typed<double, double>(p, isa);
            case K_BF16: return run_typed<double, bf16_t>(p, isa);
            case K_F16: return run_typed<double, f16_t>(p, isa);
        }
    } else {
        switch (key_type) {
            case K_F32: return run_typed<float, float>(p, isa);
            case K_BF16: return run_typed<float, bf16_t>(p, isa);
            case K_F16: return run_typed<float, f16_t>(p, isa);
            case K_F64: throw std::invalid_argument("float64 keys need float64 compute");
        }
    }
    throw std::invalid_argument("unknown key dtype code " + std::to_string(static_cast<int>(key_type)));
}

}  // namespace horen

#else  // HOREN_KERNEL_BODY
// =================================================================================================
// The inner loops, written once against an instruction set's OpsF / OpsD (see Part 2).
// =================================================================================================

template <class F> struct OpsOf;
template <> struct OpsOf<float> { using type = OpsF; };
template <> struct OpsOf<double> { using type = OpsD; };

// Scores of JB keys against BB queries, accumulated over d in registers.
// With NORM, also the squared norms of the JB keys into nrm[j].
template <class O, class KT, int JB, int BB, bool NORM>
static void dot_kernel(const KT* K, int64_t ks, const typename O::F* Q, int64_t qs, int64_t d,
                       typename O::F* out, int64_t os, typename O::F* nrm) {
    // each key row is fetched into L2 2 KiB ahead by hand: the L2 streamer stops at every 4 KiB
    // page, and a single query reads the keys at the memory's rate (1.08-1.1x faster on a Sapphire
    // Rapids Xeon). Into L2 (prefetcht1), not L1: the L1 prefetchers take it from there, and
    // fetching 4 rows ahead into L1 slowed float32 keys 1.26x on a Zen 4 EPYC (bench/RESULTS.md)
    constexpr int64_t DOT_PF = 2048 / static_cast<int64_t>(sizeof(KT));
    constexpr int64_t DOT_LINE = 64 / static_cast<int64_t>(sizeof(KT));  // key elements per cache line
    using V = typename O::V;
    constexpr int W = O::W;
    V acc[JB][BB];
    V nacc[JB];
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        nacc[j] = O::zero();
#pragma GCC unroll 16
        for (int b = 0; b < BB; ++b) acc[j][b] = O::zero();
    }
    int64_t c = 0;
    if constexpr (std::is_same<KT, bf16_t>::value) {  // pairs layout, see paired_block
        for (; c + 2 * W <= d; c += 2 * W) {
            V lo[JB], hi[JB], qlo[BB], qhi[BB];
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) O::lk2(K + j * ks + c, lo[j], hi[j]);
            if (c % DOT_LINE < 2 * W)  // once per cache line
#pragma GCC unroll 16
                for (int j = 0; j < JB; ++j) __builtin_prefetch(K + j * ks + c + DOT_PF, 0, 2);
#pragma GCC unroll 16
            for (int b = 0; b < BB; ++b) {
                qlo[b] = O::load(Q + b * qs + c);
                qhi[b] = O::load(Q + b * qs + c + W);
            }
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) {
#pragma GCC unroll 16
                for (int b = 0; b < BB; ++b) acc[j][b] = O::fma(hi[j], qhi[b], O::fma(lo[j], qlo[b], acc[j][b]));
                if (NORM) nacc[j] = O::fma(hi[j], hi[j], O::fma(lo[j], lo[j], nacc[j]));
            }
        }
    }
    for (; c + W <= d; c += W) {
        V kv[JB], qv[BB];
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) kv[j] = O::lk(K + j * ks + c);
        if (c % DOT_LINE < W)  // once per cache line
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) __builtin_prefetch(K + j * ks + c + DOT_PF, 0, 2);
#pragma GCC unroll 16
        for (int b = 0; b < BB; ++b) qv[b] = O::load(Q + b * qs + c);
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) {
#pragma GCC unroll 16
            for (int b = 0; b < BB; ++b) acc[j][b] = O::fma(kv[j], qv[b], acc[j][b]);
            if (NORM) nacc[j] = O::fma(kv[j], kv[j], nacc[j]);
        }
    }
    if (c < d) {
        const int n = static_cast<int>(d - c);
        V kv[JB], qv[BB];
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) kv[j] = O::lkt(K + j * ks + c, n);
#pragma GCC unroll 16
        for (int b = 0; b < BB; ++b) qv[b] = O::loadt(Q + b * qs + c, n);
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) {
#pragma GCC unroll 16
            for (int b = 0; b < BB; ++b) acc[j][b] = O::fma(kv[j], qv[b], acc[j][b]);
            if (NORM) nacc[j] = O::fma(kv[j], kv[j], nacc[j]);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j)
#pragma GCC unroll 16
        for (int b = 0; b < BB; ++b) out[b * os + j] = O::hsum(acc[j][b]);
    if (NORM)
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) nrm[j] = O::hsum(nacc[j]);
}

template <class O, class KT, int BB, bool NORM>
static HOREN_INLINE void dot_rows(const KT* K, int64_t ks, int nj, const typename O::F* Q, int64_t qs,
                                  int64_t d, typename O::F* out, int64_t os, typename O::F* nrm) {
    int j = 0;
    for (; j + DOT_JB <= nj; j += DOT_JB)
        dot_kernel<O, KT, DOT_JB, BB, NORM>(K + j * ks, ks, Q, qs, d, out + j, os, NORM ? nrm + j : nullptr);
    for (; j < nj; ++j)
        dot_kernel<O, KT, 1, BB, NORM>(K + j * ks, ks, Q, qs, d, out + j, os, NORM ? nrm + j : nullptr);
}

template <class F, class KT>
static void dot_block(const KT* K, int64_t ks, int nj, const F* Q, int64_t qs, int nb, int64_t d, F* out,
                      int64_t os, F* nrm) {
    using O = typename OpsOf<F>::type;
    int b = 0;
    if (nrm != nullptr) {  // the first block of rows also computes the key norms
        if (nb >= DOT_BB) {
            dot_rows<O, KT, DOT_BB, true>(K, ks, nj, Q, qs, d, out, os, nrm);
            b = DOT_BB;
        } else {
            dot_rows<O, KT, 1, true>(K, ks, nj, Q, qs, d, out, os, nrm);
            b = 1;
        }
    }
    for (; b + DOT_BB <= nb; b += DOT_BB) dot_rows<O, KT, DOT_BB, false>(K, ks, nj, Q + b * qs, qs, d, out + b * os, os, nullptr);
    for (; b < nb; ++b) dot_rows<O, KT, 1, false>(K, ks, nj, Q + b * qs, qs, d, out + b * os, os, nullptr);
}

// acc[b] += sum_j w[b, j] K[j] for J keys: a chunk of the J keys is loaded into registers once
// and applied to every query row.
// Prefetch (into L2) the `bytes` at element c of the first n of J keys of the next tile.
template <int J, class KT>
static HOREN_INLINE void prefetch_lines(const KT* pf, int64_t ks, int n, int64_t c, int bytes) {
    // Pays off for 16-bit keys; for wider keys the extra misses slow the loop more than they save.
    if (sizeof(KT) != 2 || pf == nullptr) return;
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j)
        if (j < n)
            for (int off = 0; off < bytes; off += 64)
                __builtin_prefetch(reinterpret_cast<const char*>(pf + j * ks + c) + off, 0, 2);
}

template <class O, class KT, int J>
static void axpy_kernel(const KT* K, int64_t ks, const typename O::F* Wt, int64_t ws, int nb, int64_t d,
                        typename O::F* acc, int64_t as, const KT* pf, int pfn) {
    using V = typename O::V;
    constexpr int W = O::W;
    constexpr int CB = AXPY_CB;
    int64_t c = 0;
    if constexpr (std::is_same<KT, bf16_t>::value) {  // pairs layout, see paired_block
        for (; c + 2 * W <= d; c += 2 * W) {
            V lo[J], hi[J];
#pragma GCC unroll 16
            for (int j = 0; j < J; ++j) O::lk2(K + j * ks + c, lo[j], hi[j]);
            prefetch_lines<J>(pf, ks, pfn, c, 2 * W * static_cast<int>(sizeof(KT)));
            for (int b = 0; b < nb; ++b) {
                typename O::F* dst = acc + b * as + c;
                V a0 = O::load(dst), a1 = O::load(dst + W);
#pragma GCC unroll 16
                for (int j = 0; j < J; ++j) {
                    V wv = O::set1(Wt[b * ws + j]);
                    a0 = O::fma(wv, lo[j], a0);
                    a1 = O::fma(wv, hi[j], a1);
                }
                O::store(dst, a0);
                O::store(dst + W, a1);
            }
        }
    }
    for (; c + CB * W <= d; c += CB * W) {
        V kv[J][CB];
#pragma GCC unroll 16
        for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
            for (int u = 0; u < CB; ++u) kv[j][u] = O::lk(K + j * ks + c + u * W);
        prefetch_lines<J>(pf, ks, pfn, c, CB * W * static_cast<int>(sizeof(KT)));
        for (int b = 0; b < nb; ++b) {
            typename O::F* dst = acc + b * as + c;
            V av[CB];
#pragma GCC unroll 4
            for (int u = 0; u < CB; ++u) av[u] = O::load(dst + u * W);
#pragma GCC unroll 16
            for (int j = 0; j < J; ++j) {
                V wv = O::set1(Wt[b * ws + j]);
#pragma GCC unroll 4
                for (int u = 0; u < CB; ++u) av[u] = O::fma(wv, kv[j][u], av[u]);
            }
#pragma GCC unroll 4
            for (int u = 0; u < CB; ++u) O::store(dst + u * W, av[u]);
        }
    }
    for (; c < d; c += W) {
        const int n = static_cast<int>(std::min<int64_t>(W, d - c));
        V kv[J];
#pragma GCC unroll 16
        for (int j = 0; j < J; ++j) kv[j] = n == W ? O::lk(K + j * ks + c) : O::lkt(K + j * ks + c, n);
        for (int b = 0; b < nb; ++b) {
            typename O::F* dst = acc + b * as + c;
            V av = n == W ? O::load(dst) : O::loadt(dst, n);
#pragma GCC unroll 16
            for (int j = 0; j < J; ++j) av = O::fma(O::set1(Wt[b * ws + j]), kv[j], av);
            if (n == W) O::store(dst, av);
            else O::storet(dst, av, n);
        }
    }
}

template <class F, class KT>
static void axpy_block(const KT* K, int64_t ks, int nj, const F* Wt, int64_t ws, int nb, int64_t d, F* acc,
                       int64_t as, const KT* pf, int pfn) {
    using O = typename OpsOf<F>::type;
    int j = 0;
    for (; j + AXPY_J <= nj; j += AXPY_J)
        axpy_kernel<O, KT, AXPY_J>(K + j * ks, ks, Wt + j, ws, nb, d, acc, as, pf ? pf + j * ks : nullptr,
                                   std::max(0, std::min(AXPY_J, pfn - j)));
    for (; j < nj; ++j)
        axpy_kernel<O, KT, 1>(K + j * ks, ks, Wt + j, ws, nb, d, acc, as, pf ? pf + j * ks : nullptr,
                              std::max(0, std::min(1, pfn - j)));
}

// Prefetch (into L2) element e of the JB key rows at K, or, past their end d, element e - d of the
// rows at Kn (the next group, unless null), so that each row's stream runs on into the next group
template <int JB, class KT>
static HOREN_INLINE void prefetch_ahead(const KT* K, const KT* Kn, int64_t ks, int64_t e, int64_t d) {
    if (e >= d) {
        if (Kn == nullptr) return;
        K = Kn;
        e -= d;
    }
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) __builtin_prefetch(K + j * ks + e, 0, 2);
}

// KernelSet::dot_axpy for JB keys: the scores as dot_kernel<JB, 1, NORM> computes them (the same
// operations in the same order), and with SUMS the sums as axpy_kernel<JB> adds them
template <class O, class KT, int JB, bool NORM, bool SUMS>
static void dot_axpy_kernel(const KT* K, int64_t ks, const typename O::F* q, int64_t d, typename O::F* out,
                            typename O::F* nrm, const KT* P, const typename O::F* w, typename O::F* acc,
                            const KT* Kn) {
    // each row 512 B ahead: on a Zen 2 EPYC 1.11-1.18x faster than 1 KiB for float32 keys of
    // 14336 and the same for bfloat16 keys and d = 1536 (bench/ab_retrieve.py, 2026-12-08);
    // on a Zen 3 EPYC 512 B was no faster than 1 KiB and 2 KiB up to 1.15x slower at d = 1536,
    // where rows end every 6 KiB (bench/RESULTS.md 2026-12-03)
    constexpr int64_t DOT_PF = 512 / static_cast<int64_t>(sizeof(KT));
    constexpr int64_t DOT_LINE = 64 / static_cast<int64_t>(sizeof(KT));
    using V = typename O::V;
    constexpr int W = O::W;
    V sacc[JB], nacc[JB], wv[JB];
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        sacc[j] = O::zero();
        nacc[j] = O::zero();
        if (SUMS) wv[j] = O::set1(w[j]);
    }
    int64_t c = 0;
    if constexpr (std::is_same<KT, bf16_t>::value) {  // pairs layout, see paired_block
        for (; c + 2 * W <= d; c += 2 * W) {
            const V qlo = O::load(q + c), qhi = O::load(q + c + W);
            if (c % DOT_LINE < 2 * W) prefetch_ahead<JB>(K, Kn, ks, c + DOT_PF, d);
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) {
                V lo, hi;
                O::lk2(K + j * ks + c, lo, hi);
                sacc[j] = O::fma(hi, qhi, O::fma(lo, qlo, sacc[j]));
                if (NORM) nacc[j] = O::fma(hi, hi, O::fma(lo, lo, nacc[j]));
            }
            if (SUMS) {
                V a0 = O::load(acc + c), a1 = O::load(acc + c + W);
#pragma GCC unroll 16
                for (int j = 0; j < JB; ++j) {
                    V lo, hi;
                    O::lk2(P + j * ks + c, lo, hi);
                    a0 = O::fma(wv[j], lo, a0);
                    a1 = O::fma(wv[j], hi, a1);
                }
                O::store(acc + c, a0);
                O::store(acc + c + W, a1);
            }
        }
    }
    for (; c + W <= d; c += W) {
        const V qv = O::load(q + c);
        if (c % DOT_LINE < W) prefetch_ahead<JB>(K, Kn, ks, c + DOT_PF, d);
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) {
            const V kv = O::lk(K + j * ks + c);
            sacc[j] = O::fma(kv, qv, sacc[j]);
            if (NORM) nacc[j] = O::fma(kv, kv, nacc[j]);
        }
        if (SUMS) {
            V av = O::load(acc + c);
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) av = O::fma(wv[j], O::lk(P + j * ks + c), av);
            O::store(acc + c, av);
        }
    }
    if (c < d) {
        const int n = static_cast<int>(d - c);
        const V qv = O::loadt(q + c, n);
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) {
            const V kv = O::lkt(K + j * ks + c, n);
            sacc[j] = O::fma(kv, qv, sacc[j]);
            if (NORM) nacc[j] = O::fma(kv, kv, nacc[j]);
        }
        if (SUMS) {
            V av = O::loadt(acc + c, n);
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) av = O::fma(wv[j], O::lkt(P + j * ks + c, n), av);
            O::storet(acc + c, av, n);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        out[j] = O::hsum(sacc[j]);
        if (NORM) nrm[j] = O::hsum(nacc[j]);
    }
}

template <class F, class KT, int JB>
static void dot_axpy_of(const KT* K, int64_t ks, const F* q, int64_t d, F* out, F* nrm, const KT* P,
                        const F* w, F* acc, const KT* Kn) {
    using O = typename OpsOf<F>::type;
    if (nrm != nullptr) {
        if (P != nullptr) dot_axpy_kernel<O, KT, JB, true, true>(K, ks, q, d, out, nrm, P, w, acc, Kn);
        else dot_axpy_kernel<O, KT, JB, true, false>(K, ks, q, d, out, nrm, P, w, acc, Kn);
    } else {
        if (P != nullptr) dot_axpy_kernel<O, KT, JB, false, true>(K, ks, q, d, out, nrm, P, w, acc, Kn);
        else dot_axpy_kernel<O, KT, JB, false, false>(K, ks, q, d, out, nrm, P, w, acc, Kn);
    }
}

template <class F, class KT>
static void dot_axpy_group(int g, const KT* K, int64_t ks, const F* q, int64_t d, F* out, F* nrm, const KT* P,
                           const F* w, F* acc, const KT* Kn) {
    if (g == 4) dot_axpy_of<F, KT, 4>(K, ks, q, d, out, nrm, P, w, acc, Kn);
    else dot_axpy_of<F, KT, 2>(K, ks, q, d, out, nrm, P, w, acc, Kn);
}

template <class F>
static void weights_tile(const F* s, int n, F beta, F m, F* w) {
    using O = typename OpsOf<F>::type;
    int j = 0;
    if constexpr (O::HAS_EXP) {
        const typename O::V vb = O::set1(beta), vm = O::set1(-m);
        for (; j + O::W <= n; j += O::W) O::store(w + j, O::exp(O::fma(vb, O::load(s + j), vm)));
        if (j < n) {
            O::storet(w + j, O::exp(O::fma(vb, O::loadt(s + j, n - j), vm)), n - j);
            j = n;
        }
    }
    for (; j < n; ++j) w[j] = std::exp(beta * s[j] - m);
}

template <class F>
static void scale_vec(F* x, int64_t n, F c) {
    for (int64_t i = 0; i < n; ++i) x[i] *= c;
}

#include "batched.h"

template <class F, class KT>
KernelSet<F, KT> make_kernels() {
    KernelSet<F, KT> k;
    k.dot = &dot_block<F, KT>;
    k.axpy = &axpy_block<F, KT>;
    k.dot_axpy = &dot_axpy_group<F, KT>;
    k.weights = &weights_tile<F>;
    k.scale = &scale_vec<F>;
    k.paired_block = std::is_same<KT, bf16_t>::value ? 2 * OpsOf<F>::type::W : 0;
    k.bdot = &bdot_block<F, KT>;
    k.baxpy = &baxpy_block<F, KT>;
    k.lanes = OpsOf<F>::type::W;
    k.chunk = bchunk<typename OpsOf<F>::type>();
    k.bdot_blocks = nullptr;
    k.baxpy_blocks = nullptr;
    k.split = false;
    k.tile_pairs = false;
    return k;
}

#endif  // HOREN_KERNEL_BODY
