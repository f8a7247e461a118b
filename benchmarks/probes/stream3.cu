// Microbenchmark 2: static vs per-tile dynamic streaming reads; TMA bulk copies; per-SM end times.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)

__device__ __forceinline__ unsigned long long gtimer() { unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ unsigned smid() { unsigned s; asm volatile("mov.u32 %0, %smid;" : "=r"(s)); return s; }
__device__ __forceinline__ void cpa(void *s, const void *g) {
  unsigned sa = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(sa), "l"(g));
}
struct Out { unsigned long long t0, t1; unsigned sm, tiles; };

// mode 0: static contiguous; 1: static strided (tile b, b+G, ...); 2: dynamic tickets per tile
template <int POL> __device__ __forceinline__ void cpa_p(void *s, const void *g, unsigned long long pol) {
  unsigned sa = (unsigned)__cvta_generic_to_shared(s);
  if (POL == 0) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(sa), "l"(g));
  else if (POL <= 3) asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" :: "r"(sa), "l"(g), "l"(pol));
  else if (POL == 4) { int4 v; asm volatile("ld.global.cs.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(g)); *(int4 *)s = v; }
  else if (POL == 5) { int4 v; asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.s32 {%0,%1,%2,%3}, [%4], %5;" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(g), "l"(pol)); *(int4 *)s = v; }
  else if (POL == 6) { int4 v; asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(g)); *(int4 *)s = v; }
}
template <int STAGE, int NST, int POL = 0>
__global__ void rdp(const char *src, int ntiles, int mode, unsigned *ticket, Out *out, float *sink) {
  extern __shared__ __align__(16) char sm[];
  __shared__ int tk[NST + 1];
  unsigned long long pol = 0;
  if (POL == 1 || POL == 5) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  if (POL == 2) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  if (POL == 3) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 0.5;" : "=l"(pol));
  unsigned long long t0 = gtimer();
  float acc = 0;
  const int b = blockIdx.x;
  auto issue = [&](int slot, int t) {
    if (t >= 0) for (int i = threadIdx.x * 16; i < STAGE; i += blockDim.x * 16) cpa_p<POL>(sm + slot * STAGE + i, src + (size_t)t * STAGE + i, pol);
    asm volatile("cp.async.commit_group;");
  };
  int done = 0;
  {
    if (threadIdx.x == 0) for (int s = 0; s < NST; ++s) tk[s] = atomicAdd(ticket, 1);
    __syncthreads();
    int issued = 0;
    for (int s = 0; s < NST - 1; ++s) { int c = tk[s] < ntiles ? tk[s] : -1; issue(s, c); issued += c >= 0; }
    int nxt = tk[NST - 1];
    for (int i = 0;; ++i) {
      const int slot_new = (i + NST - 1) % NST;
      int tnew = nxt < ntiles ? nxt : -1;
      __syncthreads();
      if (threadIdx.x == 0 && tnew >= 0) tk[NST] = atomicAdd(ticket, 1);
      issue(slot_new, tnew);
      issued += tnew >= 0;
      asm volatile("cp.async.wait_group %0;" :: "n"(NST - 1));
      __syncthreads();
      nxt = tnew >= 0 ? tk[NST] : ntiles;
      acc += ((float *)(sm + (i % NST) * STAGE))[threadIdx.x * 4];
      if (tnew < 0) { asm volatile("cp.async.wait_group 0;"); __syncthreads(); break; }
    }
    done = issued;
  }
  unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) { out[b].t0 = t0; out[b].t1 = t1; out[b].sm = smid(); out[b].tiles = done; }
  if (acc == 12345.f) sink[0] = acc;
}

template <int STAGE, int NST>
__global__ void rd(const char *src, int ntiles, int mode, unsigned *ticket, Out *out, float *sink) {
  extern __shared__ __align__(16) char sm[];
  __shared__ int tk[NST + 1];
  unsigned long long t0 = gtimer();
  float acc = 0;
  const int G = gridDim.x, b = blockIdx.x;
  const int per = (ntiles + G - 1) / G;
  auto tile_of = [&](int i) -> int { // i-th tile of this block (static modes), -1 past the end
    if (mode == 0) { int t = b * per + i; return (i < per && t < ntiles) ? t : -1; }
    int t = b + i * G; return t < ntiles ? t : -1;
  };
  auto issue = [&](int slot, int t) {
    if (t >= 0) for (int i = threadIdx.x * 16; i < STAGE; i += blockDim.x * 16) cpa(sm + slot * STAGE + i, src + (size_t)t * STAGE + i);
    asm volatile("cp.async.commit_group;");
  };
  int done = 0;
  if (mode == 2) {
    if (threadIdx.x == 0) for (int s = 0; s < NST; ++s) tk[s] = atomicAdd(ticket, 1);
    __syncthreads();
    int cur[NST];
    int issued = 0;
    for (int s = 0; s < NST - 1; ++s) { cur[s] = tk[s] < ntiles ? tk[s] : -1; issue(s, cur[s]); issued += cur[s] >= 0; }
    int nxt = tk[NST - 1];
    for (int i = 0;; ++i) {
      const int slot_new = (i + NST - 1) % NST;
      int tnew = nxt < ntiles ? nxt : -1;
      __syncthreads();
      if (threadIdx.x == 0 && tnew >= 0) tk[NST] = atomicAdd(ticket, 1);
      issue(slot_new, tnew);
      issued += tnew >= 0;
      asm volatile("cp.async.wait_group %0;" :: "n"(NST - 1));
      __syncthreads();
      nxt = tnew >= 0 ? tk[NST] : ntiles;
      // slot i % NST is ready; was it a real tile?
      int tile_i = __shfl_sync(0xffffffff, 0, 0); (void)tile_i;
      acc += ((float *)(sm + (i % NST) * STAGE))[threadIdx.x * 4];
      // stop when the slot consumed had no tile: track by a ring of flags
      // (simple: count issued real tiles; consume until consumed == issued and no new)
      if (tnew < 0) { // drain the rest
        asm volatile("cp.async.wait_group 0;");
        __syncthreads();
        break;
      }
    }
    done = issued;
  } else {
    const int mine = mode == 0 ? max(0, min(per, ntiles - b * per)) : (ntiles - b + G - 1) / G;
    for (int s = 0; s < NST - 1; ++s) issue(s, s < mine ? tile_of(s) : -1);
    for (int i = 0; i < mine; ++i) {
      int nt = i + NST - 1;
      issue(nt % NST, nt < mine ? tile_of(nt) : -1);
      asm volatile("cp.async.wait_group %0;" :: "n"(NST - 1));
      __syncthreads();
      acc += ((float *)(sm + (i % NST) * STAGE))[threadIdx.x * 4];
      __syncthreads();
      ++done;
    }
  }
  unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) { out[b].t0 = t0; out[b].t1 = t1; out[b].sm = smid(); out[b].tiles = done; }
  if (acc == 12345.f) sink[0] = acc;
}

// TMA bulk (cp.async.bulk) with mbarriers, dynamic tickets; one thread issues.
template <int STAGE, int NST>
__global__ void rd_bulk(const char *src, int ntiles, int mode, unsigned *ticket, Out *out, float *sink) {
  extern __shared__ __align__(16) char sm[];
  __shared__ __align__(8) unsigned long long bar[NST];
  __shared__ int tk[NST];
  unsigned long long t0 = gtimer();
  float acc = 0;
  const int G = gridDim.x, b = blockIdx.x;
  const int per = (ntiles + G - 1) / G;
  if (threadIdx.x == 0) {
    for (int s = 0; s < NST; ++s) { unsigned ba = (unsigned)__cvta_generic_to_shared(&bar[s]); asm volatile("mbarrier.init.shared.b64 [%0], 1;" :: "r"(ba)); }
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  auto issue = [&](int slot, int t) { // thread 0
    tk[slot] = t;
    if (t < 0) return;
    unsigned ba = (unsigned)__cvta_generic_to_shared(&bar[slot]);
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" :: "r"(ba), "r"(STAGE));
    const int CH = 16384;
    for (int c = 0; c < STAGE; c += CH) {
      unsigned sa = (unsigned)__cvta_generic_to_shared(sm + slot * STAGE + c);
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" :: "r"(sa), "l"(src + (size_t)t * STAGE + c), "r"(CH), "r"(ba) : "memory");
    }
  };
  int k = 0; // static counter
  auto next_tile = [&]() -> int {
    if (mode == 2) { int t = atomicAdd(ticket, 1); return t < ntiles ? t : -1; }
    if (mode == 0) { int t = b * per + k; int r = (k < per && t < ntiles) ? t : -1; ++k; return r; }
    int t = b + (k++) * G; return t < ntiles ? t : -1;
  };
  if (threadIdx.x == 0) for (int s = 0; s < NST; ++s) issue(s, next_tile());
  __syncthreads();
  int done = 0;
  for (int i = 0;; ++i) {
    const int slot = i % NST; const unsigned phase = (i / NST) & 1;
    if (tk[slot] < 0) break;
    unsigned ba = (unsigned)__cvta_generic_to_shared(&bar[slot]);
    asm volatile("{ .reg .pred p; W: mbarrier.try_wait.parity.shared.b64 p, [%0], %1; @!p bra W; }" :: "r"(ba), "r"(phase) : "memory");
    acc += ((float *)(sm + slot * STAGE))[threadIdx.x * 4];
    __syncthreads();
    if (threadIdx.x == 0) issue(slot, next_tile());
    __syncthreads();
    ++done;
  }
  unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) { out[b].t0 = t0; out[b].t1 = t1; out[b].sm = smid(); out[b].tiles = done; }
  if (acc == 12345.f) sink[0] = acc;
}

typedef void (*KF)(const char *, int, int, unsigned *, Out *, float *);
int main(int argc, char **argv) {
  CK(cudaSetDevice(0));
  const size_t bytes = 268435456ull;
  char *src; CK(cudaMalloc(&src, bytes)); CK(cudaMemset(src, 1, bytes));
  char *flush; CK(cudaMalloc(&flush, 256u << 20));
  Out *out; CK(cudaMalloc(&out, 4096 * sizeof(Out)));
  float *sink; CK(cudaMalloc(&sink, 4));
  unsigned *ticket; CK(cudaMalloc(&ticket, 4));
  struct C { const char *name; KF k; int stage, nst, blocks, mode; };
  std::vector<C> cs = {
    {"cp.async 2x64K static  128", rd<65536, 2>, 65536, 2, 128, 0},
    {"P0 none       4x32K dyn", rdp<32768, 4, 0>, 32768, 4, 132, 2},
    {"P1 evict_first 4x32K dyn", rdp<32768, 4, 1>, 32768, 4, 132, 2},
    {"P2 evict_last  4x32K dyn", rdp<32768, 4, 2>, 32768, 4, 132, 2},
    {"P3 evict_first.5 4x32K dyn", rdp<32768, 4, 3>, 32768, 4, 132, 2},
    {"P4 ld.cs regs 4x32K dyn", rdp<32768, 4, 4>, 32768, 4, 132, 2},
    {"P5 ld.nc.ef regs 4x32K dyn", rdp<32768, 4, 5>, 32768, 4, 132, 2},
    {"P6 ld.nc regs 4x32K dyn", rdp<32768, 4, 6>, 32768, 4, 132, 2},
    {"P0 none 2x64K dyn", rdp<65536, 2, 0>, 65536, 2, 132, 2},
    {"P1 evict_first 2x64K dyn", rdp<65536, 2, 1>, 65536, 2, 132, 2},
  };
  for (auto &c : cs) CK(cudaFuncSetAttribute(c.k, cudaFuncAttributeMaxDynamicSharedMemorySize, c.stage * c.nst));
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  std::vector<Out> h(4096);
  for (int dirty = 1; dirty >= 0; --dirty) {
    printf("--- %s L2\n", dirty ? "dirty (write flush)" : "clean (read flush)");
    for (auto &c : cs) {
      std::vector<float> ts; double es = 0, busy = 0; int tmin = 1 << 30, tmax = 0; std::vector<double> per_sm(132, 0);
      const int ntiles = (int)(bytes / c.stage);
      for (int it = 0; it < 30; ++it) {
        if (dirty) CK(cudaMemsetAsync(flush, it, 256u << 20));
        else rd<65536, 2><<<128, 128, 131072>>>(flush, (256 << 20) / 65536, 1, ticket, out + 2048, sink);
        CK(cudaMemsetAsync(ticket, 0, 4));
        cudaEventRecord(a);
        c.k<<<c.blocks, 128, c.stage * c.nst>>>(src, ntiles, c.mode, ticket, out, sink);
        cudaEventRecord(b);
        CK(cudaEventSynchronize(b)); CK(cudaGetLastError());
        float ms; cudaEventElapsedTime(&ms, a, b); ts.push_back(ms * 1000);
        CK(cudaMemcpy(h.data(), out, c.blocks * sizeof(Out), cudaMemcpyDeviceToHost));
        unsigned long long e0 = ~0ull, e1 = 0, s0 = ~0ull; long tot = 0;
        for (int i = 0; i < c.blocks; ++i) { s0 = std::min(s0, h[i].t0); e0 = std::min(e0, h[i].t1); e1 = std::max(e1, h[i].t1); busy += (h[i].t1 - h[i].t0) / 1000.0 / c.blocks; tot += h[i].tiles; tmin = std::min(tmin, (int)h[i].tiles); tmax = std::max(tmax, (int)h[i].tiles); }
        for (int i = 0; i < c.blocks; ++i) if (h[i].sm < 132) per_sm[h[i].sm] += (h[i].t1 - s0) / 1000.0;
        es += (e1 - e0) / 1000.0;
        if (tot != ntiles) { printf("%s: %ld tiles read, %d expected\n", c.name, tot, ntiles); }
      }
      std::sort(ts.begin(), ts.end());
      printf("%-28s med %6.1f us min %6.1f %5.0f GB/s | end spread %5.1f us, busy %5.1f us, tiles/block %d..%d\n", c.name, ts[15], ts[0], bytes / ts[15] / 1e3, es / 30, busy / 30, tmin, tmax);
      if (c.mode == 0 && c.nst == 4 && c.blocks == 128) {
        printf("  per-SM mean end time (us, static 2x64K): ");
        for (int s = 0; s < 132; ++s) printf("%s%.0f", s ? " " : "", per_sm[s] / 30);
        printf("\n");
      }
    }
  }
  return 0;
}
