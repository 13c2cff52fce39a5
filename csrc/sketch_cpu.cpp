// The key sketch's scan on the CPU (horen_fast/sketch.py, KeySketch.scan and .rescue): one pass
// over bfloat16 sketch rows [L, r] for B queries, fused (scores, bounds, the online softmax of the
// tail, the weighted row sum and each query's top-k bounds), split over OpenMP threads by label
// range. The torch code in sketch.py is the reference it is tested against.
//
// Built as horen_fast._sketch. Tensors arrive as raw pointers (horen_fast/sketch.py checks dtypes,
// shapes and contiguity). Inner loops are plain C++ that the compiler vectorizes; target_clones
// gives AVX-512, AVX2 and baseline versions, picked at load time.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOREN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOREN_CLONES
#endif

namespace py = pybind11;

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Entry {   // a heap entry: a label's bound, its logit, the label
    float u;
    float logit;
    int64_t label;
};
inline bool heap_less(const Entry& a, const Entry& b) { return a.u > b.u; }  // min-heap by u

struct Acc {     // one query's tail: max logit, sum of weights, weighted rows, weighted energies
    float max = NEG_INF;
    double z = 0.0;
    double v = 0.0;
    std::vector<float> y;
};

inline float bf16(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// R > 0: the row width known at compile time (no loop peeling; the common widths), 0: r at run time
template <int R> inline void widen(const uint16_t* src, float* dst, int64_t r) {
    const int64_t n = R ? R : r;
    for (int64_t j = 0; j < n; ++j) dst[j] = bf16(src[j]);
}

template <int R> inline float dot(const float* a, const float* b, int64_t r) {
    // 32 partial sums: independent vector accumulators, not one chain of dependent multiply-adds
    const int64_t n = R ? R : r;
    float acc[32] = {0.f};
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
#pragma omp simd
        for (int l = 0; l < 32; ++l) acc[l] += a[j + l] * b[j + l];
    }
    float s = 0.f;
    for (; j < n; ++j) s += a[j] * b[j];
#pragma omp simd reduction(+ : s)
    for (int l = 0; l < 32; ++l) s += acc[l];
    return s;
}

// add weight w of a row (logit, widened row y, energy e) to a query's tail
template <int R> inline void absorb(Acc& a, float logit, const float* y, float e, int64_t r) {
    if (R) r = R;
    if (logit == NEG_INF) return;
    if (logit > a.max) {  // rescale what came before to the new maximum
        float keep = a.max == NEG_INF ? 0.f : std::exp(a.max - logit);
        a.z *= keep;
        a.v *= keep;
        float* ay = a.y.data();
#pragma omp simd
        for (int64_t j = 0; j < r; ++j) ay[j] *= keep;
        a.max = logit;
    }
    float w = std::exp(logit - a.max);
    a.z += w;
    a.v += static_cast<double>(w) * e;
    float* ay = a.y.data();
#pragma omp simd
    for (int64_t j = 0; j < r; ++j) ay[j] += w * y[j];
}

struct Args {
    const float* qp;        // [B, r]
    const float* perp;      // [B] ||q_perp||
    const float* cvar;      // [B] 0.5 beta^2 ||q_perp||^2 / (d - r): multiplies a row's energy
    const uint16_t* rows;   // [L, r] bfloat16
    const float* energy;    // [L]
    const uint8_t* alive;   // [L]
    const int64_t* excl;    // [B, K] ascending per row, padded with values >= L
    int64_t B, r, L, K, k2;
    float beta;
};

// labels [lo, hi) for every query: tails into acc[b], bounds into heaps[b]
template <int R> HOREN_CLONES
void scan_range(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc,
                std::vector<std::vector<Entry>>& heaps) {
    const int64_t B = a.B, r = a.r;
    std::vector<float> y(r), yo(r);
    std::vector<int64_t> ptr(B);
    for (int64_t b = 0; b < B; ++b)
        ptr[b] = std::lower_bound(a.excl + b * a.K, a.excl + (b + 1) * a.K, lo) - (a.excl + b * a.K);
    for (int64_t i = lo; i < hi; ++i) {
        if (!a.alive[i]) continue;
        widen<R>(a.rows + i * r, y.data(), r);
        const float e = a.energy[i], se = std::sqrt(e);
        for (int64_t b = 0; b < B; ++b) {
            const int64_t* ex = a.excl + b * a.K;
            int64_t& p = ptr[b];
            while (p < a.K && ex[p] < i) ++p;
            if (p < a.K && ex[p] == i) continue;  // this row's own candidate: not in the tail
            const float sc = dot<R>(a.qp + b * r, y.data(), r);
            const float logit = a.beta * sc + a.cvar[b] * e;
            if (a.k2 > 0) {
                const float u = sc + a.perp[b] * se;
                auto& h = heaps[b];
                if (static_cast<int64_t>(h.size()) < a.k2) {
                    h.push_back({u, logit, i});
                    std::push_heap(h.begin(), h.end(), heap_less);
                    continue;
                }
                if (u > h.front().u) {  // i joins the near keys; the weakest one goes to the tail
                    Entry out = h.front();
                    std::pop_heap(h.begin(), h.end(), heap_less);
                    h.back() = {u, logit, i};
                    std::push_heap(h.begin(), h.end(), heap_less);
                    widen<R>(a.rows + out.label * r, yo.data(), r);
                    absorb<R>(acc[b], out.logit, yo.data(), a.energy[out.label], r);
                    continue;
                }
            }
            absorb<R>(acc[b], logit, y.data(), e, r);
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HOREN_HAVE_AVX512 1
#define HOREN_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

// e^x for 16 lanes: x = n ln2 + t, |t| <= ln2/2, a degree-7 polynomial for e^t (Cephes expf
// coefficients, relative error about 2e-7); -inf gives 0.
HOREN_AVX512 inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 t = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    t = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), t);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, t), t, _mm512_add_ps(t, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// widen 16 bfloat16 rows [n <= 16 of them] of V * 16 values into dst[16][V * 16] floats
template <int V> HOREN_AVX512 inline void widen_block(const uint16_t* src, float* dst, int n) {
    for (int l = 0; l < n; ++l)
        for (int v = 0; v < V; ++v) {
            __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + l * V * 16 + v * 16));
            __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
            _mm512_storeu_ps(dst + l * V * 16 + v * 16, _mm512_castsi512_ps(w));
        }
}

// the 16 scores q . y_l of a block (lanes past n are 0)
template <int V> HOREN_AVX512 inline __m512 scores16(const float* q, const float* yb, int n) {
    __m512 qv[V];
    for (int v = 0; v < V; ++v) qv[v] = _mm512_loadu_ps(q + v * 16);
    alignas(64) float s[16] = {0.f};
    for (int l = 0; l < n; ++l) {
        const float* y = yb + l * V * 16;
        __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(y));
        __m512 a1 = V > 1 ? _mm512_mul_ps(qv[1], _mm512_loadu_ps(y + 16)) : _mm512_setzero_ps();
        for (int v = 2; v < V; v += 2) {
            a0 = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(y + v * 16), a0);
            if (v + 1 < V) a1 = _mm512_fmadd_ps(qv[v + 1], _mm512_loadu_ps(y + (v + 1) * 16), a1);
        }
        s[l] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    return _mm512_load_ps(s);
}

// lanes of the block [i0, i0 + n) that are alive and not excluded for this query (ptr advances)
inline uint32_t lanes(const Args& a, const int64_t* ex, int64_t& p, int64_t i0, int n, uint32_t alive) {
    while (p < a.K && ex[p] < i0) ++p;
    uint32_t m = alive;
    while (p < a.K && ex[p] < i0 + n) m &= ~(1u << (ex[p++] - i0));
    return m;
}

template <int V> HOREN_AVX512
void scan_range512(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc,
                   std::vector<std::vector<Entry>>& heaps) {
    constexpr int R = V * 16;
    const int64_t B = a.B;
    alignas(64) float yb[16 * R], yo[R], lg[16], uu[16], ww[16];
    std::vector<int64_t> ptr(B);
    for (int64_t b = 0; b < B; ++b)
        ptr[b] = std::lower_bound(a.excl + b * a.K, a.excl + (b + 1) * a.K, lo) - (a.excl + b * a.K);
    const __m512 ninf = _mm512_set1_ps(NEG_INF);
    for (int64_t i0 = lo; i0 < hi; i0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, hi - i0));
        uint32_t alive = 0;
        for (int l = 0; l < n; ++l) alive |= (a.alive[i0 + l] ? 1u : 0u) << l;
        if (!alive) continue;
        widen_block<V>(a.rows + i0 * R, yb, n);
        const __mmask16 full = static_cast<__mmask16>((1u << n) - 1u);
        const __m512 e = _mm512_maskz_loadu_ps(full, a.energy + i0);
        const __m512 se = _mm512_sqrt_ps(e);
        for (int64_t b = 0; b < B; ++b) {
            uint32_t m = lanes(a, a.excl + b * a.K, ptr[b], i0, n, alive);
            if (!m) continue;
            const __m512 s = scores16<V>(a.qp + b * R, yb, n);
            __m512 logit = _mm512_fmadd_ps(_mm512_set1_ps(a.beta), s, _mm512_mul_ps(_mm512_set1_ps(a.cvar[b]), e));
            logit = _mm512_mask_blend_ps(static_cast<__mmask16>(m), ninf, logit);
            Acc& ac = acc[b];
            if (a.k2 > 0) {
                auto& h = heaps[b];
                const __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(a.perp[b]), se, s);
                const float floor = static_cast<int64_t>(h.size()) < a.k2 ? NEG_INF : h.front().u;
                uint32_t hit = m & _mm512_cmp_ps_mask(u, _mm512_set1_ps(floor), _CMP_GT_OQ);
                if (hit) {  // rows that may join the near keys: one at a time, in label order
                    _mm512_store_ps(uu, u);
                    _mm512_store_ps(lg, logit);
                    for (int l = 0; l < n; ++l) {
                        if (!(hit >> l & 1u)) continue;
                        if (static_cast<int64_t>(h.size()) < a.k2) {
                            h.push_back({uu[l], lg[l], i0 + l});
                            std::push_heap(h.begin(), h.end(), heap_less);
                        } else if (uu[l] > h.front().u) {
                            Entry out = h.front();
                            std::pop_heap(h.begin(), h.end(), heap_less);
                            h.back() = {uu[l], lg[l], i0 + l};
                            std::push_heap(h.begin(), h.end(), heap_less);
                            if (out.label >= i0) {  // from this block: still widened in yb
                                absorb<R>(ac, out.logit, yb + (out.label - i0) * R, a.energy[out.label], R);
                            } else {
                                widen<R>(a.rows + out.label * R, yo, R);
                                absorb<R>(ac, out.logit, yo, a.energy[out.label], R);
                            }
                        } else {
                            continue;  // lost to a row before it in this block: tail below
                        }
                        logit = _mm512_mask_blend_ps(static_cast<__mmask16>(1u << l), logit, ninf);
                    }
                }
            }
            const float top = _mm512_reduce_max_ps(logit);
            if (top == NEG_INF) continue;
            if (top > ac.max) {  // rescale what came before to the new maximum
                const float keep = ac.max == NEG_INF ? 0.f : std::exp(ac.max - top);
                ac.z *= keep;
                ac.v *= keep;
                for (int v = 0; v < V; ++v)
                    _mm512_storeu_ps(ac.y.data() + v * 16,
                                     _mm512_mul_ps(_mm512_set1_ps(keep), _mm512_loadu_ps(ac.y.data() + v * 16)));
                ac.max = top;
            }
            const __m512 w = exp16(_mm512_sub_ps(logit, _mm512_set1_ps(ac.max)));
            ac.z += _mm512_reduce_add_ps(w);
            ac.v += _mm512_reduce_add_ps(_mm512_mul_ps(w, e));
            _mm512_store_ps(ww, w);
            __m512 ay[V];
            for (int v = 0; v < V; ++v) ay[v] = _mm512_loadu_ps(ac.y.data() + v * 16);
            for (int l = 0; l < n; ++l) {
                if (ww[l] == 0.f) continue;
                const __m512 wl = _mm512_set1_ps(ww[l]);
                for (int v = 0; v < V; ++v) ay[v] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(yb + l * R + v * 16), ay[v]);
            }
            for (int v = 0; v < V; ++v) _mm512_storeu_ps(ac.y.data() + v * 16, ay[v]);
        }
    }
}

template <int V> HOREN_AVX512
void rescue_range512(const Args& a, const float* floor, float slack, int64_t lo, int64_t hi,
                     std::vector<std::pair<int64_t, int64_t>>& out) {
    constexpr int R = V * 16;
    alignas(64) float yb[16 * R];
    std::vector<int64_t> ptr(a.B);
    for (int64_t b = 0; b < a.B; ++b)
        ptr[b] = std::lower_bound(a.excl + b * a.K, a.excl + (b + 1) * a.K, lo) - (a.excl + b * a.K);
    for (int64_t i0 = lo; i0 < hi; i0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, hi - i0));
        uint32_t alive = 0;
        for (int l = 0; l < n; ++l) alive |= (a.alive[i0 + l] ? 1u : 0u) << l;
        if (!alive) continue;
        widen_block<V>(a.rows + i0 * R, yb, n);
        const __m512 se = _mm512_sqrt_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), a.energy + i0));
        for (int64_t b = 0; b < a.B; ++b) {
            uint32_t m = lanes(a, a.excl + b * a.K, ptr[b], i0, n, alive);
            if (!m) continue;
            __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(a.perp[b]), se, scores16<V>(a.qp + b * R, yb, n));
            uint32_t hit = m & _mm512_cmp_ps_mask(_mm512_add_ps(u, _mm512_set1_ps(slack)),
                                                 _mm512_set1_ps(floor[b]), _CMP_GT_OQ);
            for (int l = 0; l < n; ++l)
                if (hit >> l & 1u) out.emplace_back(b, i0 + l);
        }
    }
}
#endif

void merge(Acc& into, const Acc& from, int64_t r) {
    if (from.max == NEG_INF) return;
    if (into.max == NEG_INF) { into = from; return; }
    float m = std::max(into.max, from.max);
    float ki = std::exp(into.max - m), kf = std::exp(from.max - m);
    into.z = into.z * ki + from.z * kf;
    into.v = into.v * ki + from.v * kf;
    for (int64_t j = 0; j < r; ++j) into.y[j] = into.y[j] * ki + from.y[j] * kf;
    into.max = m;
}

int pick_threads(int64_t work, int requested) {
    int t = requested > 0 ? requested : 1;
#ifdef _OPENMP
    if (requested <= 0) t = omp_get_max_threads();
#endif
    // a thread per ~4M multiply-adds at least: below that starting threads costs more than it saves
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, work / (1 << 22))));
}

}  // namespace

#ifdef HOREN_HAVE_AVX512
// the hand-vectorized blocks, unless this CPU lacks AVX-512 or HOREN_FAST_CPU_ISA asks otherwise
bool use_avx512() {
    static const bool ok = [] {
        const char* isa = std::getenv("HOREN_FAST_CPU_ISA");
        bool allowed = isa == nullptr || !*isa || std::strcmp(isa, "auto") == 0 || std::strcmp(isa, "avx512") == 0;
        return allowed && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }();
    return ok;
}
#endif

// Fills out_max [B], out_z [B], out_y [B, r], out_v [B] (the tail: weights relative to
// exp(out_max)), near [B, k2] (labels, -1 padding) and near_u [B, k2] (their bounds, descending).
void sketch_scan(uintptr_t qp, uintptr_t perp, uintptr_t cvar, uintptr_t rows, uintptr_t energy,
                 uintptr_t alive, uintptr_t excl, int64_t B, int64_t r, int64_t L, int64_t K,
                 int64_t k2, float beta, int threads, uintptr_t out_max, uintptr_t out_z,
                 uintptr_t out_y, uintptr_t out_v, uintptr_t near, uintptr_t near_u) {
    Args a{reinterpret_cast<const float*>(qp), reinterpret_cast<const float*>(perp),
           reinterpret_cast<const float*>(cvar), reinterpret_cast<const uint16_t*>(rows),
           reinterpret_cast<const float*>(energy), reinterpret_cast<const uint8_t*>(alive),
           reinterpret_cast<const int64_t*>(excl), B, r, L, K, k2, beta};
    const int T = pick_threads(B * L * r, threads);
    std::vector<std::vector<Acc>> acc(T, std::vector<Acc>(B));
    std::vector<std::vector<std::vector<Entry>>> heaps(T, std::vector<std::vector<Entry>>(B));
    for (auto& per : acc)
        for (auto& q : per) q.y.assign(r, 0.f);
    {
        py::gil_scoped_release release;
#pragma omp parallel for num_threads(T) schedule(static, 1)
        for (int t = 0; t < T; ++t) {
            int64_t lo = L * t / T, hi = L * (t + 1) / T;
#ifdef HOREN_HAVE_AVX512
            if (use_avx512()) {
                switch (r) {
                    case 32: scan_range512<2>(a, lo, hi, acc[t], heaps[t]); continue;
                    case 64: scan_range512<4>(a, lo, hi, acc[t], heaps[t]); continue;
                    case 128: scan_range512<8>(a, lo, hi, acc[t], heaps[t]); continue;
                    case 256: scan_range512<16>(a, lo, hi, acc[t], heaps[t]); continue;
                    default: break;
                }
            }
#endif
            switch (r) {  // the widths worth a specialization; others run the generic loop
                case 32: scan_range<32>(a, lo, hi, acc[t], heaps[t]); break;
                case 64: scan_range<64>(a, lo, hi, acc[t], heaps[t]); break;
                case 128: scan_range<128>(a, lo, hi, acc[t], heaps[t]); break;
                case 256: scan_range<256>(a, lo, hi, acc[t], heaps[t]); break;
                default: scan_range<0>(a, lo, hi, acc[t], heaps[t]);
            }
        }
        std::vector<float> y(r);
        for (int64_t b = 0; b < B; ++b) {
            Acc& total = acc[0][b];
            std::vector<Entry> pool;
            for (int t = 0; t < T; ++t) {
                if (t) merge(total, acc[t][b], r);
                pool.insert(pool.end(), heaps[t][b].begin(), heaps[t][b].end());
            }
            std::sort(pool.begin(), pool.end(), [](const Entry& x, const Entry& y2) {
                return x.u != y2.u ? x.u > y2.u : x.label < y2.label;
            });
            for (size_t j = static_cast<size_t>(k2); j < pool.size(); ++j) {  // the rest: tail
                widen<0>(a.rows + pool[j].label * r, y.data(), r);
                absorb<0>(total, pool[j].logit, y.data(), a.energy[pool[j].label], r);
            }
            reinterpret_cast<float*>(out_max)[b] = total.max;
            reinterpret_cast<float*>(out_z)[b] = static_cast<float>(total.z);
            reinterpret_cast<float*>(out_v)[b] = static_cast<float>(total.v);
            std::memcpy(reinterpret_cast<float*>(out_y) + b * r, total.y.data(), r * sizeof(float));
            for (int64_t j = 0; j < k2; ++j) {
                bool has = j < static_cast<int64_t>(pool.size());
                reinterpret_cast<int64_t*>(near)[b * k2 + j] = has ? pool[j].label : -1;
                reinterpret_cast<float*>(near_u)[b * k2 + j] = has ? pool[j].u : NEG_INF;
            }
        }
    }
}

namespace {
template <int R> HOREN_CLONES
void rescue_range(const Args& a, const float* floor, float slack, int64_t lo, int64_t hi,
                  std::vector<std::pair<int64_t, int64_t>>& out) {
    const int64_t B = a.B, r = a.r;
    std::vector<float> y(r);
    std::vector<int64_t> ptr(B);
    for (int64_t b = 0; b < B; ++b)
        ptr[b] = std::lower_bound(a.excl + b * a.K, a.excl + (b + 1) * a.K, lo) - (a.excl + b * a.K);
    for (int64_t i = lo; i < hi; ++i) {
        if (!a.alive[i]) continue;
        widen<R>(a.rows + i * r, y.data(), r);
        const float se = std::sqrt(a.energy[i]);
        for (int64_t b = 0; b < B; ++b) {
            const int64_t* ex = a.excl + b * a.K;
            int64_t& p = ptr[b];
            while (p < a.K && ex[p] < i) ++p;
            if (p < a.K && ex[p] == i) continue;
            if (dot<R>(a.qp + b * r, y.data(), r) + a.perp[b] * se + slack > floor[b]) out.emplace_back(b, i);
        }
    }
}
}  // namespace

// (rows, labels): the pairs whose bound u + slack exceeds floor[row], as two int64 arrays.
py::tuple sketch_rescue(uintptr_t qp, uintptr_t perp, uintptr_t rows, uintptr_t energy, uintptr_t alive,
                       uintptr_t excl, uintptr_t floor, int64_t B, int64_t r, int64_t L, int64_t K,
                       float slack, int threads) {
    Args a{reinterpret_cast<const float*>(qp), reinterpret_cast<const float*>(perp), nullptr,
           reinterpret_cast<const uint16_t*>(rows), reinterpret_cast<const float*>(energy),
           reinterpret_cast<const uint8_t*>(alive), reinterpret_cast<const int64_t*>(excl), B, r, L, K, 0, 0.f};
    const int T = pick_threads(B * L * r, threads);
    std::vector<std::vector<std::pair<int64_t, int64_t>>> found(T);
    {
        py::gil_scoped_release release;
#pragma omp parallel for num_threads(T) schedule(static, 1)
        for (int t = 0; t < T; ++t) {
            const float* fl = reinterpret_cast<const float*>(floor);
            int64_t lo = L * t / T, hi = L * (t + 1) / T;
#ifdef HOREN_HAVE_AVX512
            if (use_avx512()) {
                switch (r) {
                    case 32: rescue_range512<2>(a, fl, slack, lo, hi, found[t]); continue;
                    case 64: rescue_range512<4>(a, fl, slack, lo, hi, found[t]); continue;
                    case 128: rescue_range512<8>(a, fl, slack, lo, hi, found[t]); continue;
                    case 256: rescue_range512<16>(a, fl, slack, lo, hi, found[t]); continue;
                    default: break;
                }
            }
#endif
            switch (r) {
                case 32: rescue_range<32>(a, fl, slack, lo, hi, found[t]); break;
                case 64: rescue_range<64>(a, fl, slack, lo, hi, found[t]); break;
                case 128: rescue_range<128>(a, fl, slack, lo, hi, found[t]); break;
                case 256: rescue_range<256>(a, fl, slack, lo, hi, found[t]); break;
                default: rescue_range<0>(a, fl, slack, lo, hi, found[t]);
            }
        }
    }
    size_t n = 0;
    for (auto& f : found) n += f.size();
    py::array_t<int64_t> rows_out(static_cast<py::ssize_t>(n)), labels_out(static_cast<py::ssize_t>(n));
    int64_t* ro = rows_out.mutable_data();
    int64_t* lo = labels_out.mutable_data();
    for (auto& f : found)
        for (auto& [b, i] : f) {
            *ro++ = b;
            *lo++ = i;
        }
    return py::make_tuple(rows_out, labels_out);
}

PYBIND11_MODULE(_sketch, m) {
    m.doc() = "horen_fast: the key sketch's fused scan and rescue on the CPU (csrc/sketch_cpu.cpp)";
    m.def("scan", &sketch_scan);
    m.def("rescue", &sketch_rescue);
}
