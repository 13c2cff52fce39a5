// Instruction sets of the CPU kernels: detection (cpuid via __builtin_cpu_supports) and the
// compiler switches that compile a region of code for one of them. The choice itself is made in
// Python (horen_fast/native.py reads HOREN_FAST_CPU_ISA) and handed to every entry point by name;
// nothing in C++ reads the environment.
#pragma once

#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define HOREN_X86 1
#else
#define HOREN_X86 0
#endif

#if defined(__GNUC__)
#define HOREN_INLINE inline __attribute__((always_inline))
#define HOREN_INLINE_LAMBDA __attribute__((always_inline))  // after a lambda's parameter list
#else
#define HOREN_INLINE inline
#define HOREN_INLINE_LAMBDA
#endif

#if HOREN_X86
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags _mm512_undefined_* inside its own headers (a known false positive)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

// single functions for one instruction set (the sketch passes, the exp polynomial); a function
// compiled for a subset of a region's targets inlines into that region (the retrieval kernel)
#define HOREN_AVX2_FN __attribute__((target("avx2,fma")))
#define HOREN_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define HOREN_AVX512BF16_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx512bf16")))

// regions of code compiled for one instruction set (the retrieval kernel's inner loops)

#if defined(__clang__)
#define HOREN_TARGET_PUSH_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define HOREN_TARGET_PUSH_AVX512 _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\"))), apply_to = function)")
#define HOREN_TARGET_PUSH_AVX512BF16 _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16\"))), apply_to = function)")
#define HOREN_TARGET_PUSH_AMX _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,amx-tile,amx-bf16\"))), apply_to = function)")
#define HOREN_TARGET_POP _Pragma("clang attribute pop")
#else
#define HOREN_TARGET_PUSH_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define HOREN_TARGET_PUSH_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define HOREN_TARGET_PUSH_AVX512BF16 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16\")")
#define HOREN_TARGET_PUSH_AMX _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,amx-tile,amx-bf16\")")
#define HOREN_TARGET_POP _Pragma("GCC pop_options")
#endif
#endif  // HOREN_X86

namespace horen {

// avx512bf16: the AVX-512 kernels, with the scores of the retrieval kernel's batched loops
// (csrc/retrieve/bf16_split.h) as AVX512_BF16 dot products of hi/lo bfloat16 splits;
// amx: the same scores as AMX-BF16 tile products (csrc/retrieve/amx_scores.h)
enum class Isa { scalar = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3, amx = 4 };

// bfloat16 dot products (AVX512_BF16): Isa::avx512bf16, and the sketch passes on top of Isa::avx512
inline bool cpu_has_avx512bf16() {
#if HOREN_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

// AMX-BF16 tiles: the CPU has them and Linux lets this process use them (the tile data is a state
// the kernel only saves for a process that asked: arch_prctl ARCH_REQ_XCOMP_PERM, once per process)
inline bool cpu_has_amx() {
#if HOREN_X86 && defined(__GNUC__) && defined(__linux__) && defined(SYS_arch_prctl)
    static const bool ok = [] {
        __builtin_cpu_init();
        if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
        constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return ok;
#else
    return false;
#endif
}

// the AVX-512 kernels run (for avx512, avx512bf16 and amx)
inline bool is_avx512(Isa isa) { return isa == Isa::avx512 || isa == Isa::avx512bf16 || isa == Isa::amx; }

inline bool isa_supported(Isa isa) {
#if HOREN_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    switch (isa) {
        case Isa::scalar: return true;
        case Isa::avx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case Isa::avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case Isa::avx512bf16: return isa_supported(Isa::avx512) && cpu_has_avx512bf16();
        case Isa::amx: return isa_supported(Isa::avx512bf16) && cpu_has_amx();
    }
    return false;
#else
    return isa == Isa::scalar;
#endif
}

inline Isa best_isa() {
    if (isa_supported(Isa::avx512)) return Isa::avx512;
    if (isa_supported(Isa::avx2)) return Isa::avx2;
    return Isa::scalar;
}

inline const char* isa_name(Isa isa) {
    return isa == Isa::amx ? "amx" : isa == Isa::avx512bf16 ? "avx512bf16" : isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "scalar";
}

// "auto" | "amx" | "avx512" | "avx512bf16" | "avx2" | "scalar" -> Isa; false for any other name. "auto"
// here is the best of avx512 / avx2 / scalar; horen_fast/native.py decides when the split scores of
// avx512bf16 or amx pay (measured: horen::measure_split_speedup) and then passes that name
inline bool parse_isa(const std::string& name, Isa* out) {
    if (name == "auto") *out = best_isa();
    else if (name == "avx512") *out = Isa::avx512;
    else if (name == "avx512bf16") *out = Isa::avx512bf16;
    else if (name == "amx") *out = Isa::amx;
    else if (name == "avx2") *out = Isa::avx2;
    else if (name == "scalar") *out = Isa::scalar;
    else return false;
    return true;
}

}  // namespace horen
