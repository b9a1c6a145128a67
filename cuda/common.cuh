// Shared helpers for the sharpscope kernels: storage loads (float32 or bfloat16 bits in uint16),
// round-to-nearest-even bfloat16 encoding, and a deterministic warp/block reduction.
// Included textually by the loader (sharpscope/backends/kernels.py) and by nvcc in CI.
#pragma once

#define SS_WARP 32

__device__ __forceinline__ float ss_load(const float* p, long long i) { return p[i]; }

// bfloat16 stored as its bit pattern: the float32 with those upper 16 bits (exact)
__device__ __forceinline__ float ss_load(const unsigned short* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}

// float32 -> bfloat16 bits, nearest, ties to even; NaN stays a quiet NaN (matches bf16.py)
__device__ __forceinline__ unsigned short ss_bf16_encode(float x) {
    unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((bits >> 16) | 0x0040u);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (unsigned short)(bits >> 16);
}

__device__ __forceinline__ float ss_warp_sum(float v) {
#pragma unroll
    for (int off = SS_WARP / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
    return v;
}
