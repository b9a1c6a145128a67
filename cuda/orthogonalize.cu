// Fused classical Gram-Schmidt passes over a Krylov basis Q (rows x n, row stride ld), stored as
// float32 or bfloat16 (uint16 bit patterns), with float32 accumulation. NumPy references:
// sharpscope/lanczos/backends/reference.py (project, update, update_project).
//
// Layout: every kernel walks Q in column tiles, one tile per thread block, so that each element of
// Q is read from DRAM once per pass. Dot products are reduced deterministically: warp shuffles,
// then a fixed-order sum over the block's warps into partial[r * gridDim.x + blockIdx.x], then
// reduce_rows (one block per row, fixed order). No atomics: results are bitwise reproducible.
//
//   project_*         h_partial = Q w                                  (reads Q, w)
//   update_*          w -= Q^T h                                       (reads Q, w; writes w)
//   update_project_*  w -= Q^T h; then partials of Q w and ||w||^2    (reads Q once from DRAM: the
//                     first sweep copies the block's tile, rows x TPB_UP elements, into shared
//                     memory and the second sweep reads it there, when it fits the 48 KiB a block
//                     gets without opting in: up to 93 float32 or 185 bfloat16 rows, the loader's
//                     staged_rows(); beyond that the second sweep re-reads Q through L1/L2)
// CGS2 = project, update_project (whose projection is the second pass), update: 3 sweeps of Q
// instead of 4; the last one is skipped when the DGKS test says the first pass sufficed.
//
// The row loops are unrolled (#pragma unroll 8) so that a thread has several independent loads of Q
// in flight: with one column per thread, a dependent chain of single loads cannot cover DRAM latency.
#include "common.cuh"

#define TPB 256          // threads per block, project and update
#define VEC 4            // columns per thread in project (tile = TPB * VEC columns)
#define ROWCHUNK 32      // rows reduced per shared-memory round
#define TPB_UP 128       // threads per block in update_project (tile = TPB_UP columns)

// per-row block reduction of a thread's value into partial[r * gridDim.x + blockIdx.x]
__device__ __forceinline__ void block_row_sums(float (*red)[TPB / SS_WARP], int r_local, float v) {
    v = ss_warp_sum(v);
    if ((threadIdx.x & (SS_WARP - 1)) == 0) red[r_local][threadIdx.x / SS_WARP] = v;
}

__device__ __forceinline__ void flush_rows(float (*red)[TPB / SS_WARP], int r0, int count, int nwarps,
                                           float* partial) {
    __syncthreads();
    if ((int)threadIdx.x < count) {
        float s = 0.0f;
        for (int k = 0; k < nwarps; ++k) s += red[threadIdx.x][k];
        partial[(long long)(r0 + threadIdx.x) * gridDim.x + blockIdx.x] = s;
    }
    __syncthreads();
}

template <typename T>
__device__ void project_body(const T* __restrict__ Q, long long ld, int rows, const float* __restrict__ w,
                             long long n, float* __restrict__ partial) {
    __shared__ float red[ROWCHUNK][TPB / SS_WARP];
    const long long base = (long long)blockIdx.x * TPB * VEC + threadIdx.x;
    float wv[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        long long c = base + (long long)k * TPB;
        wv[k] = c < n ? w[c] : 0.0f;
    }
    const int nwarps = blockDim.x / SS_WARP;
    for (int r0 = 0; r0 < rows; r0 += ROWCHUNK) {
        int count = min(ROWCHUNK, rows - r0);
        for (int rl = 0; rl < count; ++rl) {
            const long long row = (long long)(r0 + rl) * ld;
            float acc = 0.0f;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                long long c = base + (long long)k * TPB;
                if (c < n) acc += ss_load(Q, row + c) * wv[k];
            }
            block_row_sums(red, rl, acc);
        }
        flush_rows(red, r0, count, nwarps, partial);
    }
}

template <typename T>
__device__ void update_body(const T* __restrict__ Q, long long ld, int rows, const float* __restrict__ h,
                            float* __restrict__ w, long long n) {
    extern __shared__ float hs[];
    for (int r = threadIdx.x; r < rows; r += blockDim.x) hs[r] = h[r];
    __syncthreads();
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < n;
         c += (long long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
#pragma unroll 8
        for (int r = 0; r < rows; ++r) acc += ss_load(Q, (long long)r * ld + c) * hs[r];
        w[c] -= acc;
    }
}

// partial has rows + 1 rows: the last holds the block's share of ||w_new||^2. With staged != 0 the
// dynamic shared memory holds rows coefficients and then the block's tile of Q (rows x TPB_UP values
// of T); each thread writes and reads only its own column of the tile, so no barrier is needed
// between the sweeps.
template <typename T>
__device__ void update_project_body(const T* __restrict__ Q, long long ld, int rows, const float* __restrict__ h,
                                    float* __restrict__ w, long long n, float* __restrict__ partial, int staged) {
    __shared__ float red[ROWCHUNK][TPB / SS_WARP];
    extern __shared__ float hs[];
    T* tile = reinterpret_cast<T*>(hs + rows);
    for (int r = threadIdx.x; r < rows; r += blockDim.x) hs[r] = h[r];
    __syncthreads();
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float wn = 0.0f;
    if (c < n) {
        float acc = 0.0f;
        if (staged) {
#pragma unroll 8
            for (int r = 0; r < rows; ++r) {
                const T q = Q[(long long)r * ld + c];
                tile[r * TPB_UP + threadIdx.x] = q;
                acc += ss_value(q) * hs[r];
            }
        } else {
#pragma unroll 8
            for (int r = 0; r < rows; ++r) acc += ss_load(Q, (long long)r * ld + c) * hs[r];
        }
        wn = w[c] - acc;
        w[c] = wn;
    }
    const int nwarps = blockDim.x / SS_WARP;
    for (int r0 = 0; r0 <= rows; r0 += ROWCHUNK) {
        int count = min(ROWCHUNK, rows + 1 - r0);
        for (int rl = 0; rl < count; ++rl) {
            int r = r0 + rl;
            float v = 0.0f;
            if (c < n) {
                float q = wn;
                if (r < rows) q = staged ? ss_value(tile[r * TPB_UP + threadIdx.x]) : ss_load(Q, (long long)r * ld + c);
                v = q * wn;
            }
            block_row_sums(red, rl, v);
        }
        flush_rows(red, r0, count, nwarps, partial);
    }
}

extern "C" {

__global__ void __launch_bounds__(TPB) project_f32(const float* Q, long long ld, int rows, const float* w,
                                                   long long n, float* partial) {
    project_body<float>(Q, ld, rows, w, n, partial);
}

__global__ void __launch_bounds__(TPB) project_bf16(const unsigned short* Q, long long ld, int rows,
                                                    const float* w, long long n, float* partial) {
    project_body<unsigned short>(Q, ld, rows, w, n, partial);
}

__global__ void __launch_bounds__(TPB) update_f32(const float* Q, long long ld, int rows, const float* h,
                                                  float* w, long long n) {
    update_body<float>(Q, ld, rows, h, w, n);
}

__global__ void __launch_bounds__(TPB) update_bf16(const unsigned short* Q, long long ld, int rows,
                                                   const float* h, float* w, long long n) {
    update_body<unsigned short>(Q, ld, rows, h, w, n);
}

__global__ void __launch_bounds__(TPB_UP) update_project_f32(const float* Q, long long ld, int rows,
                                                             const float* h, float* w, long long n,
                                                             float* partial, int staged) {
    update_project_body<float>(Q, ld, rows, h, w, n, partial, staged);
}

__global__ void __launch_bounds__(TPB_UP) update_project_bf16(const unsigned short* Q, long long ld, int rows,
                                                              const float* h, float* w, long long n,
                                                              float* partial, int staged) {
    update_project_body<unsigned short>(Q, ld, rows, h, w, n, partial, staged);
}

// out[r] = sum_b partial[r * nblocks + b], one block of TPB threads per row, fixed summation order
__global__ void __launch_bounds__(TPB) reduce_rows(const float* partial, int nblocks, float* out) {
    __shared__ float red[TPB / SS_WARP];
    const float* p = partial + (long long)blockIdx.x * nblocks;
    float s = 0.0f;
    for (int b = threadIdx.x; b < nblocks; b += TPB) s += p[b];
    s = ss_warp_sum(s);
    if ((threadIdx.x & (SS_WARP - 1)) == 0) red[threadIdx.x / SS_WARP] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int k = 0; k < TPB / SS_WARP; ++k) t += red[k];
        out[blockIdx.x] = t;
    }
}

}  // extern "C"
