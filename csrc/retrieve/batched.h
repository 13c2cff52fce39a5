// The batched inner loops of the retrieval kernel (csrc/retrieve/kernel.cpp), for passes with
// BATCH_MIN or more query rows: written once against an instruction set's OpsF / OpsD and included
// by kernel.cpp's body inside each instruction set's namespace (no include guard on purpose).
//
// Why: with many queries the pass does 2 B N d multiply-adds over one read of the keys, so it is
// limited by the multiply-adds and by how often each operand is loaded, not by memory. Here each
// loaded key vector serves BR = 8 queries (and, in the scores, each query vector BDOT_JB keys),
// with every accumulator in a register. The queries and the weighted sums are packed per block of
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

// part[j * BR + r] += sum over vectors [cv0, cv1) of K[j] * Q[r] (JB keys, BR rows);
// with NORM also npart[j] += K[j] * K[j]. Vector cv reads key elements cv W .. cv W + W - 1 (a
// masked load for the last, partial one). Unless pf is null, vector cv of the JB key rows at pf
// (cv counted from cv0) is prefetched on the way: the keys come in pieces of a chunk per row, too
// short for the hardware prefetchers to follow.
template <class O, class KT, int JB, bool NORM>
static HOREN_INLINE void bdot_chunk(const KT* K, int64_t ks, const typename O::F* Qp, int64_t cv0, int64_t cv1,
                                    int64_t d, typename O::F* part, typename O::F* npart, const KT* pf) {
    using V = typename O::V;
    constexpr int W = O::W;
    V acc[JB][BR];
    V nacc[JB];
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        nacc[j] = NORM ? O::load(npart + j * W) : O::zero();
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) acc[j][r] = O::load(part + (j * BR + r) * W);
    }
    const int64_t full = std::min<int64_t>(cv1, d / W);
    int64_t cv = cv0;
    for (; cv < full; ++cv) {
        V kv[JB];
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) kv[j] = O::lk(K + j * ks + cv * W);
        if (pf != nullptr)
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) __builtin_prefetch(pf + j * ks + (cv - cv0) * W, 0, 3);
        const typename O::F* q = Qp + cv * BR * W;
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) {
            const V qv = O::load(q + r * W);
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) acc[j][r] = O::fma(kv[j], qv, acc[j][r]);
        }
        if (NORM)
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) nacc[j] = O::fma(kv[j], kv[j], nacc[j]);
    }
    if (cv < cv1) {  // the partial last vector (the packed queries are zero beyond d)
        const int n = static_cast<int>(d - cv * W);
        V kv[JB];
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) kv[j] = O::lkt(K + j * ks + cv * W, n);
        const typename O::F* q = Qp + cv * BR * W;
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) {
            const V qv = O::load(q + r * W);
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) acc[j][r] = O::fma(kv[j], qv, acc[j][r]);
        }
        if (NORM)
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) nacc[j] = O::fma(kv[j], kv[j], nacc[j]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        if (NORM) O::store(npart + j * W, nacc[j]);
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) O::store(part + (j * BR + r) * W, acc[j][r]);
    }
}

// part[j * BR + r] += the products of vectors [cv0, cv1) of K[j] and of the BR rows of the block at
// Qp, for j < nj; npart[j] += K[j] . K[j] over them unless npart is null. With prefetch, the key
// rows two groups ahead (past the last: the first rows' next chunk, up to dv vectors) are
// prefetched.
template <class O, class KT, bool NORM>
static void bdot_rows(const KT* K, int64_t ks, int nj, const typename O::F* Qp, int64_t cv0, int64_t cv1,
                      int64_t d, typename O::F* part, typename O::F* npart, bool prefetch) {
    constexpr int W = O::W;
    const int64_t dv = (d + W - 1) / W;
    auto ahead = [&](int j, int n) -> const KT* {  // rows j .. j + n - 1, two groups of BDOT_JB later
        if (!prefetch) return nullptr;
        const int t = j + 2 * BDOT_JB;
        if (t + n <= nj) return K + t * ks + cv0 * W;
        if (t - nj + n > nj || cv1 + (cv1 - cv0) > dv) return nullptr;
        return K + (t - nj) * ks + cv1 * W;
    };
    int j = 0;
    for (; j + BDOT_JB <= nj; j += BDOT_JB)
        bdot_chunk<O, KT, BDOT_JB, NORM>(K + j * ks, ks, Qp, cv0, cv1, d, part + j * BR * W,
                                         NORM ? npart + j * W : nullptr, ahead(j, BDOT_JB));
    for (; j < nj; ++j)
        bdot_chunk<O, KT, 1, NORM>(K + j * ks, ks, Qp, cv0, cv1, d, part + j * BR * W, NORM ? npart + j * W : nullptr,
                                   ahead(j, 1));
}

template <class F, class KT>
static void bdot_block(const KT* K, int64_t ks, int nj, const F* Qp, int64_t cv0, int64_t cv1, int64_t d,
                       F* part, F* npart, bool prefetch) {
    using O = typename OpsOf<F>::type;
    if (npart != nullptr) bdot_rows<O, KT, true>(K, ks, nj, Qp, cv0, cv1, d, part, npart, prefetch);
    else bdot_rows<O, KT, false>(K, ks, nj, Qp, cv0, cv1, d, part, nullptr, prefetch);
}

// acc vectors [cv, cv + CB) of the BR rows += sum_j w[r * ws + j] K[j]; with TAIL (CB = 1) the
// vector is the partial last one (n elements)
constexpr int AHEAD = 4;  // groups of vectors the sums' own prefetch runs ahead of its loads

template <class O, class KT, int CB, bool TAIL>
static HOREN_INLINE void baxpy_cols(const KT* K, int64_t ks, int nj, const typename O::F* w, int64_t ws,
                                    int64_t cv, int n, typename O::F* accp, const KT* pf, int pfn) {
    using V = typename O::V;
    constexpr int W = O::W;
    V a[CB][BR];
    typename O::F* dst = accp + cv * BR * W;
#pragma GCC unroll 4
    for (int u = 0; u < CB; ++u)
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) a[u][r] = O::load(dst + (u * BR + r) * W);
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
        for (int r = 0; r < BR; ++r) {
            const V wv = O::set1(w[r * ws + j]);
#pragma GCC unroll 4
            for (int u = 0; u < CB; ++u) a[u][r] = O::fma(wv, kv[u], a[u][r]);
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < CB; ++u)
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) O::store(dst + (u * BR + r) * W, a[u][r]);
}

// vectors [cv0, cv1) of the packed sums of one block of BR rows += sum_j w[r * ws + j] K[j], j < nj,
// prefetching the same vectors of the pfn key rows at pf (the next tile: its memory traffic
// overlaps these multiply-adds, and its scores find it in the cache)
template <class F, class KT>
static void baxpy_block(const KT* K, int64_t ks, int nj, const F* w, int64_t ws, int64_t cv0, int64_t cv1,
                        int64_t d, F* accp, const KT* pf, int pfn) {
    using O = typename OpsOf<F>::type;
    constexpr int W = O::W;
    const int64_t full = std::min<int64_t>(cv1, d / W);
    int64_t cv = cv0;
    for (; cv + BAXPY_CB <= full; cv += BAXPY_CB)
        baxpy_cols<O, KT, BAXPY_CB, false>(K, ks, nj, w, ws, cv, W, accp, pf, pfn);
    for (; cv < full; ++cv) baxpy_cols<O, KT, 1, false>(K, ks, nj, w, ws, cv, W, accp, pf, pfn);
    if (cv < cv1) baxpy_cols<O, KT, 1, true>(K, ks, nj, w, ws, cv, static_cast<int>(d - cv * W), accp, pf, pfn);
}
