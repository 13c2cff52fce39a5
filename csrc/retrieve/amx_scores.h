// The scores of the batched loops (csrc/retrieve/batched.h) as AMX-BF16 tile products, for
// Isa::amx (HOREN_FAST_CPU_ISA=amx; float32 compute, float32 or bfloat16 keys). Included once by
// csrc/retrieve/kernel.cpp, inside an AVX-512 + AVX512_BF16 + AMX target region.
//
// One TDPBF16PS multiplies a tile of 16 keys x 32 bfloat16 elements (A: rows of keys, read
// straight from the keys for bfloat16 keys, with their row stride) by a tile of the same 32
// elements of the BR = 8 queries of a block (B: 16 rows of element pairs, each row 8 queries x 2):
// 16 x 8 x 32 multiply-adds into a 16 x 8 float32 accumulator tile. The operands are split into
// bfloat16 hi and lo exactly as for Isa::avx512bf16 (csrc/retrieve/bf16_split.h, whose error bound
// SPLIT_REL holds here too): hi.hi + hi.lo + lo.hi for float32 keys, hi.k + lo.k for bfloat16 keys.
// The tile products run at many times the rate of the float32 FMAs, so what remains is reading
// (and, for float32 keys, splitting) the keys: a group of 16 keys is read along the whole of d at
// once (16 row streams the prefetchers follow), each 32-element slice split once into a small
// L1 tile and multiplied by the same slice of up to 4 blocks of queries (4 accumulator tiles).
//
// Queries: packed per block of BR rows, per 32 elements (a pair of vectors): 16 rows (element
// pairs) x 8 queries x 2 bfloat16 of hi, then the same of lo; 512 bytes each.

#ifndef HOREN_KERNEL_AMX
#error "csrc/retrieve/amx_scores.h is part of kernel.cpp"
#endif

// the tile configuration (palette 1): tiles 0-3 accumulators (16 keys x 8 float32, one per block
// of queries), 4-5 the queries' hi and lo (16 pairs x 8 queries x 2 bfloat16), 6-7 the keys' hi and
// lo (16 keys x 32)
struct alignas(64) AmxConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {BR * 4, BR * 4, BR * 4, BR * 4, BR * 4, BR * 4, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// nrm's 16 partial lanes += the squares of the 32 bfloat16 elements in h (exact products)
static HOREN_INLINE void amx_norm_row(__m512i h, float* nrm) {
    const __m512bh b = reinterpret_cast<__m512bh>(h);
    _mm512_storeu_ps(nrm, _mm512_dpbf16_ps(_mm512_loadu_ps(nrm), b, b));
}

// tile = rows [0, rows) of 16 bfloat16 keys from K, elements [c, c + n) of each (n <= 32), zero beyond
static HOREN_INLINE void amx_tail(const bf16_t* K, int64_t ks, int rows, int64_t c, int n, uint16_t* tile) {
    const __mmask32 mask = static_cast<__mmask32>(n >= 32 ? ~0ull : (1ull << n) - 1ull);
    for (int m = 0; m < 16; ++m)
        _mm512_storeu_si512(tile + m * 32, m < rows ? _mm512_maskz_loadu_epi16(mask, K + m * ks + c) : _mm512_setzero_si512());
}

// part[((j + m) BR + r) 16] += c[m BR + r], the stored accumulator tile of keys j ..
static HOREN_INLINE void amx_add(int rows, const float* c, float* part, int64_t j) {
    for (int m = 0; m < rows; ++m)
        for (int r = 0; r < BR; ++r) part[((j + m) * BR + r) * 16] += c[m * BR + r];
}

// slices ahead of the loads that the rows of a group are prefetched (a slice: 64 or 128 bytes a row)
constexpr int64_t AMX_AHEAD = 8;
// slices of d per chunk of the scores: up to 4 blocks' queries of a chunk (16 KiB each) are read
// again for each group of keys, from L1 / L2 rather than from memory
constexpr int64_t AMX_SLICES = 16;

// tile 6 (and for float32 keys tile 7) = rows [0, rows) of 16 keys at K, elements [c, c + n) of
// each (zero beyond); with nrm, nrm[m 16 ..] += the squares of row m's elements
template <class KT>
static HOREN_INLINE void amx_keys(const KT* K, int64_t ks, int rows, int64_t c, int n, uint16_t* hi, uint16_t* lo,
                                  float* nrm) {
    for (int m = 0; m < rows; ++m) __builtin_prefetch(K + m * ks + c + AMX_AHEAD * 32, 0, 3);
    if constexpr (std::is_same<KT, float>::value) {
        for (int m = 0; m < rows; ++m) {
            __m512bh bh, bl;
            __m512 a, b;
            isa_avx512bf16::split_keys(K + m * ks + c, n, bh, bl, a, b);
            _mm512_store_si512(hi + m * 32, reinterpret_cast<__m512i>(bh));
            _mm512_store_si512(lo + m * 32, reinterpret_cast<__m512i>(bl));
            if (nrm != nullptr)
                _mm512_storeu_ps(nrm + m * 16, _mm512_fmadd_ps(b, b, _mm512_fmadd_ps(a, a, _mm512_loadu_ps(nrm + m * 16))));
        }
        for (int m = rows; m < 16; ++m) {
            _mm512_store_si512(hi + m * 32, _mm512_setzero_si512());
            _mm512_store_si512(lo + m * 32, _mm512_setzero_si512());
        }
        _tile_loadd(6, hi, 64);
        _tile_loadd(7, lo, 64);
    } else {
        if (nrm != nullptr) {
            const __mmask32 mask = static_cast<__mmask32>(n >= 32 ? ~0ull : (1ull << n) - 1ull);
            for (int m = 0; m < rows; ++m) amx_norm_row(_mm512_maskz_loadu_epi16(mask, K + m * ks + c), nrm + m * 16);
        }
        if (rows == 16 && n == 32) {  // straight from the keys
            _tile_loadd(6, K + c, ks * static_cast<int64_t>(sizeof(KT)));
        } else {
            amx_tail(K, ks, rows, c, n, hi);
            _tile_loadd(6, hi, 64);
        }
    }
}

// block G of the set (its queries' slice at q) += keys x queries; literal tile numbers (the tile
// instructions take no variables)
#define HOREN_AMX_BLOCK(G, q)                                              \
    do {                                                                   \
        _tile_loadd(4, (q), BR * 4);                                       \
        _tile_loadd(5, (q) + 256, BR * 4);                                 \
        _tile_dpbf16ps(G, 6, 4);                                           \
        _tile_dpbf16ps(G, 6, 5);                                           \
        if (std::is_same<KT, float>::value) _tile_dpbf16ps(G, 7, 4);       \
    } while (0)
#define HOREN_AMX_FLUSH(G)                                      \
    do {                                                        \
        _tile_stored(G, c, BR * 4);                             \
        amx_add(rows, c, part + (b0 + (G)) * pb, j0);           \
    } while (0)

// KernelSet::bdot_blocks for Isa::amx: vectors [cv0, cv1) (cv0 even; the driver passes all of d) of
// the scores of every block of queries (block b at Qp + b qbsize, its partials at part + b pb). The
// whole product of a key and a query lands in lane 0 of its partial vector (the driver sums the
// lanes); the norms as partial vectors, as for the FMA loops.
template <class KT>
static void amx_blocks(const KT* K, int64_t ks, int nj, const float* Qp, int64_t qbsize, int64_t blocks,
                       int64_t cv0, int64_t cv1, int64_t d, float* part, int64_t pb, float* npart) {
    static const AmxConfig config;
    alignas(64) uint16_t hi[16 * 32], lo[16 * 32];
    alignas(64) float c[16 * BR];
    const int64_t p0 = cv0 / 2, p1 = (cv1 + 1) / 2;
    const uint16_t* Qs = reinterpret_cast<const uint16_t*>(Qp);
    const int64_t qstride = qbsize * 2;  // uint16 per block of queries
    _tile_loadconfig(&config);
    for (int64_t s0 = p0; s0 < p1; s0 += AMX_SLICES) {  // chunks of d: their queries stay in cache
        const int64_t s1 = std::min(p1, s0 + AMX_SLICES);
        for (int j0 = 0; j0 < nj; j0 += 16) {
            const int rows = std::min(16, nj - j0);
            const KT* kg = K + j0 * ks;
            for (int64_t b0 = 0; b0 < blocks; b0 += 4) {  // sets of up to 4 blocks, one accumulator each
                const int nb = static_cast<int>(std::min<int64_t>(4, blocks - b0));
                float* nrm = npart != nullptr && b0 == 0 ? npart + j0 * 16 : nullptr;
                const uint16_t* q0 = Qs + b0 * qstride;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t pv = s0; pv < s1; ++pv) {
                    const int64_t c0 = pv * 32;
                    amx_keys<KT>(kg, ks, rows, c0, static_cast<int>(std::min<int64_t>(32, d - c0)), hi, lo, nrm);
                    const uint16_t* q = q0 + pv * 512;
                    HOREN_AMX_BLOCK(0, q);
                    if (nb > 1) HOREN_AMX_BLOCK(1, q + qstride);
                    if (nb > 2) HOREN_AMX_BLOCK(2, q + 2 * qstride);
                    if (nb > 3) HOREN_AMX_BLOCK(3, q + 3 * qstride);
                }
                HOREN_AMX_FLUSH(0);
                if (nb > 1) HOREN_AMX_FLUSH(1);
                if (nb > 2) HOREN_AMX_FLUSH(2);
                if (nb > 3) HOREN_AMX_FLUSH(3);
            }
        }
    }
    _tile_release();
}
#undef HOREN_AMX_BLOCK
#undef HOREN_AMX_FLUSH

// ---- the weighted sums of the batched loops, bfloat16 keys: acc[r] += sum_j w[r][j] K[j] as tile
// products ----
// C (tiles 0, 1): the packed sums of one block at two vectors cv, cv + 1 (8 rows x 16 float32,
// contiguous in the packed layout); A (tiles 2, 3): the block's weights of 32 keys, hi and lo
// (8 rows x 32 bfloat16); B (tiles 4, 6): the 32 keys at those two vectors in pairs (16 rows: keys
// 2p and 2p + 1, their 16 elements interleaved). The weights are split as the queries of the
// scores, so a sum is off by at most about SPLIT_REL times sum_j w_j |K[j][c]|, and its query
// after the step by alpha times that. Float32 keys keep the FMA loops for the sums: splitting
// every key element into hi and lo a second time measured slower than the FMAs (bench/RESULTS.md).
struct alignas(64) AmxSumConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 0, 64};
    uint8_t rows[16] = {BR, BR, BR, BR, 16, 0, 16};
};

// t[p] (p < 16) = keys 2p and 2p + 1 of K (rows < nk exist) at elements [c, c + n), interleaved
// per element; prefetches the same elements of the first pfn rows at pf (the next tile's, in the
// order of the loads, so that the memory traffic runs along with the tile products)
static HOREN_INLINE void amx_pairs(const bf16_t* K, int64_t ks, int nk, int64_t c, int n, uint16_t* t,
                                   const bf16_t* pf, int pfn) {
    const __m512i inter = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                           6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __mmask16 m16 = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
    for (int p = 0; p < 16; ++p) {
        __m256i h[2];
        for (int e = 0; e < 2; ++e) {
            const int row = 2 * p + e;
            if (row < pfn) __builtin_prefetch(pf + row * ks + c, 0, 3);
            h[e] = row < nk ? _mm256_maskz_loadu_epi16(m16, K + row * ks + c) : _mm256_setzero_si256();
        }
        _mm512_store_si512(t + p * 32, _mm512_permutex2var_epi16(_mm512_castsi256_si512(h[0]), inter,
                                                                 _mm512_castsi256_si512(h[1])));
    }
}

// KernelSet::baxpy_blocks for Isa::amx, bfloat16 keys: the packed sums of every block (block b at
// accp + b bsize, its weights w + b BR ws, row r's of key j at [r ws + j]) += the weighted keys,
// over all of d; prefetches the rows of the next tile (pfn of them at pf) on the way, as the FMA
// loops do.
static void amx_sums(const bf16_t* K, int64_t ks, int nj, const float* w, int64_t ws, int64_t blocks, int64_t d,
                     float* accp, int64_t bsize, const bf16_t* pf, int pfn) {
    static const AmxSumConfig config;
    constexpr int64_t W = 16;
    const int64_t dv = (d + W - 1) / W;
    const int ng = (nj + 31) / 32;
    // the weights as A tiles: [block][key group][hi, lo][8 rows][32]
    thread_local std::vector<uint16_t> wt;
    wt.resize(static_cast<size_t>(blocks * ng * 2 * BR * 32));
    for (int64_t b = 0; b < blocks; ++b)
        for (int g = 0; g < ng; ++g)
            for (int r = 0; r < BR; ++r) {
                uint16_t* hi = &wt[static_cast<size_t>(((b * ng + g) * 2 * BR + r) * 32)];
                for (int i = 0; i < 32; ++i) {
                    const int j = g * 32 + i;
                    split_to_bf16(j < nj ? w[(b * BR + r) * ws + j] : 0.0f, hi + i, hi + BR * 32 + i);
                }
            }
    alignas(64) uint16_t kt[2][16 * 32];  // B tiles: vectors cv, cv + 1
    _tile_loadconfig(&config);
    for (int g = 0; g < ng; ++g) {
        const bf16_t* kg = K + g * 32 * ks;
        const bf16_t* pg = pf + g * 32 * ks;
        const int nk = std::min(32, nj - g * 32), pn = std::max(0, std::min(32, pfn - g * 32));
        for (int64_t cv = 0; cv < dv; cv += 2) {
            const int64_t c = cv * W;
            amx_pairs(kg, ks, nk, c, static_cast<int>(std::min<int64_t>(W, d - c)), kt[0], pg, pn);
            amx_pairs(kg, ks, nk, c + W, static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(W, d - c - W))),
                      kt[1], pg, pn);
            _tile_loadd(4, kt[0], 64);
            _tile_loadd(6, kt[1], 64);
            const bool two = cv + 1 < dv;  // the packed sums end at dv vectors
            for (int64_t b = 0; b < blocks; ++b) {
                float* dst = accp + b * bsize + cv * BR * W;
                const uint16_t* wa = &wt[static_cast<size_t>((b * ng + g) * 2 * BR * 32)];
                _tile_loadd(0, dst, 64);
                if (two) _tile_loadd(1, dst + BR * W, 64);
                _tile_loadd(2, wa, 64);
                _tile_loadd(3, wa + BR * 32, 64);
                _tile_dpbf16ps(0, 2, 4);
                _tile_dpbf16ps(0, 3, 4);
                _tile_stored(0, dst, 64);
                if (two) {
                    _tile_dpbf16ps(1, 2, 6);
                    _tile_dpbf16ps(1, 3, 6);
                    _tile_stored(1, dst + BR * W, 64);
                }
            }
        }
    }
    _tile_release();
}
