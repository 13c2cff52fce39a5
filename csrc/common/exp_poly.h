// e^x for the softmax weights of the CPU kernels (csrc/retrieve, csrc/sketch), written once:
// x clamped to [-87, 88], x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so that n ln2 is
// exact enough), then e^r = 1 + r + r^2 p(r) with p of degree 5 (Cephes expf coefficients,
// relative error about 2e-7), and 2^n applied to the exponent bits (AVX2) or by scalef (AVX-512).
#pragma once

#include "isa.h"

namespace horen_exp {
constexpr float LOG2E = 1.44269504089f;
constexpr float LN2_HI = 0.693359375f;
constexpr float LN2_LO = -2.12194440e-4f;
constexpr int DEGREE = 5;
constexpr float POLY[DEGREE + 1] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};  // highest first

#if HOREN_X86
HOREN_AVX2_FN inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(POLY[0]);
    for (int i = 1; i <= DEGREE; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(POLY[i]));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

HOREN_AVX512_FN inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(POLY[0]);
    for (int i = 1; i <= DEGREE; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(POLY[i]));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif
}  // namespace horen_exp
