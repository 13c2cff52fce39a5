// The key sketch's hand-vectorized passes (csrc/sketch/kernels.cpp): blocks of 16 rows, written
// once against a 16-lane float type O and included by kernels.cpp once per instruction set, inside
// its `#pragma GCC target` region and namespace (no include guard on purpose): O is one __m512 on
// AVX-512 and two __m256 on AVX2 (the L16 structs there). O provides
//   V, zero, set1, load, loadn (first n lanes, the rest 0), store, add, sub, mul, fma, sqrt, exp,
//   gt (lanes a > b as the bits of a uint32_t, ordered: NaN is not greater), maskz (lanes whose bit
//   is clear set to 0), sum (of the 16 lanes), sums4 (of 4 V's lanes each, partly reduced: a Q)
//   and sums16 (four Q -> the 16 sums, in order), widen (16 bfloat16 -> V), pairs (16 words of two
//   bfloat16 -> the 16 first and the 16 second values) and PAIRS: whether scores_bf, the bfloat16
//   dot products of many queries with a block of rows in pairs, exists (AVX512_BF16). The two
//   dot products of the passes (fine_dot, dot_f32) are written here against O too.

#ifndef HOREN_SKETCH_BLOCKS
#error "csrc/sketch/blocks.h is part of kernels.cpp's instruction-set regions"
#endif

// q . row over n: float32 q, bfloat16 row (the fine part of a bound; also a FineDot)
float fine_dot(const float* q, const uint16_t* row, int64_t n) {
    typename L16::V acc = L16::zero();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) acc = L16::fma(L16::load(q + j), L16::widen(row + j), acc);
    float s = L16::sum(acc);
    for (; j < n; ++j) s += q[j] * bf16(row[j]);
    return s;
}

// a . b over d float32 (pair_dots), in four accumulators
float dot_f32(const float* a, const float* b, int64_t d) {
    using O = L16;
    typename O::V s0 = O::zero(), s1 = O::zero(), s2 = O::zero(), s3 = O::zero();
    int64_t j = 0;
    for (; j + 64 <= d; j += 64) {
        s0 = O::fma(O::load(a + j), O::load(b + j), s0);
        s1 = O::fma(O::load(a + j + 16), O::load(b + j + 16), s1);
        s2 = O::fma(O::load(a + j + 32), O::load(b + j + 32), s2);
        s3 = O::fma(O::load(a + j + 48), O::load(b + j + 48), s3);
    }
    for (; j + 16 <= d; j += 16) s0 = O::fma(O::load(a + j), O::load(b + j), s0);
    if (j < d) {
        const int n = static_cast<int>(d - j);
        s1 = O::fma(O::loadn(a + j, n), O::loadn(b + j, n), s1);
    }
    return O::sum(O::add(O::add(s0, s1), O::add(s2, s3)));
}

// widen the first ``vecs`` 16-column vectors of n <= 16 coarse rows (VC * 16 bfloat16 each) to
// floats dst[16][VC * 16]
template <class O, int VC> HOREN_INLINE void widen_block(const uint16_t* src, float* dst, int n, int vecs) {
    for (int l = 0; l < n; ++l)
        for (int v = 0; v < vecs; ++v) O::store(dst + (l * VC + v) * 16, O::widen(src + (l * VC + v) * 16));
}

// a row's 16 values from a block: widened floats (yb) or the bfloat16 rows themselves
template <class O> HOREN_INLINE typename O::V vec(const float* p) { return O::load(p); }
template <class O> HOREN_INLINE typename O::V vec(const uint16_t* p) { return O::widen(p); }

// the 16 scores over columns [V0 * 16, V1 * 16) of a row-major block of rows VC * 16 wide, given
// widened (float) or as bfloat16 (T); lanes past n are 0. Each row's 16 products are summed in a
// tree over 4 rows (O::sums4), then 16 (O::sums16): no horizontal sum per row.
template <class O, int V0, int V1, int VC, class T> HOREN_INLINE typename O::V scores16(const float* q, const T* yb, int n) {
    if constexpr (V1 <= V0) {
        return O::zero();
    } else {
        typename O::V qv[V1 - V0];
        for (int v = V0; v < V1; ++v) qv[v - V0] = O::load(q + v * 16);
        auto row = [&](int l) {
            if (l >= n) return O::zero();
            typename O::V acc = O::mul(qv[0], vec<O>(yb + (l * VC + V0) * 16));
            for (int v = V0 + 1; v < V1; ++v) acc = O::fma(qv[v - V0], vec<O>(yb + (l * VC + v) * 16), acc);
            return acc;
        };
        typename O::Q g[4];
        for (int c = 0; c < 4; ++c) g[c] = O::sums4(row(4 * c), row(4 * c + 1), row(4 * c + 2), row(4 * c + 3));
        return O::sums16(g[0], g[1], g[2], g[3]);
    }
}

// add the 16 scores over columns [J0, J1) (even) of a block transposed as bfloat16 pairs (ytp,
// see transpose_pairs) for G queries to acc[G]: each pair of columns is loaded and widened once
// for the whole group (copying 32-bit pairs moves half as many values as a float transpose)
template <class O, int J0, int J1, int G>
HOREN_INLINE void scores16_g(const float* const* q, const uint32_t* ytp, typename O::V* acc) {
    typename O::V a[G];  // in registers for the loop (through the pointer, two-register lanes spill)
    for (int k = 0; k < G; ++k) a[k] = acc[k];
    for (int j = J0 / 2; j < J1 / 2; ++j) {
        typename O::V lo, hi;
        O::pairs(ytp + j * 16, lo, hi);
        for (int k = 0; k < G; ++k) a[k] = O::fma(O::set1(q[k][2 * j + 1]), hi, O::fma(O::set1(q[k][2 * j]), lo, a[k]));
    }
    for (int k = 0; k < G; ++k) acc[k] = a[k];
}

// st[G] = the 16 scores over columns [0, J1) of queries b0 .. b0 + G - 1 as bfloat16 dot products
// (O::PAIRS, and the queries given as pairs: a.qpair); false, nothing done, where they do not run
template <class O, int J1, int G>
HOREN_INLINE bool scores_pairs(const Args& a, int64_t b0, const uint32_t* ytp, typename O::V* st) {
    if constexpr (O::PAIRS) {
        if (a.qpair == nullptr) return false;
        const uint32_t* qp[G];
        for (int k = 0; k < G; ++k) {
            qp[k] = a.qpair + (b0 + k) * (a.rc / 2);
            st[k] = O::zero();
        }
        O::template scores_bf<0, J1, G>(qp, ytp, st);
        return true;
    } else {
        (void)a, (void)b0, (void)ytp, (void)st;
        return false;
    }
}

// for many queries, the first ``vecs`` vectors of a block's coarse rows widened to floats (yb: read
// by every group) and its first ``cols`` columns transposed as bfloat16 pairs (ytp), for the
// bfloat16 dot products or scores16_g; for a few, nothing: their groups read the bfloat16 rows
template <class O, int VC, bool MANY> HOREN_INLINE void load_block(const uint16_t* rows, int n, int cols, int vecs,
                                                                    float* yb, uint32_t* ytp) {
    if constexpr (MANY) {
        widen_block<O, VC>(rows, yb, n, vecs);
        transpose_pairs(rows, VC * 16, ytp, n, cols);
    }
}

// fetch the first ``cols`` coarse columns of the rows of the block PREFETCH_BLOCKS ahead into L2:
// only what the pass reads (a block is read once, too little a stream for the prefetchers to run
// far enough ahead of it, and the lines of columns a pass skips would double its traffic)
template <int RC> HOREN_INLINE void prefetch_ahead(const Args& a, int64_t i0, int64_t hi, int cols) {
    const int64_t at = i0 + 16 * PREFETCH_BLOCKS;
    if (at >= hi) return;
    const char* p = reinterpret_cast<const char*>(a.rows_c + at * RC);
    const int n = static_cast<int>(std::min<int64_t>(16, hi - at));
    for (int l = 0; l < n; ++l)
        for (int off = 0; off < cols * 2; off += 64) _mm_prefetch(p + l * RC * 2 + off, _MM_HINT_T1);
}

// y[k] (VT * 16 floats) += w[k][l] * row l's first VT * 16 values, for the rows l of a block (widened
// or bfloat16: T) whose bit is set in ``bits`` and G queries (each row loaded once for the group)
template <class O, int VT, int VC, int G, class T>
HOREN_INLINE void add_weighted(const T* src, uint32_t bits, const float (*w)[16], float* const* y) {
    using V = typename O::V;
    V ay[G][VT];
    for (int k = 0; k < G; ++k)
        for (int v = 0; v < VT; ++v) ay[k][v] = O::load(y[k] + v * 16);
    for (; bits; bits &= bits - 1) {
        const int l = __builtin_ctz(bits);
        V row[VT];
        for (int v = 0; v < VT; ++v) row[v] = vec<O>(src + (l * VC + v) * 16);
        for (int k = 0; k < G; ++k) {
            const V wl = O::set1(w[k][l]);
            for (int v = 0; v < VT; ++v) ay[k][v] = O::fma(wl, row[v], ay[k][v]);
        }
    }
    for (int k = 0; k < G; ++k)
        for (int v = 0; v < VT; ++v) O::store(y[k] + v * 16, ay[k][v]);
}

// one block of 16 rows for G queries b0 .. b0 + G - 1: scores (tail columns, and the rest of the
// coarse columns when near keys are wanted), near-key offers, weights, and the weighted rows
template <class O, int VT, int VC, int G, bool MANY> HOREN_INLINE void scan_group(
        const Args& a, int64_t b0, int64_t i0, int n, uint32_t alive, const uint16_t* rows,
        const float* yb, const uint32_t* ytp, typename O::V et, typename O::V sec, std::vector<int64_t>& ptr,
        std::vector<Acc>& acc, std::vector<std::vector<Entry>>& heaps, std::vector<float>& lanes_z,
        std::vector<float>& lanes_v) {
    using V = typename O::V;
    constexpr int RC = VC * 16;
    alignas(64) float sc_l[16], uc[16], lg[16], w[G][16];
    V st[G], sc[G];
    uint32_t m[G], any = 0;
    for (int k = 0; k < G; ++k) any |= m[k] = lanes(a, a.excl + (b0 + k) * a.K, ptr[b0 + k], i0, n, alive);
    if (!any) return;
    const bool near = a.k2 > 0;
    if (MANY && !near && scores_pairs<O, VT * 16, G>(a, b0, ytp, st)) {
        // scored by the bfloat16 products
    } else if (MANY) {
        const float* qs[G];
        for (int k = 0; k < G; ++k) {
            qs[k] = a.qc + (b0 + k) * RC;
            st[k] = O::zero();
        }
        scores16_g<O, 0, VT * 16, G>(qs, ytp, st);
        if (near) {
            for (int k = 0; k < G; ++k) sc[k] = st[k];
            scores16_g<O, VT * 16, RC, G>(qs, ytp, sc);
        }
    } else {
        for (int k = 0; k < G; ++k) {
            const float* q = a.qc + (b0 + k) * RC;
            st[k] = scores16<O, 0, VT, VC>(q, rows, n);
            if (near) sc[k] = O::add(st[k], scores16<O, VT, VC, VC>(q, rows, n));
        }
    }
    for (int k = 0; k < G; ++k) {
        const int64_t b = b0 + k;
        const V logit = O::fma(O::set1(a.beta), st[k], O::mul(O::set1(a.cvar[b]), et));
        Acc& ac = acc[b];
        if (m[k] && near) {  // rows whose coarse bound reaches the heap: one at a time, in label order
            auto& h = heaps[b];
            const V u = O::fma(O::set1(a.perp_c[b]), sec, sc[k]);
            const float floor = static_cast<int64_t>(h.size()) < a.k2 ? NEG_INF : h.front().u - a.slack;
            uint32_t hit = m[k] & O::gt(u, O::set1(floor));
            if (hit) {
                O::store(sc_l, sc[k]);
                O::store(uc, u);
                O::store(lg, logit);
                for (int l = 0; l < n; ++l)
                    if ((hit >> l & 1u) && offer(a, b, i0 + l, sc_l[l], uc[l], lg[l], h, ac, &fine_dot))
                        m[k] &= ~(1u << l);
            }
        }
        const V wk = O::maskz(m[k], O::exp(O::sub(logit, O::set1(ac.max))));
        float* lz = lanes_z.data() + b * 16;
        float* lv = lanes_v.data() + b * 16;
        O::store(lz, O::add(O::load(lz), wk));
        O::store(lv, O::fma(wk, et, O::load(lv)));
        O::store(w[k], wk);
    }
    any = 0;
    for (int k = 0; k < G; ++k) any |= m[k];
    float* y[G];
    for (int k = 0; k < G; ++k) y[k] = acc[b0 + k].y.data();
    if constexpr (MANY) add_weighted<O, VT, VC, G>(yb, any, w, y);
    else add_weighted<O, VT, VC, G>(rows, any, w, y);
}

// Every query's weights are taken relative to a fixed shift, the largest logit possible
// (acc[b].max = beta + cvar[b], see fixed_shift), so no running maximum and no rescaling: the
// weight sum and weighted energy add up lane by lane, and nothing underflows (logits >= -beta).
template <class O, int VT, int VC, bool MANY>
void scan_blocks(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc, std::vector<std::vector<Entry>>& heaps) {
    using V = typename O::V;
    constexpr int RC = VC * 16;
    alignas(64) float yb[16 * RC];
    alignas(64) uint32_t ytp[8 * RC];
    std::vector<int64_t> ptr = start_pointers(a, lo);
    std::vector<float> lanes_z(a.B * 16, 0.f), lanes_v(a.B * 16, 0.f);
    const int cols = a.k2 > 0 ? RC : VT * 16;
    for (int64_t i0 = lo; i0 < hi; i0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, hi - i0));
        const uint32_t alive = alive_lanes(a, i0, n);
        if (!alive) continue;
        const uint16_t* rows = a.rows_c + i0 * RC;
        prefetch_ahead<RC>(a, i0, hi, cols);  // the columns scored (the weighted rows: the first VT * 16)
        load_block<O, VC, MANY>(rows, n, cols, VT, yb, ytp);
        if (MANY) {  // many queries: most of this block's fine rows will be read; fetch the next block's
            const int64_t next = std::min<int64_t>(i0 + 16, hi), rows = std::min<int64_t>(16, hi - next);
            const char* at = reinterpret_cast<const char*>(a.rows_f + next * a.rf);
            for (int64_t off = 0; off < rows * a.rf * 2; off += 64) _mm_prefetch(at + off, _MM_HINT_T0);
        }
        const V et = O::loadn(a.e_t + i0, n);
        const V sec = O::sqrt(O::loadn(a.e_c + i0, n));
        for (int64_t b0 = 0; b0 < a.B; b0 += 4) {  // queries in groups of up to 4
            switch (std::min<int64_t>(4, a.B - b0)) {
                case 4: scan_group<O, VT, VC, 4, MANY>(a, b0, i0, n, alive, rows, yb, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v); break;
                case 3: scan_group<O, VT, VC, 3, MANY>(a, b0, i0, n, alive, rows, yb, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v); break;
                case 2: scan_group<O, VT, VC, 2, MANY>(a, b0, i0, n, alive, rows, yb, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v); break;
                default: scan_group<O, VT, VC, 1, MANY>(a, b0, i0, n, alive, rows, yb, ytp, et, sec, ptr, acc, heaps, lanes_z, lanes_v);
            }
        }
    }
    for (int64_t b = 0; b < a.B; ++b) {
        acc[b].z += O::sum(O::load(lanes_z.data() + b * 16));
        acc[b].v += O::sum(O::load(lanes_v.data() + b * 16));
    }
}

// one block of 16 rows for G queries: bounds from the first rt columns (the screen: rescue's Args
// carry the screen's width, energies and |q outside| in the tail's fields), then (for a query with
// a lane that passes) from the coarse part, then (where that passes) the full bound
template <class O, int VT, int VC, int G, bool MANY> HOREN_INLINE void rescue_group(
        const Args& a, const float* floor, int64_t b0, int64_t i0, int n, uint32_t alive,
        const uint16_t* rows, const float* yb, const uint32_t* ytp, typename O::V set, typename O::V sec,
        std::vector<int64_t>& ptr, std::vector<std::pair<int64_t, int64_t>>& out) {
    using V = typename O::V;
    constexpr int RC = VC * 16;
    alignas(64) float sc_l[16];
    V st[G], sc[G];
    uint32_t m[G], hit[G], any = 0;
    for (int k = 0; k < G; ++k) any |= m[k] = lanes(a, a.excl + (b0 + k) * a.K, ptr[b0 + k], i0, n, alive);
    if (!any) return;
    const float* qs[G];
    for (int k = 0; k < G; ++k) {
        qs[k] = a.qc + (b0 + k) * RC;
        st[k] = O::zero();
    }
    if (MANY && scores_pairs<O, VT * 16, G>(a, b0, ytp, st)) {
        // scored by the bfloat16 products
    } else if (MANY) {
        scores16_g<O, 0, VT * 16, G>(qs, ytp, st);
    } else {
        for (int k = 0; k < G; ++k) st[k] = scores16<O, 0, VT, VC>(qs[k], rows, n);
    }
    any = 0;
    for (int k = 0; k < G; ++k) {
        const V u = O::fma(O::set1(a.perp_t[b0 + k]), set, st[k]);
        any |= hit[k] = m[k] & O::gt(O::add(u, O::set1(a.slack)), O::set1(floor[b0 + k]));
    }
    if (!any) return;
    for (int k = 0; k < G; ++k) {  // the rest of the coarse part, only for queries with a hit
        sc[k] = st[k];
        if (!hit[k]) continue;
        sc[k] = O::add(st[k], MANY ? scores16<O, VT, VC, VC>(qs[k], yb, n) : scores16<O, VT, VC, VC>(qs[k], rows, n));
    }
    for (int k = 0; k < G; ++k) {
        if (!hit[k]) continue;
        const int64_t b = b0 + k;
        const V u = O::fma(O::set1(a.perp_c[b]), sec, sc[k]);
        const uint32_t h = hit[k] & O::gt(O::add(u, O::set1(a.slack)), O::set1(floor[b]));
        if (!h) continue;
        O::store(sc_l, sc[k]);
        for (int l = 0; l < n; ++l)
            if ((h >> l & 1u) && full_bound(a, b, i0 + l, sc_l[l], &fine_dot) + a.slack > floor[b])
                out.emplace_back(b, i0 + l);
    }
}

template <class O, int VT, int VC, bool MANY>
void rescue_blocks(const Args& a, const float* floor, int64_t lo, int64_t hi,
                   std::vector<std::pair<int64_t, int64_t>>& out) {
    using V = typename O::V;
    constexpr int RC = VC * 16;
    alignas(64) float yb[16 * RC];
    alignas(64) uint32_t ytp[8 * RC];
    std::vector<int64_t> ptr = start_pointers(a, lo);
    for (int64_t i0 = lo; i0 < hi; i0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, hi - i0));
        const uint32_t alive = alive_lanes(a, i0, n);
        if (!alive) continue;
        const uint16_t* rows = a.rows_c + i0 * RC;
        prefetch_ahead<RC>(a, i0, hi, MANY ? RC : VT * 16);  // for a few queries, the screen's columns
        load_block<O, VC, MANY>(rows, n, VT * 16, VC, yb, ytp);  // transposed: the screen's columns
        const V set = O::sqrt(O::loadn(a.e_t + i0, n));
        const V sec = O::sqrt(O::loadn(a.e_c + i0, n));
        for (int64_t b0 = 0; b0 < a.B; b0 += 4) {  // queries in groups of up to 4
            switch (std::min<int64_t>(4, a.B - b0)) {
                case 4: rescue_group<O, VT, VC, 4, MANY>(a, floor, b0, i0, n, alive, rows, yb, ytp, set, sec, ptr, out); break;
                case 3: rescue_group<O, VT, VC, 3, MANY>(a, floor, b0, i0, n, alive, rows, yb, ytp, set, sec, ptr, out); break;
                case 2: rescue_group<O, VT, VC, 2, MANY>(a, floor, b0, i0, n, alive, rows, yb, ytp, set, sec, ptr, out); break;
                default: rescue_group<O, VT, VC, 1, MANY>(a, floor, b0, i0, n, alive, rows, yb, ytp, set, sec, ptr, out);
            }
        }
    }
}

// the two passes for this instruction set, at the (tail, coarse) widths with a specialization, for
// many queries (the transposed block) or a few; false (nothing run) for the other widths
inline bool scan_here(const Args& a, int64_t lo, int64_t hi, std::vector<Acc>& acc,
                      std::vector<std::vector<Entry>>& heaps) {
    return with_widths(a.rc, a.rt, [&](auto vt, auto vc) {
        constexpr int VT = decltype(vt)::value, VC = decltype(vc)::value;
        if (a.B >= TRANSPOSE_FROM) scan_blocks<L16, VT, VC, true>(a, lo, hi, acc, heaps);
        else scan_blocks<L16, VT, VC, false>(a, lo, hi, acc, heaps);
    });
}
inline bool rescue_here(const Args& a, const float* floor, int64_t lo, int64_t hi,
                        std::vector<std::pair<int64_t, int64_t>>& out) {
    return with_widths(a.rc, a.rt, [&](auto vt, auto vc) {
        constexpr int VT = decltype(vt)::value, VC = decltype(vc)::value;
        if (a.B >= TRANSPOSE_FROM) rescue_blocks<L16, VT, VC, true>(a, floor, lo, hi, out);
        else rescue_blocks<L16, VT, VC, false>(a, floor, lo, hi, out);
    });
}
