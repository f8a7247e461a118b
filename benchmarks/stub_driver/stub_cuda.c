/* A stand-in libcuda.so.1 whose calls do nothing and succeed: with it,
 * bench_overhead measures what fajit itself costs per warm call, apart from the
 * driver. Only the entry points fajit loads; values as an H100 (sm_90). */
#include <stddef.h>
typedef int CUresult;
#define OK return 0
CUresult cuInit(unsigned f){(void)f;OK;}
CUresult cuDriverGetVersion(int *v){*v=13000;OK;}
CUresult cuDeviceGet(int *d,int o){*d=o;OK;}
CUresult cuDeviceGetCount(int *c){*c=1;OK;}
CUresult cuDeviceGetAttribute(int *v,int a,int d){(void)d;*v = a==75?9:(a==76?0:232448);OK;}
CUresult cuDeviceGetName(char *n,int l,int d){(void)l;(void)d;n[0]='F';n[1]=0;OK;}
static int ctxobj;
CUresult cuDevicePrimaryCtxRetain(void **c,int d){(void)d;*c=&ctxobj;OK;}
CUresult cuDevicePrimaryCtxRelease_v2(int d){(void)d;OK;}
CUresult cuCtxGetCurrent(void **c){*c=&ctxobj;OK;}
CUresult cuCtxPushCurrent_v2(void *c){(void)c;OK;}
CUresult cuCtxPopCurrent_v2(void **c){*c=&ctxobj;OK;}
CUresult cuCtxGetDevice(int *d){*d=0;OK;}
CUresult cuCtxGetId(void *c, unsigned long long *id){(void)c;*id=7;OK;}
static int mod, fn;
CUresult cuModuleLoadData(void **m,const void *i){(void)i;*m=&mod;OK;}
CUresult cuModuleUnload(void *m){(void)m;OK;}
CUresult cuModuleGetFunction(void **f,void *m,const char *n){(void)m;(void)n;*f=&fn;OK;}
CUresult cuFuncSetAttribute(void *f,int a,int v){(void)f;(void)a;(void)v;OK;}
volatile unsigned long launches;
CUresult cuLaunchKernel(void *f,unsigned a,unsigned b,unsigned c,unsigned d,unsigned e,unsigned g,unsigned s,void *st,void **p,void **x){(void)f;(void)a;(void)b;(void)c;(void)d;(void)e;(void)g;(void)s;(void)st;(void)p;(void)x;launches++;OK;}
CUresult cuGetErrorName(int r,const char **s){(void)r;*s="X";OK;}
CUresult cuGetErrorString(int r,const char **s){(void)r;*s="X";OK;}
