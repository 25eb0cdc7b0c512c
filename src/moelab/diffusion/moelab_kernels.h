/* What moelab's CPU kernels (fused_norm.c, depthwise.c) share: the fixed split of work between
 * OpenMP threads. moelab.diffusion.kernels keys its build cache on this header as well as on each
 * source, so a change here rebuilds both. */
#ifndef MOELAB_KERNELS_H
#define MOELAB_KERNELS_H

#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* the first of thread t's items when `total` items split into nt fixed, contiguous ranges */
static inline int64_t lo(int64_t total, int t, int nt) { return total * t / nt; }

/* this thread's number and the team's size (0 and 1 outside OpenMP) */
static inline void thread_in_team(int* t, int* T) {
#ifdef _OPENMP
  *t = omp_get_thread_num();
  *T = omp_get_num_threads();
#else
  *t = 0;
  *T = 1;
#endif
}

#endif
