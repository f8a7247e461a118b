// Microbenchmark: streaming reads like decode's main kernel (cp.async, 2 stages of 64 KB a block).
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)

__device__ __forceinline__ unsigned long long gtimer() { unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ void cpa(void *s, const void *g) {
  unsigned sa = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(sa), "l"(g));
}
// STAGE bytes a stage; each block reads [chunk*b, chunk*(b+1)) (or dynamic chunks via a ticket)
template <int STAGE, int NST>
__global__ void rd(const char *src, size_t per_block, unsigned long long *times, float *sink, int cluster, unsigned *ticket, size_t piece, int npieces) {
  extern __shared__ __align__(16) char sm[];
  unsigned long long t0 = gtimer();
  float acc = 0;
  auto run = [&](const char *base, size_t n) {
    int tiles = (int)(n / STAGE);
    for (int s = 0; s < NST - 1 && s < tiles; ++s) {
      for (int i = threadIdx.x * 16; i < STAGE; i += blockDim.x * 16) cpa(sm + s * STAGE + i, base + (size_t)s * STAGE + i);
      asm volatile("cp.async.commit_group;");
    }
    for (int t = 0; t < tiles; ++t) {
      int nt = t + NST - 1;
      if (nt < tiles) {
        for (int i = threadIdx.x * 16; i < STAGE; i += blockDim.x * 16) cpa(sm + (nt % NST) * STAGE + i, base + (size_t)nt * STAGE + i);
      }
      asm volatile("cp.async.commit_group;");
      asm volatile("cp.async.wait_group %0;" :: "n"(NST - 1));
      __syncthreads();
      acc += ((float *)(sm + (t % NST) * STAGE))[threadIdx.x * 4];
      __syncthreads();
    }
  };
  if (ticket) {
    __shared__ int mine;
    for (;;) {
      if (threadIdx.x == 0) mine = atomicAdd(ticket, 1);
      __syncthreads();
      int m = mine;
      __syncthreads();
      if (m >= npieces) break;
      run(src + (size_t)m * piece, piece);
    }
  } else {
    run(src + (size_t)blockIdx.x * per_block, per_block);
  }
  if (cluster) { cg::this_cluster().sync(); }
  unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) { unsigned sid; asm volatile("mov.u32 %0, %%smid;" : "=r"(sid)); times[2 * blockIdx.x] = t0; times[2 * blockIdx.x + 1] = t1; times[8192 + blockIdx.x] = sid; }
  if (acc == 12345.f) sink[0] = acc;
}

int main() {
  int dev = 0; CK(cudaSetDevice(dev));
  cudaDeviceProp pr; CK(cudaGetDeviceProperties(&pr, dev));
  printf("%s SMs %d L2 %d MB\n", pr.name, pr.multiProcessorCount, pr.l2CacheSize >> 20);
  const size_t bytes = 268435456ull; // K+V of decode 64k
  char *src; CK(cudaMalloc(&src, bytes)); CK(cudaMemset(src, 1, bytes));
  char *flush; CK(cudaMalloc(&flush, 256u << 20));
  char *dst; CK(cudaMalloc(&dst, bytes));
  unsigned long long *times; CK(cudaMalloc(&times, 3 * 8192 * 8));
  float *sink; CK(cudaMalloc(&sink, 4));
  unsigned *ticket; CK(cudaMalloc(&ticket, 4));
  auto k1 = rd<32768, 2>;  // 64 KB over 2 stages... STAGE 32 KB x 2 = 64 KB smem
  auto k2 = rd<65536, 2>;  // 128 KB
  auto k3 = rd<32768, 3>;  // 96 KB
  CK(cudaFuncSetAttribute(k1, cudaFuncAttributeMaxDynamicSharedMemorySize, 65536 + 70000));
  CK(cudaFuncSetAttribute(k2, cudaFuncAttributeMaxDynamicSharedMemorySize, 135168));
  CK(cudaFuncSetAttribute(k3, cudaFuncAttributeMaxDynamicSharedMemorySize, 98304));
  for (auto k : {k1, k2, k3}) CK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  // cluster occupancy
  for (int smem : {65536, 100000, 135168}) for (int cs : {8, 16}) {
    cudaLaunchConfig_t cfg = {}; cudaLaunchAttribute at[1];
    cfg.gridDim = dim3(128); cfg.blockDim = dim3(128); cfg.dynamicSmemBytes = smem;
    at[0].id = cudaLaunchAttributeClusterDimension; at[0].val.clusterDim.x = cs; at[0].val.clusterDim.y = 1; at[0].val.clusterDim.z = 1;
    cfg.attrs = at; cfg.numAttrs = 1;
    int n = -1; cudaError_t e = cudaOccupancyMaxActiveClusters(&n, (const void *)k2, &cfg);
    printf("maxActiveClusters smem %d cluster %d: %d (%s)\n", smem, cs, n, cudaGetErrorString(e));
  }
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  struct Cfg { const char *name; void (*k)(const char *, size_t, unsigned long long *, float *, int, unsigned *, size_t, int); int blocks, smem, cluster, dyn; };
  std::vector<Cfg> cfgs = {
    {"128 blk 2x64K 132K", k2, 128, 135168, 0, 0},
    {"128 blk 3x32K 96K", k3, 128, 98304, 0, 0},
    {"128 blk cl16 3x32K 96K", k3, 128, 98304, 16, 0},
    {"128 blk cl16 2x32K 64K(+)", k1, 128, 65536 + 40000, 16, 0},
    {"128 blk cl8 3x32K 96K", k3, 128, 98304, 8, 0},
    {"96 blk cl12 2x64K 132K", k2, 96, 135168, 12, 0},
    {"128 blk cl16 3x32K 96K (x)", k3, 128, 98304, 16, 0},
  };
  std::vector<unsigned long long> ht(2 * 8192);
  for (int dirty = 1; dirty >= 0; --dirty) {
    printf("--- %s L2\n", dirty ? "dirty (write flush)" : "clean (read flush)");
    for (auto &c : cfgs) {
      std::vector<float> ts; double spread_end = 0, spread_start = 0, mean_busy = 0;
      for (int it = 0; it < 30; ++it) {
        if (dirty) CK(cudaMemsetAsync(flush, it, 256u << 20));
        else { k2<<<132, 128, 135168>>>(flush, (256u << 20) / 132 / 65536 * 65536, times + 2 * 3000, sink, 0, nullptr, 0, 0); }
        CK(cudaMemsetAsync(ticket, 0, 4));
        cudaEventRecord(a);
        cudaLaunchConfig_t cfg = {}; cudaLaunchAttribute at[1];
        cfg.gridDim = dim3(c.blocks); cfg.blockDim = dim3(128); cfg.dynamicSmemBytes = c.smem;
        at[0].id = cudaLaunchAttributeClusterDimension; at[0].val.clusterDim.x = c.cluster ? c.cluster : 1; at[0].val.clusterDim.y = 1; at[0].val.clusterDim.z = 1;
        cfg.attrs = at; cfg.numAttrs = c.cluster ? 1 : 0;
        size_t per = bytes / c.blocks / 65536 * 65536;
        CK(cudaLaunchKernelEx(&cfg, c.k, (const char *)src, per, times, sink, c.cluster, c.dyn ? ticket : (unsigned *)nullptr, (size_t)c.dyn, c.dyn ? (int)(bytes / c.dyn) : 0));
        cudaEventRecord(b);
        CK(cudaEventSynchronize(b));
        float ms; cudaEventElapsedTime(&ms, a, b); ts.push_back(ms * 1000);
        CK(cudaMemcpy(ht.data(), times, 2 * c.blocks * 8, cudaMemcpyDeviceToHost));
        if (it == 29) {
          std::vector<unsigned long long> sids(c.blocks);
          CK(cudaMemcpy(sids.data(), times + 8192, c.blocks * 8, cudaMemcpyDeviceToHost));
          int cnt[256] = {0}, used_sms = 0, mx = 0;
          for (int i = 0; i < c.blocks; ++i) cnt[sids[i] & 255]++;
          for (int i = 0; i < 256; ++i) { used_sms += cnt[i] > 0; mx = std::max(mx, cnt[i]); }
          printf("  [%s] SMs used %d, most blocks on one SM %d\n", c.name, used_sms, mx);
        }
        unsigned long long s0 = ~0ull, s1 = 0, e0 = ~0ull, e1 = 0; double busy = 0;
        for (int i = 0; i < c.blocks; ++i) { s0 = std::min(s0, ht[2*i]); s1 = std::max(s1, ht[2*i]); e0 = std::min(e0, ht[2*i+1]); e1 = std::max(e1, ht[2*i+1]); busy += ht[2*i+1]-ht[2*i]; }
        spread_start += (s1 - s0) / 1000.0; spread_end += (e1 - e0) / 1000.0; mean_busy += busy / c.blocks / 1000.0;
      }
      {
        int cnt[256] = {0}; unsigned *sm_of = (unsigned *)0;
        (void)sm_of;
      }
      std::sort(ts.begin(), ts.end());
      size_t used = c.dyn ? bytes : bytes / c.blocks / 65536 * 65536 * c.blocks;
      printf("%-32s med %7.1f us min %7.1f  %6.0f GB/s | start spread %5.1f us, end spread %5.1f us, mean block busy %6.1f us\n", c.name, ts[15], ts[0], used / ts[15] / 1e3, spread_start / 30, spread_end / 30, mean_busy / 30);
    }
    // copy rate
    std::vector<float> ts;
    for (int it = 0; it < 30; ++it) {
      if (dirty) CK(cudaMemsetAsync(flush, it, 256u << 20));
      cudaEventRecord(a); CK(cudaMemcpyAsync(dst, src, bytes / 2, cudaMemcpyDeviceToDevice)); cudaEventRecord(b); CK(cudaEventSynchronize(b));
      float ms; cudaEventElapsedTime(&ms, a, b); ts.push_back(ms * 1000);
    }
    std::sort(ts.begin(), ts.end());
    printf("copy 128 MB -> 128 MB: %7.1f us = %6.0f GB/s (read + write)\n", ts[15], bytes / ts[15] / 1e3);
  }
  return 0;
}
