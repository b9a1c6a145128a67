// Shared helpers for the sharpscope kernels: storage loads (float32 or bfloat16 bits in uint16), the
// exact scaled store of the normalize step, and a deterministic warp/block reduction.
// Included textually by the loader (sharpscope/lanczos/backends/kernels.py), by nvcc in CI
// (scripts/check_cuda.sh) and, for its __host__ __device__ helpers, by a host test program
// (tests/test_cuda_build.py).
//
// Bit-exact rules of the scaled store q = s * w (the NumPy references, scale_bits and
// float32_to_bf16_bits in sharpscope/lanczos/backends/bf16.py, implement the same integer
// algorithm; the load-time self-check compares kernel and reference bit for bit):
//  * The product is one IEEE float32 multiplication, rounded to nearest even, subnormal inputs and
//    results kept. CuPy appends -ftz=true to the options of every RawModule (after the caller's,
//    and NVRTC honours the last), so the multiplication is inline PTX `mul.rn.f32` without .ftz:
//    no compiler flag can flush it. No fast-math, no __fmul_* intrinsics (they follow -ftz).
//  * NaN rule: a NaN product becomes the quiet NaN 0x7FC00000 | sign with sign = sign(w) XOR sign(s)
//    (the sign IEEE gives every other product; a NaN in w keeps its sign for s > 0), whatever NaN
//    the hardware returned (NVIDIA GPUs return 0x7FFFFFFF, dropping the sign; x86 keeps the payload).
//  * float32 -> bfloat16: round to nearest, ties to even, by integer arithmetic on the float32 bits
//    (bits + 0x7FFF + lsb, then the upper half): overflow rounds to +-inf, subnormals round like any
//    other value (never flushed); a NaN becomes the bfloat16 quiet NaN 0x7FC0 | sign.
//    No bfloat16 conversion intrinsics: their NaN and subnormal handling is the hardware's.
#pragma once

#define SS_WARP 32

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SS_CUDA 1
#define SS_HD __host__ __device__ __forceinline__
#else
#define SS_HD inline
#endif

SS_HD unsigned int ss_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    unsigned int u;
    __builtin_memcpy(&u, &x, sizeof u);
    return u;
#endif
}

SS_HD float ss_float(unsigned int u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// a * b, IEEE float32, round to nearest even, subnormals kept (see the rules above)
SS_HD float ss_mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    // host build (tests only): the CPU's IEEE product, with a NaN replaced by the GPU's canonical
    // 0x7FFFFFFF, so that the host test sees the NaN the device produces
    float r = a * b;
    return r != r ? ss_float(0x7FFFFFFFu) : r;
#endif
}

// the float32 bits of s * w under the NaN rule
SS_HD unsigned int ss_scale_bits(float w, float s) {
    unsigned int q = ss_bits(ss_mul_rn(w, s));
    if ((q & 0x7FFFFFFFu) > 0x7F800000u) q = 0x7FC00000u | ((ss_bits(w) ^ ss_bits(s)) & 0x80000000u);
    return q;
}

// float32 bits -> bfloat16 bits: nearest, ties to even, by integer arithmetic; NaN -> 0x7FC0 | sign
SS_HD unsigned short ss_bf16_from_bits(unsigned int bits) {
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)(0x7FC0u | ((bits >> 16) & 0x8000u));
    return (unsigned short)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

#ifdef SS_CUDA
// a stored basis element as float32: float32 as is, bfloat16 bits zero-extended (exact)
__device__ __forceinline__ float ss_value(float q) { return q; }
__device__ __forceinline__ float ss_value(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }

template <typename T>
__device__ __forceinline__ float ss_load(const T* p, long long i) { return ss_value(p[i]); }

__device__ __forceinline__ float ss_warp_sum(float v) {
#pragma unroll
    for (int off = SS_WARP / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
    return v;
}
#endif
