// The key sketch's passes on the CPU (horen_fast/sketch.py: KeySketch.scan and .rescue) and the
// rescue's exact rescoring (pair_dots), built into horen_fast._sketch; the binding that checks
// their arguments is csrc/bindings/sketch_module.cpp. The torch code in sketch.py is the
// reference they are tested against.
//
// A sketch row is split in two bfloat16 arrays: the coarse part y_c (the first rc basis
// coordinates, rc = 64 by default) and the fine part y_f (the other rf). One pass reads the coarse
// part of every row for B queries and fuses: the tail's logits and online softmax over y_c, and a
// coarse Cauchy-Schwarz bound u_c >= u (the full bound). Only rows whose u_c can still reach a
// query's near-key heap (or, in rescue, the floor) read their fine part. Work is split over OpenMP
// threads by label range. The passes run in blocks of 16 rows (csrc/sketch/blocks.h, written once
// and compiled here for AVX-512, with AVX512_BF16 dot products for many queries where the CPU has
// them, and for AVX2) where the caller picked one of those instruction sets and the widths have a
// specialization, a generic loop otherwise; pair_dots likewise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/bf16.h"
#include "../common/exp_poly.h"
#include "../common/isa.h"
#include "../common/threads.h"
#include "sketch.h"

#if HOREN_X86 && defined(__GNUC__)
#define HOREN_HAVE_BLOCKS 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace horen { namespace sketch {
namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Entry {   // a near-key heap entry: full bound, tail logit, label
    float u;
    float logit;
    int64_t label;
};
inline bool heap_less(const Entry& a, const Entry& b) { return a.u > b.u; }  // min-heap by u

struct Acc {     // one query's tail: max logit, sum of weights, weighted coarse rows, weighted e_c
    float max = NEG_INF;
    double z = 0.0;
    double v = 0.0;
    std::vector<float> y;
};

inline float bf16(uint16_t h) { return bf16_to_float(h); }

inline float dot_bf16(const float* q, const uint16_t* row, int64_t n) {
    float acc[16] = {0.f};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += q[j + l] * bf16(row[j + l]);
    float s = 0.f;
    for (; j < n; ++j) s += q[j] * bf16(row[j]);
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
}

// add a row (logit, its first rt coarse values, e_t) to a query's tail. Out of line, like offer
// below: their float arithmetic is compiled once, for the baseline instruction set, so the sums do
// not depend on whether the compiler inlines them into an AVX-512 block (where a * b + c becomes
// one fused multiply-add): the results stay the same from build to build.
__attribute__((noinline)) void absorb(Acc& a, float logit, const uint16_t* yc, float et, int64_t rt) {
    if (logit == NEG_INF) return;
    if (logit > a.max) {  // rescale what came before to the new maximum
        float keep = a.max == NEG_INF ? 0.f : std::exp(a.max - logit);
        a.z *= keep;
        a.v *= keep;
        for (int64_t j = 0; j < rt; ++j) a.y[j] *= keep;
        a.max = logit;
    }
    float w = std::exp(logit - a.max);
    a.z += w;
    a.v += static_cast<double>(w) * et;
    for (int64_t j = 0; j < rt; ++j) a.y[j] += w * bf16(yc[j]);
}

// the fine part's dot product q . y_f of a full bound: dot_bf16, or an instruction set's own
using FineDot = float (*)(const float* q, const uint16_t* row, int64_t n);

// the full bound of row i for query b: u = q_c . y_c + q_f . y_f + |q_perp| sqrt(e)
inline float full_bound(const Args& a, int64_t b, int64_t i, float sc, FineDot dot) {
    return sc + dot(a.qf + b * a.rf, a.rows_f + i * a.rf, a.rf) + a.perp[b] * std::sqrt(a.e[i]);
}

// offer row i (coarse bound uc, tail logit) to query b's near-key heap; false: not taken, the row
// belongs to the tail. A row pushed out of a full heap goes to the tail here.
__attribute__((noinline)) bool offer(const Args& a, int64_t b, int64_t i, float sc, float uc, float logit,
                                     std::vector<Entry>& h, Acc& acc, FineDot dot) {
    const bool full = static_cast<int64_t>(h.size()) >= a.k2;
    if (full && uc + a.slack <= h.front().u) return false;  // u <= u_c: it cannot get in
    const float u = full_bound(a, b, i, sc, dot);
    if (!full) {
        h.push_back({u, logit, i});
        std::push_heap(h.begin(), h.end(), heap_less);
        return true;
    }
    if (u <= h.front().u) return false;
    Entry out = h.front();
    std::pop_heap(h.begin(), h.end(), heap_less);
    h.back() = {u, logit, i};
    std::push_heap(h.begin(), h.end(), heap_less);
    absorb(acc, out.logit, a.rows_c + out.label * a.rc, a.e_t[out.label], a.rt);
    return true;
}

std::vector<int64_t> start_pointers(const Args& a, int64_t lo) {
    std::vector<int64_t> ptr(a.B);
    for (int64_t b = 0; b < a.B; ++b)
        ptr[b] = std::lower_bound(a.excl + b * a.K, a.excl + (b + 1) * a.K, lo) - (a.excl + b * a.K);
    return ptr;
}

// ---- generic loops --------------------------------------------------------------------------
void scan_range(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc,
                std::vector<std::vector<Entry>>& heaps) {
    std::vector<int64_t> ptr = start_pointers(a, lo);
    for (int64_t i = lo; i < hi; ++i) {
        if (!a.alive[i]) continue;
        const uint16_t* yc = a.rows_c + i * a.rc;
        const float et = a.e_t[i], sec = std::sqrt(a.e_c[i]);
        for (int64_t b = 0; b < a.B; ++b) {
            const int64_t* ex = a.excl + b * a.K;
            int64_t& p = ptr[b];
            while (p < a.K && ex[p] < i) ++p;
            if (p < a.K && ex[p] == i) continue;  // this row's own candidate
            const float* q = a.qc + b * a.rc;
            const float st = dot_bf16(q, yc, a.rt);
            const float logit = a.beta * st + a.cvar[b] * et;
            if (a.k2 > 0) {
                const float sc = st + dot_bf16(q + a.rt, yc + a.rt, a.rc - a.rt);
                if (offer(a, b, i, sc, sc + a.perp_c[b] * sec, logit, heaps[b], acc[b], &dot_bf16)) continue;
            }
            absorb(acc[b], logit, yc, et, a.rt);
        }
    }
}

void rescue_range(const Args& a, const float* floor, int64_t lo, int64_t hi,
                  std::vector<std::pair<int64_t, int64_t>>& out) {
    std::vector<int64_t> ptr = start_pointers(a, lo);
    for (int64_t i = lo; i < hi; ++i) {
        if (!a.alive[i]) continue;
        const float sec = std::sqrt(a.e_c[i]);
        for (int64_t b = 0; b < a.B; ++b) {
            const int64_t* ex = a.excl + b * a.K;
            int64_t& p = ptr[b];
            while (p < a.K && ex[p] < i) ++p;
            if (p < a.K && ex[p] == i) continue;
            const float* q = a.qc + b * a.rc;
            const uint16_t* y = a.rows_c + i * a.rc;
            const float st = dot_bf16(q, y, a.rt);  // bounds from the tail's columns, then the coarse, then all
            if (st + a.perp_t[b] * std::sqrt(a.e_t[i]) + a.slack <= floor[b]) continue;
            const float sc = st + dot_bf16(q + a.rt, y + a.rt, a.rc - a.rt);
            if (sc + a.perp_c[b] * sec + a.slack <= floor[b]) continue;
            if (full_bound(a, b, i, sc, &dot_bf16) + a.slack > floor[b]) out.emplace_back(b, i);
        }
    }
}

// ---- shared by the blocks of every instruction set ------------------------------------------
// the first ``cols`` (even) columns of 16 bfloat16 rows as pairs: dst[j][l] = row l's columns
// 2j, 2j + 1 (one 32-bit word), the operand layout of bfloat16 dot products
inline void transpose_pairs(const uint16_t* rows, int rc, uint32_t* dst, int n, int cols) {
    if (n < 16) std::memset(dst, 0, sizeof(uint32_t) * (cols / 2) * 16);
    for (int l = 0; l < n; ++l) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(rows + l * rc);
        for (int j = 0; j < cols / 2; ++j) dst[j * 16 + l] = w[j];
    }
}

constexpr int64_t TRANSPOSE_FROM = 8;  // queries per pass from which the transposed block pays off
constexpr int PREFETCH_BLOCKS = 4;  // blocks ahead that a pass prefetches its coarse rows (8 KiB at rc = 64)

// lanes of the block [i0, i0 + n) alive and not excluded for this query (ptr advances)
inline uint32_t lanes(const Args& a, const int64_t* ex, int64_t& p, int64_t i0, int n, uint32_t alive) {
    while (p < a.K && ex[p] < i0) ++p;
    uint32_t m = alive;
    while (p < a.K && ex[p] < i0 + n) m &= ~(1u << (ex[p++] - i0));
    return m;
}

inline uint32_t alive_lanes(const Args& a, int64_t i0, int n) {
    uint32_t alive = 0;
    for (int l = 0; l < n; ++l) alive |= (a.alive[i0 + l] ? 1u : 0u) << l;
    return alive;
}

// f(VT, VC) with the (tail, coarse) widths in 16-column vectors as std::integral_constant, for
// the widths the blocks are specialized for; false (nothing called) for the others
template <class F> bool with_widths(int64_t rc, int64_t rt, F&& f) {
    using std::integral_constant;
    switch (rc * 1000 + rt) {
        case 16016: f(integral_constant<int, 1>{}, integral_constant<int, 1>{}); return true;
        case 32016: f(integral_constant<int, 1>{}, integral_constant<int, 2>{}); return true;
        case 32032: f(integral_constant<int, 2>{}, integral_constant<int, 2>{}); return true;
        case 64016: f(integral_constant<int, 1>{}, integral_constant<int, 4>{}); return true;
        case 64032: f(integral_constant<int, 2>{}, integral_constant<int, 4>{}); return true;
        case 64064: f(integral_constant<int, 4>{}, integral_constant<int, 4>{}); return true;
        default: return false;
    }
}

#ifdef HOREN_HAVE_BLOCKS
// ---- AVX2: 16 lanes as two __m256 ----------------------------------------------------------------
HOREN_TARGET_PUSH_AVX2
namespace isa_avx2 {
inline __m256i first_lanes(int n) {  // the first n (clamped to 0 .. 8) of 8 lanes set
    alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - std::min(8, std::max(0, n))));
}
inline __m256 bit_lanes(uint32_t bits) {  // lane l set where bit l of the low 8 is
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits & 0xffu)), sel);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
}
inline __m256 widen8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

struct L16 {
    struct V { __m256 lo, hi; };
    static constexpr bool PAIRS = false;
    static HOREN_INLINE V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
    static HOREN_INLINE V set1(float x) { const __m256 v = _mm256_set1_ps(x); return {v, v}; }
    static HOREN_INLINE V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
    static HOREN_INLINE V loadn(const float* p, int n) {
        return {_mm256_maskload_ps(p, first_lanes(n)), _mm256_maskload_ps(p + 8, first_lanes(n - 8))};
    }
    static HOREN_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
    static HOREN_INLINE V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
    static HOREN_INLINE V sub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
    static HOREN_INLINE V mul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
    static HOREN_INLINE V fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
    static HOREN_INLINE V sqrt(V a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
    static HOREN_INLINE V exp(V a) { return {horen_exp::exp8(a.lo), horen_exp::exp8(a.hi)}; }
    static HOREN_INLINE uint32_t gt(V a, V b) {
        return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ))) |
               static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ))) << 8;
    }
    static HOREN_INLINE V maskz(uint32_t m, V v) {
        return {_mm256_and_ps(v.lo, bit_lanes(m)), _mm256_and_ps(v.hi, bit_lanes(m >> 8))};
    }
    static HOREN_INLINE float sum(V v) { return hsum8(_mm256_add_ps(v.lo, v.hi)); }
    using Q = __m256;  // 4 rows' sums in halves: [a b c d] of lanes 0-3, then of lanes 4-7 (+ 8-15)
    static HOREN_INLINE Q sums4(V a, V b, V c, V d) {
        const __m256 ab = _mm256_hadd_ps(_mm256_add_ps(a.lo, a.hi), _mm256_add_ps(b.lo, b.hi));
        const __m256 cd = _mm256_hadd_ps(_mm256_add_ps(c.lo, c.hi), _mm256_add_ps(d.lo, d.hi));
        return _mm256_hadd_ps(ab, cd);
    }
    static HOREN_INLINE __m256 sums8(Q g0, Q g1) {
        return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
    }
    static HOREN_INLINE V sums16(Q g0, Q g1, Q g2, Q g3) { return {sums8(g0, g1), sums8(g2, g3)}; }
    static HOREN_INLINE V widen(const uint16_t* p) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return {widen8(_mm256_castsi256_si128(h)), widen8(_mm256_extracti128_si256(h, 1))};
    }
    static HOREN_INLINE void pairs(const uint32_t* p, V& first, V& second) {
        const __m256i m = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
        const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 8));
        first = {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
        second = {_mm256_castsi256_ps(_mm256_and_si256(a, m)), _mm256_castsi256_ps(_mm256_and_si256(b, m))};
    }
};

#define HOREN_SKETCH_BLOCKS 1
#include "blocks.h"
#undef HOREN_SKETCH_BLOCKS

}  // namespace isa_avx2
HOREN_TARGET_POP

// ---- AVX-512: 16 lanes as one __m512, and AVX512_BF16 products for many queries --------------
// add the 16 scores over columns [J0, J1) for G queries with bfloat16 dot products (two
// multiply-adds a lane per instruction; the query rounded to bfloat16: error <= 2^-9 |q| |y|)
template <int J0, int J1, int G> HOREN_AVX512BF16_FN __attribute__((noinline))
void scores16_bf(const uint32_t* const* q, const uint32_t* ytp, __m512* acc) {
    for (int j = J0 / 2; j < J1 / 2; ++j) {
        const __m512bh y = reinterpret_cast<__m512bh>(_mm512_load_si512(ytp + j * 16));
        for (int k = 0; k < G; ++k)
            acc[k] = _mm512_dpbf16_ps(acc[k], reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(q[k][j]))), y);
    }
}

HOREN_TARGET_PUSH_AVX512
namespace isa_avx512 {
struct L16 {
    using V = __m512;
    static constexpr bool PAIRS = true;
    static HOREN_INLINE __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
    static HOREN_INLINE V zero() { return _mm512_setzero_ps(); }
    static HOREN_INLINE V set1(float x) { return _mm512_set1_ps(x); }
    static HOREN_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
    static HOREN_INLINE V loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
    static HOREN_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static HOREN_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
    static HOREN_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static HOREN_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static HOREN_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static HOREN_INLINE V sqrt(V a) { return _mm512_sqrt_ps(a); }
    static HOREN_INLINE V exp(V a) { return horen_exp::exp16(a); }
    static HOREN_INLINE uint32_t gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
    static HOREN_INLINE V maskz(uint32_t m, V v) { return _mm512_maskz_mov_ps(static_cast<__mmask16>(m), v); }
    static HOREN_INLINE float sum(V v) { return _mm512_reduce_add_ps(v); }
    using Q = __m512;  // 4 rows' sums in quarters: [a b c d] in each 128-bit lane
    static HOREN_INLINE Q sums4(V a, V b, V c, V d) {
        const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
    }
    static HOREN_INLINE __m512 halves(__m512 x, __m512 y) {  // 128-bit lanes 0 + 1, 2 + 3 of x, then of y
        return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xdd));
    }
    static HOREN_INLINE V sums16(Q g0, Q g1, Q g2, Q g3) { return halves(halves(g0, g1), halves(g2, g3)); }
    static HOREN_INLINE V widen(const uint16_t* p) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    static HOREN_INLINE void pairs(const uint32_t* p, V& first, V& second) {
        const __m512i w = _mm512_load_si512(p);
        first = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        second = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
    template <int J0, int J1, int G> static HOREN_INLINE void scores_bf(const uint32_t* const* q, const uint32_t* ytp, V* acc) {
        scores16_bf<J0, J1, G>(q, ytp, acc);
    }
};

#define HOREN_SKETCH_BLOCKS 1
#include "blocks.h"
#undef HOREN_SKETCH_BLOCKS

}  // namespace isa_avx512
HOREN_TARGET_POP
#endif  // HOREN_HAVE_BLOCKS

// beta + cvar bounds every logit (scores and energies are at most 1); usable as a fixed shift of
// the weights while the smallest logit, -beta, stays far from float underflow after it
bool fixed_shift(const Args& a) {
    float top = 0.f;
    for (int64_t b = 0; b < a.B; ++b) top = std::max(top, a.cvar[b]);
    return 2.f * a.beta + top < 80.f;
}

// the coarse queries as bfloat16 pairs, when the bfloat16 dot products will run (many queries,
// the AVX-512 blocks, a CPU with AVX512_BF16)
std::vector<uint32_t> query_pairs(const Args& a) {
    std::vector<uint32_t> out;
    if (!is_avx512(a.isa) || !cpu_has_avx512bf16() || a.B < TRANSPOSE_FROM || a.rc % 16 != 0) return out;
    out.resize(a.B * a.rc / 2);
    for (int64_t b = 0; b < a.B; ++b)
        for (int64_t j = 0; j < a.rc / 2; ++j) {
            const float* q = a.qc + b * a.rc + 2 * j;
            out[b * a.rc / 2 + j] = float_to_bf16_bits(q[0]) | float_to_bf16_bits(q[1]) << 16;
        }
    return out;
}

// the blocks of the instruction set the caller picked (which it checked this CPU has), where the
// widths have them; else the generic loops
void scan_dispatch(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc,
                   std::vector<std::vector<Entry>>& heaps) {
#ifdef HOREN_HAVE_BLOCKS
    if (fixed_shift(a)) {
        if (is_avx512(a.isa) && isa_avx512::scan_here(a, lo, hi, acc, heaps)) return;
        if (a.isa == Isa::avx2 && isa_avx2::scan_here(a, lo, hi, acc, heaps)) return;
    }
#endif
    scan_range(a, lo, hi, acc, heaps);
}

void rescue_dispatch(const Args& a, const float* floor, int64_t lo, int64_t hi,
                     std::vector<std::pair<int64_t, int64_t>>& out) {
#ifdef HOREN_HAVE_BLOCKS
    if (is_avx512(a.isa) && isa_avx512::rescue_here(a, floor, lo, hi, out)) return;
    if (a.isa == Isa::avx2 && isa_avx2::rescue_here(a, floor, lo, hi, out)) return;
#endif
    rescue_range(a, floor, lo, hi, out);
}

void merge(Acc& into, const Acc& from, int64_t rt) {
    if (from.max == NEG_INF) return;
    if (into.max == NEG_INF) { into = from; return; }
    float m = std::max(into.max, from.max);
    float ki = std::exp(into.max - m), kf = std::exp(from.max - m);
    into.z = into.z * ki + from.z * kf;
    into.v = into.v * ki + from.v * kf;
    for (int64_t j = 0; j < rt; ++j) into.y[j] = into.y[j] * ki + from.y[j] * kf;
    into.max = m;
}

}  // namespace

void scan(const Args& args, int threads, const ScanOut& out) {
    Args a = args;
    const int64_t B = a.B, L = a.L, rt = a.rt, rc = a.rc, k2 = a.k2;
    const std::vector<uint32_t> pairs = query_pairs(a);
    a.qpair = pairs.empty() ? nullptr : pairs.data();
    const int T = threads_for_work(B * L * (k2 > 0 ? rc : rt), threads, a.isa);
    std::vector<std::vector<Acc>> acc(T, std::vector<Acc>(B));
    std::vector<std::vector<std::vector<Entry>>> heaps(T, std::vector<std::vector<Entry>>(B));
    const bool fixed = fixed_shift(a);
    for (auto& per : acc)
        for (int64_t b = 0; b < B; ++b) {
            per[b].y.assign(rt, 0.f);
            if (fixed) per[b].max = a.beta + a.cvar[b];  // weights relative to the largest possible logit
        }
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) scan_dispatch(a, L * t / T, L * (t + 1) / T, acc[t], heaps[t]);
    for (int64_t b = 0; b < B; ++b) {
        Acc& total = acc[0][b];
        std::vector<Entry> pool;
        for (int t = 0; t < T; ++t) {
            if (t) merge(total, acc[t][b], rt);
            pool.insert(pool.end(), heaps[t][b].begin(), heaps[t][b].end());
        }
        std::sort(pool.begin(), pool.end(), [](const Entry& x, const Entry& y) {
            return x.u != y.u ? x.u > y.u : x.label < y.label;
        });
        for (size_t j = static_cast<size_t>(k2); j < pool.size(); ++j)  // not among the k2: tail
            absorb(total, pool[j].logit, a.rows_c + pool[j].label * rc, a.e_t[pool[j].label], a.rt);
        out.max[b] = total.max;
        out.z[b] = static_cast<float>(total.z);
        out.v[b] = static_cast<float>(total.v);
        if (rt > 0) std::memcpy(out.y + b * rt, total.y.data(), rt * sizeof(float));
        for (int64_t j = 0; j < k2; ++j) {
            const bool has = j < static_cast<int64_t>(pool.size());
            out.near[b * k2 + j] = has ? pool[j].label : -1;
            out.near_u[b * k2 + j] = has ? pool[j].u : NEG_INF;
        }
    }
}

std::vector<std::pair<int64_t, int64_t>> rescue(const Args& args, const float* floor, int threads) {
    Args a = args;
    const std::vector<uint32_t> pairs = query_pairs(a);
    a.qpair = pairs.empty() ? nullptr : pairs.data();
    const int64_t L = a.L;
    const int T = threads_for_work(a.B * L * a.rc, threads, a.isa);
    std::vector<std::vector<std::pair<int64_t, int64_t>>> found(T);
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) rescue_dispatch(a, floor, L * t / T, L * (t + 1) / T, found[t]);
    std::vector<std::pair<int64_t, int64_t>> all;
    size_t n = 0;
    for (auto& f : found) n += f.size();
    all.reserve(n);
    for (auto& f : found) all.insert(all.end(), f.begin(), f.end());
    return all;
}

namespace {
float dot_f32(const float* a, const float* b, int64_t d) {
    float acc[16] = {0.f};
    int64_t j = 0;
    for (; j + 16 <= d; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
    float s = 0.f;
    for (; j < d; ++j) s += a[j] * b[j];
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
}

using F32Dot = float (*)(const float* a, const float* b, int64_t d);
F32Dot f32_dot_for(Isa isa) {
#ifdef HOREN_HAVE_BLOCKS
    if (is_avx512(isa)) return &isa_avx512::dot_f32;
    if (isa == Isa::avx2) return &isa_avx2::dot_f32;
#else
    (void)isa;
#endif
    return &dot_f32;
}
}  // namespace

void pair_dots(const float* keys, int64_t stride, const float* q, int64_t d, const int64_t* rows,
               const int64_t* slots, int64_t n, float* out, int threads, Isa isa) {
    const int T = threads_for_work(n * d, threads, isa);
    const F32Dot dot = f32_dot_for(isa);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = dot(q + rows[i] * d, keys + slots[i] * stride, d);
}

}}  // namespace horen::sketch
