/* What moelab's CPU kernels (fused_norm.c, depthwise.c) share: the fixed split of work between
 * OpenMP threads, a GroupNorm's per-channel affine form, and exact GELU (erf from Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, and a
 * Cephes-style exp, written so that loops over them vectorise: no libm calls).
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

#define INV_SQRT2 0.70710678118654752f
#define INV_SQRT2PI 0.39894228040143268f

static inline float exp_f(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return y * scale;
}

/* erf(s / sqrt(2)) given e = exp(-s^2 / 2) */
static inline float erf_half(float s, float e) {
  float z = (s < 0.f ? -s : s) * INV_SQRT2;
  float t = 1.0f / (1.0f + 0.3275911f * z);
  float p = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  float v = 1.0f - p * e;
  return s < 0.f ? -v : v;
}

static inline float gelu_f(float s) {
  float e = exp_f(-0.5f * s * s);
  return 0.5f * s * (1.0f + erf_half(s, e));
}

static inline float gelu_d(float s) {
  float e = exp_f(-0.5f * s * s);
  return 0.5f * (1.0f + erf_half(s, e)) + s * INV_SQRT2PI * e;
}

/* gelu(s) and gelu'(s) from one exp and one erf */
static inline float gelu_fd(float s, float* d) {
  float e = exp_f(-0.5f * s * s);
  float cdf = 0.5f * (1.0f + erf_half(s, e));
  *d = cdf + s * INV_SQRT2PI * e;
  return s * cdf;
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
