// The scores of the batched loops (csrc/retrieve/batched.h) as AVX512_BF16 dot products, for
// Isa::avx512bf16 (HOREN_FAST_CPU_ISA=avx512bf16; float32 compute, float32 or bfloat16 keys).
// Included once by csrc/retrieve/kernel.cpp, inside an AVX-512 + AVX512_BF16 target region.
//
// Every float32 operand x is split into bfloat16 hi = bf16(x) and lo = bf16(x - hi), so that
// |x - hi - lo| <= 2^-18 |x|; a product is then hi.hi + hi.lo + lo.hi (float32 keys; bfloat16
// keys are exact: hi.k + lo.k), each dot product instruction adding two such pairs per float32
// lane. The dropped terms are below about 3 * 2^-18 |q_i k_i| per element, so a score is off by at
// most 1.2e-5 |q| |k| beyond float32 rounding (SPLIT_REL in kernel.cpp, twice that, is what the
// final-score bound adds to its slack; the oracle's knife edge is 1e-4).
// Whether this beats the float32 FMAs depends on the CPU: on Zen 4 a 512-bit dot product issues at
// the rate of a 512-bit FMA, so bfloat16 keys (2 dot products per 32 elements, no widening) gain
// about 1.25x in these loops and float32 keys (3 against 2 FMAs) lose; measure_split_speedup()
// (kernel.cpp) times both, and "auto" takes the split only where it measured clearly faster.
//
// Queries: packed per block of BR rows as for batched.h, but per pair of vectors (32 elements) and
// row r: 32 bfloat16 hi, then 32 bfloat16 lo (the bytes of two float32 vectors of one row).

#ifndef HOREN_KERNEL_SPLIT
#error "csrc/retrieve/bf16_split.h is part of kernel.cpp"
#endif

// the 32 elements at p (n of them; the rest zero) as bfloat16 hi and lo
static HOREN_INLINE void split_keys(const float* p, int n, __m512bh& hi, __m512bh& lo, __m512& a, __m512& b) {
    if (n >= 32) {
        a = _mm512_loadu_ps(p);
        b = _mm512_loadu_ps(p + 16);
    } else {
        a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u), p);
        b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(n > 16 ? (1u << (n - 16)) - 1u : 0u), p + 16);
    }
    hi = _mm512_cvtne2ps_pbh(b, a);  // elements 0..15 from a, 16..31 from b
    const __m512i h = reinterpret_cast<__m512i>(hi);
    const __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
    const __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    lo = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
}

// part / npart as in batched.h's bdot_chunk, for vectors [cv0, cv1) (cv0 even) of JB keys
template <class KT, int JB, bool NORM>
static HOREN_INLINE void split_chunk(const KT* K, int64_t ks, const uint16_t* Qs, int64_t cv0, int64_t cv1, int64_t d,
                                     float* part, float* npart, const KT* pf) {
    __m512 acc[JB][BR];
    __m512 nacc[JB];
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        nacc[j] = NORM ? _mm512_loadu_ps(npart + j * 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) acc[j][r] = _mm512_loadu_ps(part + (j * BR + r) * 16);
    }
    for (int64_t pv = cv0 / 2; pv < (cv1 + 1) / 2; ++pv) {
        const int64_t c = pv * 32;
        const int n = static_cast<int>(std::min<int64_t>(32, d - c));
        __m512bh kh[JB], kl[JB];
#pragma GCC unroll 16
        for (int j = 0; j < JB; ++j) {
            if constexpr (std::is_same<KT, float>::value) {
                __m512 a, b;
                split_keys(K + j * ks + c, n, kh[j], kl[j], a, b);
                if (NORM) nacc[j] = _mm512_fmadd_ps(b, b, _mm512_fmadd_ps(a, a, nacc[j]));
            } else {
                const __m512i x = n >= 32 ? _mm512_loadu_si512(K + j * ks + c)
                                          : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1ull),
                                                                     K + j * ks + c);
                kh[j] = reinterpret_cast<__m512bh>(x);
                if (NORM) nacc[j] = _mm512_dpbf16_ps(nacc[j], kh[j], kh[j]);  // exact: bfloat16 squares
            }
            if (pf != nullptr) __builtin_prefetch(pf + j * ks + c, 0, 3);
        }
        const uint16_t* q = Qs + pv * BR * 64;
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) {
            const __m512bh qh = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + r * 64));
            const __m512bh ql = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + r * 64 + 32));
#pragma GCC unroll 16
            for (int j = 0; j < JB; ++j) {
                acc[j][r] = _mm512_dpbf16_ps(acc[j][r], kh[j], qh);
                acc[j][r] = _mm512_dpbf16_ps(acc[j][r], kh[j], ql);
                if constexpr (std::is_same<KT, float>::value) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], kl[j], qh);
            }
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) {
        if (NORM) _mm512_storeu_ps(npart + j * 16, nacc[j]);
#pragma GCC unroll 16
        for (int r = 0; r < BR; ++r) _mm512_storeu_ps(part + (j * BR + r) * 16, acc[j][r]);
    }
}

template <class KT, bool NORM>
static void split_rows(const KT* K, int64_t ks, int nj, const uint16_t* Qs, int64_t cv0, int64_t cv1, int64_t d,
                       float* part, float* npart, bool prefetch) {
    constexpr int JB = 2;
    int j = 0;
    for (; j + JB <= nj; j += JB) {
        const KT* pf = prefetch && j + 3 * JB <= nj ? K + (j + 2 * JB) * ks : nullptr;
        split_chunk<KT, JB, NORM>(K + j * ks, ks, Qs, cv0, cv1, d, part + j * BR * 16, NORM ? npart + j * 16 : nullptr, pf);
    }
    for (; j < nj; ++j)
        split_chunk<KT, 1, NORM>(K + j * ks, ks, Qs, cv0, cv1, d, part + j * BR * 16, NORM ? npart + j * 16 : nullptr,
                                 nullptr);
}

// KernelSet::bdot for Isa::avx512bf16; Qp holds the split queries (see the top of this file)
template <class KT>
static void split_block(const KT* K, int64_t ks, int nj, const float* Qp, int64_t cv0, int64_t cv1, int64_t d,
                        float* part, float* npart, bool prefetch) {
    const uint16_t* Qs = reinterpret_cast<const uint16_t*>(Qp);
    if (npart != nullptr) split_rows<KT, true>(K, ks, nj, Qs, cv0, cv1, d, part, npart, prefetch);
    else split_rows<KT, false>(K, ks, nj, Qs, cv0, cv1, d, part, nullptr, prefetch);
}
