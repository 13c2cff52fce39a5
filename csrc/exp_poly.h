// e^x for the softmax weights of the CPU kernels (horen_cpu.cpp, sketch_cpu.cpp): x = n ln2 + r
// with |r| <= ln2 / 2 (ln2 in two parts, so that n ln2 is exact enough), then
// e^r = 1 + r + r^2 p(r) with p of degree 5 (Cephes expf coefficients, relative error about 2e-7).
// Each instruction set writes the few vector operations around these constants.
#pragma once

namespace horen_exp {
constexpr float LOG2E = 1.44269504089f;
constexpr float LN2_HI = 0.693359375f;
constexpr float LN2_LO = -2.12194440e-4f;
constexpr int DEGREE = 5;
constexpr float POLY[DEGREE + 1] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};  // highest first
}  // namespace horen_exp
