// The batched inner loops of the retrieval kernel (csrc/retrieve/kernel.cpp), for passes with
// BATCH_MIN or more query rows: written once against an instruction set's OpsF / OpsD and included
// by kernel.cpp's body inside each instruction set's namespace (no include guard on purpose).
//
// Why: with many queries the pass does 2 B N d multiply-adds over one read of the keys, so it is
// limited by the multiply-adds and by how often each operand is loaded, not by memory. Here the
// accumulators of a register block stay in registers: in the scores BDOT_JB keys x BDOT_RB query
// rows (each loaded key vector serves BDOT_RB rows, each query vector BDOT_JB keys), in the sums
// BAXPY_CB vectors x BAXPY_RB rows (AVX2: 3 x 4, 7 loads per 12 FMAs; bench/loop_rate.py times
// them, bench/RESULTS.md). The queries and the weighted sums are packed per block of
// BR rows, vector-major ([d / W][BR][W]: one block's chunk is contiguous, so it stays in L1
// whatever d is; rows d apart would all fall into the same cache sets), zero-padded to whole
// vectors and whole blocks. The scores run over d in chunks of bchunk() vectors (the block's query
// chunk stays in L1 while every key of the tile passes it), keeping per-(key, row) partial vectors.

#ifndef HOREN_KERNEL_BODY
#error "csrc/retrieve/batched.h is part of kernel.cpp's instruction-set body"
#endif

// vectors per chunk of d: BR rows x bchunk vectors of queries or sums = 16 KiB (in L1)
template <class O> constexpr int64_t bchunk() {
    return std::max<int64_t>(1, 16384 / (BR * O::W * static_cast<int64_t>(sizeof(typename O::F))));
}

// part[j * BR + r] += sum over vectors [cv0, cv1) of K[j] * Q[r] (JB keys, RB of the block's rows:
// Qp and part point at the first of them); with NORM also npart[j] += K[j] * K[j]. Vector cv reads
// key elements cv W .. cv W + W - 1 (a masked load for the last, partial one). Unless pf is null,
// vector cv of the JB key rows at pf (cv counted from cv0) is prefetched on the way: the keys come
// in pieces of a chunk per row, too short for the hardware prefetchers to follow.
template <class O, class KT, int JB, int RB, bool NORM>
static HOREN_INLINE void bdot_chunk(const KT* K, int64_t ks, const typename O::F* Qp, int64_t cv0, int64_t cv1,
                                    int64_t d, typename O::F* part, typename O::F* npart, const KT* pf) {
    using V = typename O::V;
    constexpr int W = O::W;
    V acc[JB][RB];
    V nacc[JB];
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        nacc[j] = NORM ? O::load(npart + j * W) : O::zero();
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) acc[j][r] = O::load(part + (j * BR + r) * W);
    }
    auto step = [&](const V (&kv)[JB], const typename O::F* q) HOREN_INLINE_LAMBDA {
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const V qv = O::load(q + r * W);
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) acc[j][r] = O::fma(kv[j], qv, acc[j][r]);
        }
        if (NORM)
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) nacc[j] = O::fma(kv[j], kv[j], nacc[j]);
    };
    const int64_t full = std::min<int64_t>(cv1, d / W);
    int64_t cv = cv0;
    for (; cv < full; ++cv) {
        V kv[JB];
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) kv[j] = O::lk(K + j * ks + cv * W);
        if (pf != nullptr)
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) __builtin_prefetch(pf + j * ks + (cv - cv0) * W, 0, 3);
        step(kv, Qp + cv * BR * W);
    }
    if (cv < cv1) {  // the partial last vector (the packed queries are zero beyond d)
        V kv[JB];
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) kv[j] = O::lkt(K + j * ks + cv * W, static_cast<int>(d - cv * W));
        step(kv, Qp + cv * BR * W);
    }
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        if (NORM) O::store(npart + j * W, nacc[j]);
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) O::store(part + (j * BR + r) * W, acc[j][r]);
    }
}

// part[j * BR + r] += the products of vectors [cv0, cv1) of K[j] and of the BR rows of the block at
// Qp, for j < nj, in register blocks of BDOT_JB keys x BDOT_RB rows; npart[j] += K[j] . K[j] over
// them unless npart is null (with the first rows, in blocks of BDOT_JBN keys: the norms take
// registers too). With prefetch, the first rows' loop prefetches the key rows two groups ahead
// (past the last: the first rows' next chunk, up to dv vectors).
template <class O, class KT, int JB, bool NORM>
static void bdot_group(const KT* K, int64_t ks, int nj, const typename O::F* Qp, int64_t cv0, int64_t cv1,
                       int64_t d, typename O::F* part, typename O::F* npart, bool prefetch) {
    constexpr int W = O::W;
    const int64_t dv = (d + W - 1) / W;
    auto ahead = [&](int j, int n) -> const KT* {  // rows j .. j + n - 1, two groups later
        if (!prefetch) return nullptr;
        const int t = j + 2 * JB;
        if (t + n <= nj) return K + t * ks + cv0 * W;
        if (t - nj + n > nj || cv1 + (cv1 - cv0) > dv) return nullptr;
        return K + (t - nj) * ks + cv1 * W;
    };
    int j = 0;
    for (; j + JB <= nj; j += JB)
        bdot_chunk<O, KT, JB, BDOT_RB, NORM>(K + j * ks, ks, Qp, cv0, cv1, d, part + j * BR * W,
                                             NORM ? npart + j * W : nullptr, ahead(j, JB));
    if constexpr (JB > 2)  // the rest in pairs, then one: a single key loads a query vector per FMA
        for (; j + 2 <= nj; j += 2)
            bdot_chunk<O, KT, 2, BDOT_RB, NORM>(K + j * ks, ks, Qp, cv0, cv1, d, part + j * BR * W,
                                                NORM ? npart + j * W : nullptr, ahead(j, 2));
    for (; j < nj; ++j)
        bdot_chunk<O, KT, 1, BDOT_RB, NORM>(K + j * ks, ks, Qp, cv0, cv1, d, part + j * BR * W,
                                            NORM ? npart + j * W : nullptr, ahead(j, 1));
}

template <class O, class KT, bool NORM>
static void bdot_rows(const KT* K, int64_t ks, int nj, const typename O::F* Qp, int64_t cv0, int64_t cv1,
                      int64_t d, typename O::F* part, typename O::F* npart, bool prefetch) {
    static_assert(BR % BDOT_RB == 0, "register blocks of whole rows");
    constexpr int W = O::W;
    for (int r0 = 0; r0 < BR; r0 += BDOT_RB) {
        if (NORM && r0 == 0)
            bdot_group<O, KT, BDOT_JBN, true>(K, ks, nj, Qp, cv0, cv1, d, part, npart, prefetch);
        else
            bdot_group<O, KT, BDOT_JB, false>(K, ks, nj, Qp + r0 * W, cv0, cv1, d, part + r0 * W, nullptr,
                                              prefetch && r0 == 0);
    }
}

template <class F, class KT>
static void bdot_block(const KT* K, int64_t ks, int nj, const F* Qp, int64_t cv0, int64_t cv1, int64_t d,
                       F* part, F* npart, bool prefetch) {
    using O = typename OpsOf<F>::type;
    if (npart != nullptr) bdot_rows<O, KT, true>(K, ks, nj, Qp, cv0, cv1, d, part, npart, prefetch);
    else bdot_rows<O, KT, false>(K, ks, nj, Qp, cv0, cv1, d, part, nullptr, prefetch);
}

// acc vectors [cv, cv + CB) of RB of a block's rows (w and accp point at the first of them)
// += sum_j w[r * ws + j] K[j]; with TAIL (CB = 1) the vector is the partial last one (n elements)
constexpr int AHEAD = 4;  // groups of vectors the sums' own prefetch runs ahead of its loads

template <class O, class KT, int CB, int RB, bool TAIL>
static HOREN_INLINE void baxpy_cols(const KT* K, int64_t ks, int nj, const typename O::F* w, int64_t ws,
                                    int64_t cv, int n, typename O::F* accp, const KT* pf, int pfn) {
    using V = typename O::V;
    constexpr int W = O::W;
    V a[CB][RB];
    typename O::F* dst = accp + cv * BR * W;
#pragma GCC unroll 4
    for (int u = 0; u < CB; ++u)
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) a[u][r] = O::load(dst + (u * BR + r) * W);
    for (int j = 0; j < nj; ++j) {
        V kv[CB];
#pragma GCC unroll 4
        for (int u = 0; u < CB; ++u)
            kv[u] = TAIL ? O::lkt(K + j * ks + cv * W, n) : O::lk(K + j * ks + (cv + u) * W);
        if (j < pfn) {  // this row's vectors AHEAD groups on, and the same vectors of the next tile's row j
            // (a prefetch past the end of the keys is harmless: prefetches never fault)
            for (int off = 0; off < CB * W * static_cast<int>(sizeof(KT)); off += 64) {
                __builtin_prefetch(reinterpret_cast<const char*>(K + j * ks + (cv + AHEAD * CB) * W) + off, 0, 3);
                __builtin_prefetch(reinterpret_cast<const char*>(pf + j * ks + cv * W) + off, 0, 3);
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) {
            const V wv = O::set1(w[r * ws + j]);
#pragma GCC unroll 4
            for (int u = 0; u < CB; ++u) a[u][r] = O::fma(wv, kv[u], a[u][r]);
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < CB; ++u)
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) O::store(dst + (u * BR + r) * W, a[u][r]);
}

// vectors [cv0, cv1) of the packed sums of one block of BR rows += sum_j w[r * ws + j] K[j], j < nj,
// in register blocks of BAXPY_CB vectors x BAXPY_RB rows, the first rows prefetching the same vectors
// of the pfn key rows at pf (the next tile: its memory traffic overlaps these multiply-adds, and its
// scores find it in the cache). (Copying each group of vectors of the tile's rows to a contiguous
// buffer first, against their L1 set conflicts, measured 0.8x on Zen 3.)
template <class F, class KT>
static void baxpy_block(const KT* K, int64_t ks, int nj, const F* w, int64_t ws, int64_t cv0, int64_t cv1,
                        int64_t d, F* accp, const KT* pf, int pfn) {
    using O = typename OpsOf<F>::type;
    constexpr int W = O::W, CB = BAXPY_CB, RB = BAXPY_RB;
    static_assert(BR % RB == 0, "register blocks of whole rows");
    const int64_t full = std::min<int64_t>(cv1, d / W);
    int64_t cv = cv0;
    for (; cv + CB <= full; cv += CB)
        for (int r0 = 0; r0 < BR; r0 += RB)
            baxpy_cols<O, KT, CB, RB, false>(K, ks, nj, w + r0 * ws, ws, cv, W, accp + r0 * W, pf, r0 == 0 ? pfn : 0);
    for (; cv < full; ++cv)
        for (int r0 = 0; r0 < BR; r0 += RB)
            baxpy_cols<O, KT, 1, RB, false>(K, ks, nj, w + r0 * ws, ws, cv, W, accp + r0 * W, pf, r0 == 0 ? pfn : 0);
    if (cv < cv1)
        for (int r0 = 0; r0 < BR; r0 += RB)
            baxpy_cols<O, KT, 1, RB, true>(K, ks, nj, w + r0 * ws, ws, cv, static_cast<int>(d - cv * W),
                                           accp + r0 * W, pf, r0 == 0 ? pfn : 0);
}
