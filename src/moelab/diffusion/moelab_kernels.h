/* What moelab's CPU kernels (fused_norm.c, depthwise.c) share: the fixed split of work between
 * OpenMP threads, a GroupNorm's per-channel affine form, and exact GELU and its derivative (rational
 * approximations, written so that loops over them vectorise: no libm calls).
 * moelab.diffusion.kernels keys its build cache on this header as well as on each source, so a
 * change here rebuilds both. */
#ifndef MOELAB_KERNELS_H
#define MOELAB_KERNELS_H

#include <stdint.h>
#include <string.h>
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

/* Exact GELU, gelu(s) = s * Phi(s), and its derivative Phi(s) + s * phi(s), without exp, erf or
 * libm calls, so that loops over them vectorise. With a = |s| and the Gaussian tail
 * c(a) = Phi(-a) = 0.5 * erfc(a / sqrt(2)):
 *   gelu(s)  = s - s * c(a)  (s >= 0),  s * c(a)  (s < 0)
 *   gelu'(s) = 1 + h(a)      (s >= 0), -h(a)      (s < 0),  h(a) = a * phi(a) - c(a)
 * c and h are rational functions of a on [0, GELU_TAIL_A] (numerator / denominator degrees 6 / 8
 * for c, 7 / 8 for h; fitted for this file by Lawson-weighted linearised least squares against
 * double-precision erfc and exp, the coefficients then rounded to float32 one at a time from the
 * lowest degree up, refitting the higher ones, so that the rounding leaves no systematic error:
 * below 5.5e-9 for c and 1.2e-8 for h in exact arithmetic); beyond GELU_TAIL_A, c < 1.1e-8 and both
 * are taken as 0. In float32 on [-9, 9]: |gelu error| < 3.5e-7 (relative 1.4e-7 for s > 0),
 * |gelu' error| < 4.3e-7, mean errors over N(0.3, 1) inputs 5e-12 / 4e-12; the Abramowitz & Stegun
 * 7.1.26 erf with an exp used before had 4.7e-7 / 2.8e-7 and a mean gelu error of -2.7e-9,
 * PyTorch's own GELU 1.1e-6. One division per function instead of an exp, a division and the erf
 * polynomial: in cache gelu 1.9-2.4x and gelu' 2.2-2.8x as fast, both together 1.1-1.4x (two
 * divisions). bench/gelu_fit.py refits the coefficients and checks them. NaN stays NaN;
 * gelu(+inf) = inf, gelu(-inf) = NaN, gelu'(+-inf) = 1 / 0. */
#define GELU_TAIL_A 5.6f
static inline float gelu_c(float m) {
  float p = ((((((2.415010931e-05f) * m - 7.468143012e-04f) * m + 9.679076262e-03f) * m - 6.733710319e-02f) * m
      + 2.653709054e-01f) * m - 5.620198250e-01f) * m + 5.000000000e-01f;
  float q = ((((((((2.269394827e-05f) * m + 7.006766828e-05f) * m + 3.881631419e-04f) * m
      - 8.053049096e-04f) * m + 2.159929089e-02f) * m - 5.189397186e-02f) * m + 2.705194056e-01f) * m
      - 3.261557221e-01f) * m + 1.000000000e+00f;
  return p / q;
}
static inline float gelu_h(float m) {
  float p = (((((((2.291072997e-05f) * m - 7.652982604e-04f) * m + 1.081066206e-02f) * m
      - 8.313231915e-02f) * m + 3.713833690e-01f) * m - 9.423571825e-01f) * m + 1.195681453e+00f) * m
      - 5.000000000e-01f;
  float q = ((((((((1.146145805e-04f) * m - 1.268477761e-03f) * m + 8.607226424e-03f) * m
      - 3.641365469e-02f) * m + 1.225641295e-01f) * m - 2.933158278e-01f) * m + 6.151634455e-01f) * m
      - 7.955954075e-01f) * m + 1.000000000e+00f;
  return p / q;
}
static inline float gelu_f(float s) {
  float a = s < 0.f ? -s : s;
  int in = a < GELU_TAIL_A;
  float c = in ? gelu_c(a) : 0.f;
  return s < 0.f ? s * c : (in ? s - s * c : s);
}
static inline float gelu_d(float s) {
  float a = s < 0.f ? -s : s;
  float h = a < GELU_TAIL_A ? gelu_h(a) : 0.f;
  return s < 0.f ? -h : (s >= 0.f ? 1.f + h : s);
}
/* gelu(s), and gelu'(s) into *d */
static inline float gelu_fd(float s, float* d) {
  *d = gelu_d(s);
  return gelu_f(s);
}
/* per-channel scale and shift of sample n: y = x * scale + shift */
static inline void affine(const float* mean, const float* rstd, const float* gamma, const float* beta, int64_t n, int64_t C,
                   int64_t G, float* scale, float* shift) {
  int64_t cg = C / G;
  for (int64_t c = 0; c < C; ++c) {
    float m = mean[n * G + c / cg], r = rstd[n * G + c / cg];
    float sc = gamma ? r * gamma[c] : r;
    scale[c] = sc;
    shift[c] = (beta ? beta[c] : 0.f) - m * sc;
  }
}

#endif
