// Fused norm and normalize for a float32 vector: sumsq_partial gives per-block shares of ||w||^2
// (reduced by orthogonalize.cu's reduce_rows), scale_store_* writes q = s * w into a float32 or a
// bfloat16 basis row in the same pass (the bf16 variant also keeps q in float32).
// scale_store_* are bit-exact: one IEEE multiplication (subnormals kept), the NaN rule and the
// integer round-to-nearest-even of common.cuh; a NaN product becomes 0x7FC00000 | sign (float32)
// and 0x7FC0 | sign (bfloat16), sign = sign(w) XOR sign(s).
// NumPy references: sharpscope/lanczos/backends/reference.py (sumsq, scale_store).
#include "common.cuh"

#define TPB_N 256

extern "C" {

__global__ void __launch_bounds__(TPB_N) sumsq_partial(const float* w, long long n, float* partial) {
    __shared__ float red[TPB_N / SS_WARP];
    float s = 0.0f;
    for (long long c = (long long)blockIdx.x * TPB_N + threadIdx.x; c < n; c += (long long)gridDim.x * TPB_N) {
        float v = w[c];
        s += v * v;
    }
    s = ss_warp_sum(s);
    if ((threadIdx.x & (SS_WARP - 1)) == 0) red[threadIdx.x / SS_WARP] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int k = 0; k < TPB_N / SS_WARP; ++k) t += red[k];
        partial[blockIdx.x] = t;
    }
}

__global__ void __launch_bounds__(TPB_N) scale_store_f32(const float* w, float s, unsigned int* out, long long n) {
    for (long long c = (long long)blockIdx.x * TPB_N + threadIdx.x; c < n; c += (long long)gridDim.x * TPB_N)
        out[c] = ss_scale_bits(w[c], s);
}

// q = s * w kept in float32 (out_f32: the recurrence's working copy) and stored rounded (out)
__global__ void __launch_bounds__(TPB_N) scale_store_bf16(const float* w, float s, unsigned short* out,
                                                          unsigned int* out_f32, long long n) {
    for (long long c = (long long)blockIdx.x * TPB_N + threadIdx.x; c < n; c += (long long)gridDim.x * TPB_N) {
        unsigned int q = ss_scale_bits(w[c], s);
        out_f32[c] = q;
        out[c] = ss_bf16_from_bits(q);
    }
}

}  // extern "C"
