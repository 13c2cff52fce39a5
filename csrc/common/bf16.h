// 16-bit float formats of the CPU kernels: bfloat16 and IEEE half, widened to float32 (exact),
// and float32 rounded to bfloat16 (to nearest, ties to even). The vector kernels widen in
// registers; these are the scalar forms (tails, generic loops) and the definition they match.
#pragma once

#include <cstdint>
#include <cstring>

namespace horen {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: renormalize
            int e = -1;
            do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
            u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | man << 13;
    } else {
        u = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// float32 -> bfloat16 bits, round to nearest even (finite inputs; NaN payloads are not kept)
static inline uint32_t float_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// x as bfloat16 hi = bf16(x) and lo = bf16(x - hi) (the split scores of the retrieval kernel:
// csrc/retrieve/bf16_split.h)
static inline void split_to_bf16(float x, uint16_t* hi, uint16_t* lo) {
    const uint16_t h = static_cast<uint16_t>(float_to_bf16_bits(x));
    *hi = h;
    *lo = static_cast<uint16_t>(float_to_bf16_bits(x - bf16_to_float(h)));
}

static inline float to_float(float x) { return x; }
static inline float to_float(bf16_t x) { return bf16_to_float(x.bits); }
static inline float to_float(f16_t x) { return f16_to_float(x.bits); }

}  // namespace horen
