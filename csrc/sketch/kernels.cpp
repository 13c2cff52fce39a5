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
// threads by label range; AVX-512 blocks of 16 rows where the caller picked Isa::avx512, a generic
// loop otherwise.
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
#define HOREN_HAVE_AVX512 1
#define HOREN_AVX512 HOREN_AVX512_FN
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

#ifdef HOREN_HAVE_AVX512
HOREN_AVX512 float dot_bf16_512(const float* q, const uint16_t* row, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
        __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), y, acc);
    }
    float s = _mm512_reduce_add_ps(acc);
    for (; j < n; ++j) s += q[j] * bf16(row[j]);
    return s;
}
#endif

// the full bound of row i for query b: u = q_c . y_c + q_f . y_f + |q_perp| sqrt(e)
template <bool AVX512> inline float full_bound(const Args& a, int64_t b, int64_t i, float sc) {
    const float* q = a.qf + b * a.rf;
    const uint16_t* y = a.rows_f + i * a.rf;
#ifdef HOREN_HAVE_AVX512
    const float sf = AVX512 ? dot_bf16_512(q, y, a.rf) : dot_bf16(q, y, a.rf);
#else
    const float sf = dot_bf16(q, y, a.rf);
#endif
    return sc + sf + a.perp[b] * std::sqrt(a.e[i]);
}

// offer row i (coarse bound uc, tail logit) to query b's near-key heap; false: not taken, the row
// belongs to the tail. A row pushed out of a full heap goes to the tail here.
template <bool AVX512> __attribute__((noinline)) bool offer(const Args& a, int64_t b, int64_t i, float sc, float uc, float logit,
                  std::vector<Entry>& h, Acc& acc) {
    const bool full = static_cast<int64_t>(h.size()) >= a.k2;
    if (full && uc + a.slack <= h.front().u) return false;  // u <= u_c: it cannot get in
    const float u = full_bound<AVX512>(a, b, i, sc);
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
                if (offer<false>(a, b, i, sc, sc + a.perp_c[b] * sec, logit, heaps[b], acc[b])) continue;
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
            if (full_bound<false>(a, b, i, sc) + a.slack > floor[b]) out.emplace_back(b, i);
        }
    }
}

#ifdef HOREN_HAVE_AVX512
// ---- AVX-512: blocks of 16 rows, coarse part of VC * 16 columns -----------------------------
// e^x for 16 lanes (csrc/common/exp_poly.h)
using horen_exp::exp16;

// widen n <= 16 coarse rows (VC * 16 bfloat16 each) to floats dst[16][VC * 16]
template <int VC> HOREN_AVX512 inline void widen_block(const uint16_t* src, float* dst, int n) {
    for (int l = 0; l < n; ++l)
        for (int v = 0; v < VC; ++v) {
            __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (l * VC + v) * 16));
            _mm512_storeu_ps(dst + (l * VC + v) * 16,
                             _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
}

// the 16 scores over columns [V0 * 16, V1 * 16) of a row-major block of rows VC * 16 wide
// (lanes past n are 0)
template <int V0, int V1, int VC> HOREN_AVX512 inline __m512 scores16(const float* q, const float* yb, int n) {
    if constexpr (V1 <= V0) {
        return _mm512_setzero_ps();
    } else {
        __m512 qv[V1 - V0];
        for (int v = V0; v < V1; ++v) qv[v - V0] = _mm512_loadu_ps(q + v * 16);
        alignas(64) float s[16] = {0.f};
        for (int l = 0; l < n; ++l) {
            __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(yb + (l * VC + V0) * 16));
            for (int v = V0 + 1; v < V1; ++v)
                acc = _mm512_fmadd_ps(qv[v - V0], _mm512_loadu_ps(yb + (l * VC + v) * 16), acc);
            s[l] = _mm512_reduce_add_ps(acc);
        }
        return _mm512_load_ps(s);
    }
}

// the first ``cols`` columns of the block transposed: dst[j][l] = src[l][j] (lanes past n are 0),
// so that one query's 16 scores are multiply-adds of 16 lanes with no horizontal sums
template <int VC> HOREN_AVX512 inline void transpose_block(const float* src, float* dst, int n, int cols) {
    if (n < 16) std::memset(dst, 0, sizeof(float) * cols * 16);
    for (int l = 0; l < n; ++l)
        for (int j = 0; j < cols; ++j) dst[j * 16 + l] = src[l * VC * 16 + j];
}

// add the 16 scores over columns [J0, J1) of a transposed block for G queries to acc[G]: each
// transposed column is loaded once for the whole group
template <int J0, int J1, int G> HOREN_AVX512 inline void scores16_g(const float* const* q, const float* yt, __m512* acc) {
    for (int j = J0; j < J1; ++j) {
        const __m512 y = _mm512_load_ps(yt + j * 16);
        for (int k = 0; k < G; ++k) acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(q[k][j]), y, acc[k]);
    }
}

#define HOREN_AVX512BF16 HOREN_AVX512BF16_FN

// the first ``cols`` (even) columns of 16 bfloat16 rows as pairs: dst[j][l] = row l's columns
// 2j, 2j + 1 (one 32-bit word), the operand layout of bfloat16 dot products
inline void transpose_pairs(const uint16_t* rows, int rc, uint32_t* dst, int n, int cols) {
    if (n < 16) std::memset(dst, 0, sizeof(uint32_t) * (cols / 2) * 16);
    for (int l = 0; l < n; ++l) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(rows + l * rc);
        for (int j = 0; j < cols / 2; ++j) dst[j * 16 + l] = w[j];
    }
}

// add the 16 scores over columns [J0, J1) for G queries with bfloat16 dot products (two
// multiply-adds a lane per instruction; the query rounded to bfloat16: error <= 2^-9 |q| |y|)
template <int J0, int J1, int G> HOREN_AVX512BF16 __attribute__((noinline))
void scores16_bf(const uint32_t* const* q, const uint32_t* ytp, __m512* acc) {
    for (int j = J0 / 2; j < J1 / 2; ++j) {
        const __m512bh y = reinterpret_cast<__m512bh>(_mm512_load_si512(ytp + j * 16));
        for (int k = 0; k < G; ++k)
            acc[k] = _mm512_dpbf16_ps(acc[k], reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(q[k][j]))), y);
    }
}

inline uint32_t bf16_bits(float f) { return float_to_bf16_bits(f); }

constexpr int64_t TRANSPOSE_FROM = 8;  // queries per pass from which the transposed block pays off

// a block's coarse rows widened to floats (yb) and, for many queries, its first ``cols`` columns
// transposed: as bfloat16 pairs (ytp) for the bfloat16 products, else as floats (yt)
template <int VC> HOREN_AVX512 inline void load_block(const Args& a, int64_t i0, int n, bool many, bool pairs,
                                                      int cols, float* yb, float* yt, uint32_t* ytp) {
    const uint16_t* rows = a.rows_c + i0 * VC * 16;
    widen_block<VC>(rows, yb, n);
    if (!many) return;
    if (pairs) transpose_pairs(rows, VC * 16, ytp, n, cols);
    else transpose_block<VC>(yb, yt, n, cols);
}

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

// one block of 16 rows for G queries b0 .. b0 + G - 1: scores (tail columns, and the rest of the
// coarse columns when near keys are wanted), near-key offers, weights, and the weighted rows
// (each row of the block loaded once for the group)
template <int VT, int VC, int G> HOREN_AVX512 inline void scan_group(
        const Args& a, int64_t b0, int64_t i0, int n, uint32_t alive, bool many, const float* yb,
        const float* yt, const uint32_t* ytp, __m512 et, __m512 sec, std::vector<int64_t>& ptr, std::vector<Acc>& acc,
        std::vector<std::vector<Entry>>& heaps, std::vector<float>& lanes_z, std::vector<float>& lanes_v) {
    constexpr int RC = VC * 16;
    alignas(64) float sc_l[16], uc[16], lg[16], w[G][16];
    __m512 st[G], sc[G];
    uint32_t m[G], any = 0;
    for (int k = 0; k < G; ++k) any |= m[k] = lanes(a, a.excl + (b0 + k) * a.K, ptr[b0 + k], i0, n, alive);
    if (!any) return;
    const bool near = a.k2 > 0;
    if (many && a.qpair && !near) {
        const uint32_t* qs[G];
        for (int k = 0; k < G; ++k) {
            qs[k] = a.qpair + (b0 + k) * (RC / 2);
            st[k] = _mm512_setzero_ps();
        }
        scores16_bf<0, VT * 16, G>(qs, ytp, st);
    } else if (many) {
        const float* qs[G];
        for (int k = 0; k < G; ++k) {
            qs[k] = a.qc + (b0 + k) * RC;
            st[k] = _mm512_setzero_ps();
        }
        scores16_g<0, VT * 16, G>(qs, yt, st);
        if (near) {
            for (int k = 0; k < G; ++k) sc[k] = st[k];
            scores16_g<VT * 16, RC, G>(qs, yt, sc);
        }
    } else {
        for (int k = 0; k < G; ++k) {
            const float* q = a.qc + (b0 + k) * RC;
            st[k] = scores16<0, VT, VC>(q, yb, n);
            if (near) sc[k] = _mm512_add_ps(st[k], scores16<VT, VC, VC>(q, yb, n));
        }
    }
    for (int k = 0; k < G; ++k) {
        const int64_t b = b0 + k;
        const __m512 logit = _mm512_fmadd_ps(_mm512_set1_ps(a.beta), st[k], _mm512_mul_ps(_mm512_set1_ps(a.cvar[b]), et));
        Acc& ac = acc[b];
        if (m[k] && near) {  // rows whose coarse bound reaches the heap: one at a time, in label order
            auto& h = heaps[b];
            const __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(a.perp_c[b]), sec, sc[k]);
            const float floor = static_cast<int64_t>(h.size()) < a.k2 ? NEG_INF : h.front().u - a.slack;
            uint32_t hit = m[k] & _mm512_cmp_ps_mask(u, _mm512_set1_ps(floor), _CMP_GT_OQ);
            if (hit) {
                _mm512_store_ps(sc_l, sc[k]);
                _mm512_store_ps(uc, u);
                _mm512_store_ps(lg, logit);
                for (int l = 0; l < n; ++l)
                    if ((hit >> l & 1u) && offer<true>(a, b, i0 + l, sc_l[l], uc[l], lg[l], h, ac)) m[k] &= ~(1u << l);
            }
        }
        const __m512 wk = _mm512_maskz_mov_ps(static_cast<__mmask16>(m[k]),
                                             exp16(_mm512_sub_ps(logit, _mm512_set1_ps(ac.max))));
        float* lz = lanes_z.data() + b * 16;
        float* lv = lanes_v.data() + b * 16;
        _mm512_storeu_ps(lz, _mm512_add_ps(_mm512_loadu_ps(lz), wk));
        _mm512_storeu_ps(lv, _mm512_fmadd_ps(wk, et, _mm512_loadu_ps(lv)));
        _mm512_store_ps(w[k], wk);
    }
    any = 0;
    for (int k = 0; k < G; ++k) any |= m[k];
    __m512 ay[G][VT];
    for (int k = 0; k < G; ++k)
        for (int v = 0; v < VT; ++v) ay[k][v] = _mm512_loadu_ps(acc[b0 + k].y.data() + v * 16);
    for (uint32_t bits = any; bits; bits &= bits - 1) {
        const int l = __builtin_ctz(bits);
        __m512 y[VT];
        for (int v = 0; v < VT; ++v) y[v] = _mm512_loadu_ps(yb + (l * VC + v) * 16);
        for (int k = 0; k < G; ++k) {
            const __m512 wl = _mm512_set1_ps(w[k][l]);
            for (int v = 0; v < VT; ++v) ay[k][v] = _mm512_fmadd_ps(wl, y[v], ay[k][v]);
        }
    }
    for (int k = 0; k < G; ++k)
        for (int v = 0; v < VT; ++v) _mm512_storeu_ps(acc[b0 + k].y.data() + v * 16, ay[k][v]);
}

// Every query's weights are taken relative to a fixed shift, the largest logit possible
// (acc[b].max = beta + cvar[b], see fixed_shift), so no running maximum and no rescaling: the
// weight sum and weighted energy add up lane by lane, and nothing underflows (logits >= -beta).
template <int VT, int VC> HOREN_AVX512
void scan_range512(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc,
                   std::vector<std::vector<Entry>>& heaps) {
    constexpr int RC = VC * 16;
    alignas(64) float yb[16 * RC], yt[16 * RC];
    alignas(64) uint32_t ytp[8 * RC];
    std::vector<int64_t> ptr = start_pointers(a, lo);
    std::vector<float> lanes_z(a.B * 16, 0.f), lanes_v(a.B * 16, 0.f);
    const bool many = a.B >= TRANSPOSE_FROM;
    for (int64_t i0 = lo; i0 < hi; i0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, hi - i0));
        const uint32_t alive = alive_lanes(a, i0, n);
        if (!alive) continue;
        load_block<VC>(a, i0, n, many, a.qpair && a.k2 == 0, a.k2 > 0 ? RC : VT * 16, yb, yt, ytp);
        if (many) {  // many queries: most of this block's fine rows will be read; fetch the next block's
            const int64_t next = std::min<int64_t>(i0 + 16, hi), rows = std::min<int64_t>(16, hi - next);
            const char* at = reinterpret_cast<const char*>(a.rows_f + next * a.rf);
            for (int64_t off = 0; off < rows * a.rf * 2; off += 64) _mm_prefetch(at + off, _MM_HINT_T0);
        }
        const __mmask16 full = static_cast<__mmask16>((1u << n) - 1u);
        const __m512 et = _mm512_maskz_loadu_ps(full, a.e_t + i0);
        const __m512 sec = _mm512_sqrt_ps(_mm512_maskz_loadu_ps(full, a.e_c + i0));
        for (int64_t b0 = 0; b0 < a.B; b0 += 4) {  // queries in groups of up to 4
            switch (std::min<int64_t>(4, a.B - b0)) {
                case 4: scan_group<VT, VC, 4>(a, b0, i0, n, alive, many, yb, yt, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v); break;
                case 3: scan_group<VT, VC, 3>(a, b0, i0, n, alive, many, yb, yt, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v); break;
                case 2: scan_group<VT, VC, 2>(a, b0, i0, n, alive, many, yb, yt, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v); break;
                default: scan_group<VT, VC, 1>(a, b0, i0, n, alive, many, yb, yt, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v);
            }
        }
    }
    for (int64_t b = 0; b < a.B; ++b) {
        acc[b].z += _mm512_reduce_add_ps(_mm512_loadu_ps(lanes_z.data() + b * 16));
        acc[b].v += _mm512_reduce_add_ps(_mm512_loadu_ps(lanes_v.data() + b * 16));
    }
}

// one block of 16 rows for G queries: bounds from the first rt columns (the screen: rescue's Args
// carry the screen's width, energies and |q outside| in the tail's fields), then (for a query with
// a lane that passes) from the coarse part, then (where that passes) the full bound
template <int VT, int VC, int G> HOREN_AVX512 inline void rescue_group(
        const Args& a, const float* floor, int64_t b0, int64_t i0, int n, uint32_t alive, bool many,
        const float* yb, const float* yt, const uint32_t* ytp, __m512 set, __m512 sec, std::vector<int64_t>& ptr,
        std::vector<std::pair<int64_t, int64_t>>& out) {
    constexpr int RC = VC * 16;
    alignas(64) float sc_l[16];
    __m512 st[G], sc[G];
    uint32_t m[G], hit[G], any = 0;
    for (int k = 0; k < G; ++k) any |= m[k] = lanes(a, a.excl + (b0 + k) * a.K, ptr[b0 + k], i0, n, alive);
    if (!any) return;
    const float* qs[G];
    for (int k = 0; k < G; ++k) {
        qs[k] = a.qc + (b0 + k) * RC;
        st[k] = _mm512_setzero_ps();
    }
    if (many && a.qpair) {
        const uint32_t* qp[G];
        for (int k = 0; k < G; ++k) qp[k] = a.qpair + (b0 + k) * (RC / 2);
        scores16_bf<0, VT * 16, G>(qp, ytp, st);
    } else if (many) {
        scores16_g<0, VT * 16, G>(qs, yt, st);
    } else {
        for (int k = 0; k < G; ++k) st[k] = scores16<0, VT, VC>(qs[k], yb, n);
    }
    any = 0;
    for (int k = 0; k < G; ++k) {
        const __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(a.perp_t[b0 + k]), set, st[k]);
        any |= hit[k] = m[k] & _mm512_cmp_ps_mask(_mm512_add_ps(u, _mm512_set1_ps(a.slack)),
                                                  _mm512_set1_ps(floor[b0 + k]), _CMP_GT_OQ);
    }
    if (!any) return;
    for (int k = 0; k < G; ++k) {  // the rest of the coarse part, only for queries with a hit
        sc[k] = st[k];
        if (!hit[k]) continue;
        sc[k] = _mm512_add_ps(st[k], scores16<VT, VC, VC>(qs[k], yb, n));
    }
    for (int k = 0; k < G; ++k) {
        if (!hit[k]) continue;
        const int64_t b = b0 + k;
        const __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(a.perp_c[b]), sec, sc[k]);
        const uint32_t h = hit[k] & _mm512_cmp_ps_mask(_mm512_add_ps(u, _mm512_set1_ps(a.slack)),
                                                      _mm512_set1_ps(floor[b]), _CMP_GT_OQ);
        if (!h) continue;
        _mm512_store_ps(sc_l, sc[k]);
        for (int l = 0; l < n; ++l)
            if ((h >> l & 1u) && full_bound<true>(a, b, i0 + l, sc_l[l]) + a.slack > floor[b])
                out.emplace_back(b, i0 + l);
    }
}

template <int VT, int VC> HOREN_AVX512
void rescue_range512(const Args& a, const float* floor, int64_t lo, int64_t hi,
                     std::vector<std::pair<int64_t, int64_t>>& out) {
    constexpr int RC = VC * 16;
    alignas(64) float yb[16 * RC], yt[16 * RC];
    alignas(64) uint32_t ytp[8 * RC];
    std::vector<int64_t> ptr = start_pointers(a, lo);
    const bool many = a.B >= TRANSPOSE_FROM;
    for (int64_t i0 = lo; i0 < hi; i0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, hi - i0));
        const uint32_t alive = alive_lanes(a, i0, n);
        if (!alive) continue;
        load_block<VC>(a, i0, n, many, a.qpair != nullptr, VT * 16, yb, yt, ytp);  // the screen's columns
        const __mmask16 full = static_cast<__mmask16>((1u << n) - 1u);
        const __m512 set = _mm512_sqrt_ps(_mm512_maskz_loadu_ps(full, a.e_t + i0));
        const __m512 sec = _mm512_sqrt_ps(_mm512_maskz_loadu_ps(full, a.e_c + i0));
        for (int64_t b0 = 0; b0 < a.B; b0 += 4) {  // queries in groups of up to 4
            switch (std::min<int64_t>(4, a.B - b0)) {
                case 4: rescue_group<VT, VC, 4>(a, floor, b0, i0, n, alive, many, yb, yt, ytp, set, sec, ptr, out); break;
                case 3: rescue_group<VT, VC, 3>(a, floor, b0, i0, n, alive, many, yb, yt, ytp, set, sec, ptr, out); break;
                case 2: rescue_group<VT, VC, 2>(a, floor, b0, i0, n, alive, many, yb, yt, ytp, set, sec, ptr, out); break;
                default: rescue_group<VT, VC, 1>(a, floor, b0, i0, n, alive, many, yb, yt, ytp, set, sec, ptr, out);
            }
        }
    }
}

#endif

// the hand-vectorized blocks: only where the caller picked AVX-512 (which it checked this CPU has)
bool use_avx512(const Args& a) { return is_avx512(a.isa); }

// beta + cvar bounds every logit (scores and energies are at most 1); usable as a fixed shift of
// the weights while the smallest logit, -beta, stays far from float underflow after it
bool fixed_shift(const Args& a) {
    float top = 0.f;
    for (int64_t b = 0; b < a.B; ++b) top = std::max(top, a.cvar[b]);
    return 2.f * a.beta + top < 80.f;
}

#ifdef HOREN_HAVE_AVX512
bool use_bf16(const Args& a) {  // bfloat16 dot products for many queries, where the CPU has them
    return use_avx512(a) && cpu_has_avx512bf16();
}
#endif

// the coarse queries as bfloat16 pairs, when the bfloat16 dot products will run (many queries)
std::vector<uint32_t> query_pairs(const Args& a) {
    std::vector<uint32_t> out;
#ifdef HOREN_HAVE_AVX512
    if (!use_bf16(a) || a.B < TRANSPOSE_FROM || a.rc % 16 != 0) return out;
    out.resize(a.B * a.rc / 2);
    for (int64_t b = 0; b < a.B; ++b)
        for (int64_t j = 0; j < a.rc / 2; ++j) {
            const float* q = a.qc + b * a.rc + 2 * j;
            out[b * a.rc / 2 + j] = bf16_bits(q[0]) | bf16_bits(q[1]) << 16;
        }
#endif
    return out;
}

#ifdef HOREN_HAVE_AVX512
// f(VT, VC) with the (tail, coarse) widths in 16-column vectors as std::integral_constant, for
// the widths with an AVX-512 specialization; false (nothing called) for the others
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
#endif

void scan_dispatch(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc,
                   std::vector<std::vector<Entry>>& heaps) {
#ifdef HOREN_HAVE_AVX512
    if (use_avx512(a) && fixed_shift(a) && with_widths(a.rc, a.rt, [&](auto vt, auto vc) {
            scan_range512<decltype(vt)::value, decltype(vc)::value>(a, lo, hi, acc, heaps);
        }))
        return;
#endif
    scan_range(a, lo, hi, acc, heaps);
}

void rescue_dispatch(const Args& a, const float* floor, int64_t lo, int64_t hi,
                     std::vector<std::pair<int64_t, int64_t>>& out) {
#ifdef HOREN_HAVE_AVX512
    if (use_avx512(a) && with_widths(a.rc, a.rt, [&](auto vt, auto vc) {
            rescue_range512<decltype(vt)::value, decltype(vc)::value>(a, floor, lo, hi, out);
        }))
        return;
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
#ifdef HOREN_HAVE_AVX512
HOREN_AVX512 float dot_f32_512(const float* a, const float* b, int64_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= d; j += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), _mm512_loadu_ps(b + j + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 32), _mm512_loadu_ps(b + j + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 48), _mm512_loadu_ps(b + j + 48), s3);
    }
    for (; j + 16 <= d; j += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    for (; j < d; ++j) s += a[j] * b[j];
    return s;
}
#endif

float dot_f32(const float* a, const float* b, int64_t d, bool avx512) {
#ifdef HOREN_HAVE_AVX512
    if (avx512) return dot_f32_512(a, b, d);
#else
    (void)avx512;
#endif
    float acc[16] = {0.f};
    int64_t j = 0;
    for (; j + 16 <= d; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
    float s = 0.f;
    for (; j < d; ++j) s += a[j] * b[j];
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
}
}  // namespace

void pair_dots(const float* keys, int64_t stride, const float* q, int64_t d, const int64_t* rows,
               const int64_t* slots, int64_t n, float* out, int threads, Isa isa) {
    const int T = threads_for_work(n * d, threads, isa);
    const bool avx512 = is_avx512(isa);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = dot_f32(q + rows[i] * d, keys + slots[i] * stride, d, avx512);
}

}}  // namespace horen::sketch
