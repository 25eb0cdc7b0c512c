/* GroupNorm fused with exact GELU, for channels-last float32 tensors on the CPU.
 *
 * Built at first use by moelab.diffusion.fused_norm (the system C compiler, -O3 -march=native)
 * and called through ctypes. A channels-last [N, C, H, W] tensor is [N][HW][C] in memory, and
 * PyTorch's channels-last GroupNorm backward runs 2-4x slower than its NCHW kernel; here every pass
 * runs along C, which the compiler vectorises, and the norm, the GELU, the residual add and the
 * routing weight of MoEFsDiC's experts happen in one pass over the activations instead of four.
 *
 * mode 0: y = gn(x)
 * mode 1: y = gelu(gn(x))
 * mode 2: y = gelu(gn(x) + res) * wrow[n]       (the expert's tail: residual, GELU, routing weight)
 *
 * Statistics and gradient sums accumulate in double; the normalisation is PyTorch's
 * (y = x * rstd * gamma + (beta - mean * rstd * gamma)). GELU and its derivative are exact to
 * float rounding (rational approximations in moelab_kernels.h, written so that the loops
 * vectorise: no libm calls). Work splits over rows (H*W) between OpenMP threads with a fixed
 * partition and fixed-order reduction: the result depends on the thread count, not on the run.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moelab_kernels.h"

/* mean and rstd of sample xn's groups (double sums over fixed per-thread row ranges, reduced in
 * thread order); part: 2 * C * nt doubles of scratch */
static void group_stats(const float* xn, int64_t HW, int64_t C, int64_t G, float eps, double* part, int nt, float* mean,
                        float* rstd) {
  int64_t cg = C / G;
  double M = (double)HW * (double)cg;
  memset(part, 0, sizeof(double) * 2 * C * nt); /* slots of threads the team did not get stay 0 */
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t, T;
    thread_in_team(&t, &T);
    double* s = part + 2 * C * t;
    double* q = s + C;
    for (int64_t i = lo(HW, t, T); i < lo(HW, t + 1, T); ++i) {
      const float* xr = xn + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        double v = xr[c];
        s[c] += v;
        q[c] += v * v;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    double ss = 0, qq = 0;
    for (int t = 0; t < nt; ++t) {
      const double* s = part + 2 * C * t;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) { ss += s[c]; qq += s[C + c]; }
    }
    double m = ss / M, var = qq / M - m * m;
    if (var < 0) var = 0;
    mean[g] = (float)m;
    rstd[g] = (float)(1.0 / __builtin_sqrt(var + (double)eps));
  }
}

/* have_stats: mean and rstd are given (as an earlier call returned them), not computed: the
 * recomputation in backward needs no statistics pass. out_rows (mode 2 only, else NULL): out is a
 * larger [*][HW][C] accumulator and sample n's result is added to its sample out_rows[n] -- grouped
 * dispatch's sum of the experts' weighted outputs, made without a fresh output per expert and a
 * second pass to add it. */
int moelab_gn_act_forward(const float* x, const float* gamma, const float* beta, int64_t N, int64_t HW, int64_t C,
                          int64_t G, float eps, int mode, const float* res, const float* wrow, float* out, float* mean,
                          float* rstd, int have_stats, const int64_t* out_rows, int nt) {
  if (nt < 1) nt = 1;
  double* part = malloc(sizeof(double) * 2 * C * nt);
  float* coef = malloc(sizeof(float) * 2 * C);
  if (!part || !coef) { free(part); free(coef); return 1; }
  float* scale = coef;
  float* shift = coef + C;
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * HW * C;
    if (!have_stats) group_stats(xn, HW, C, G, eps, part, nt, mean + n * G, rstd + n * G);
    affine(mean, rstd, gamma, beta, n, C, G, scale, shift);
    float* on = out + (out_rows ? out_rows[n] : n) * HW * C;
    const float* rn = res ? res + n * HW * C : 0;
    float wn = wrow ? wrow[n] : 1.f;
    const int accumulate = out_rows != 0;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t i = 0; i < HW; ++i) {
      const float* xr = xn + i * C;
      float* o = on + i * C;
      if (mode == 0) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = xr[c] * scale[c] + shift[c];
      } else if (mode == 1) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = gelu_f(xr[c] * scale[c] + shift[c]);
      } else if (accumulate) {
        const float* rr = rn + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] += gelu_f(xr[c] * scale[c] + shift[c] + rr[c]) * wn;
      } else {
        const float* rr = rn + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = gelu_f(xr[c] * scale[c] + shift[c] + rr[c]) * wn;
      }
    }
  }
  free(part);
  free(coef);
  return 0;
}

/* Gradients of moelab_gn_act_forward. dx always; dgamma/dbeta/gres/gw/dxsum where not NULL (gres:
 * mode 2's gradient at the residual input, gw: at wrow, dxsum: dx summed over samples and pixels,
 * i.e. the bias gradient of a 1x1 conv whose output x is). mode 2 needs gres (it holds the gradient
 * at gn's output between the two passes). grad_rows (or NULL): gy is a larger [*][HW][C] tensor and
 * sample n's output gradient is its sample grad_rows[n] (forward's out_rows). given (mode 1 only, or
 * NULL): the first pass was made elsewhere (depthwise.c's through_gelu): dx already holds the
 * gradient taken through the GELU and given its per-sample sums ([N][2][C], double); gy is unused. */
int moelab_gn_act_backward(const float* gy, const float* x, const float* mean, const float* rstd, const float* gamma,
                           const float* beta, int64_t N, int64_t HW, int64_t C, int64_t G, int mode, const float* res,
                           const float* wrow, float* dx, float* dgamma, float* dbeta, float* gres, float* gw,
                           float* dxsum, const int64_t* grad_rows, const double* given, int nt) {
  if (nt < 1) nt = 1;
  if (mode == 2 && !gres) return 2;
  if (given && mode != 1) return 3;
  int64_t cg = C / G;
  double M = (double)HW * (double)cg;
  double* part = malloc(sizeof(double) * (2 * C + 1) * nt);
  double* sums = malloc(sizeof(double) * 3 * C); /* gradient sums, then dx's column sums */
  float* coef = malloc(sizeof(float) * 5 * C);
  if (!part || !sums || !coef) { free(part); free(sums); free(coef); return 1; }
  double* colsum = sums + 2 * C;
  memset(colsum, 0, sizeof(double) * C);
  float *scale = coef, *shift = coef + C, *c1 = coef + 2 * C, *c2 = coef + 3 * C, *c3 = coef + 4 * C;
  if (dgamma) memset(dgamma, 0, sizeof(float) * C);
  if (dbeta) memset(dbeta, 0, sizeof(float) * C);
  for (int64_t n = 0; n < N; ++n) {
    affine(mean, rstd, gamma, beta, n, C, G, scale, shift);
    const float* xn = x + n * HW * C;
    const float* gn = gy + (grad_rows ? grad_rows[n] : n) * HW * C;
    const float* rn = res ? res + n * HW * C : 0;
    float* gsn = gres ? gres + n * HW * C : 0;
    float wn = wrow ? wrow[n] : 1.f;
    memset(part, 0, sizeof(double) * (2 * C + 1) * nt);
    if (given) memcpy(part, given + 2 * C * n, sizeof(double) * 2 * C); /* as thread 0's sums */
#pragma omp parallel num_threads(nt) if (nt > 1 && !given)
    if (!given) {
      int t, T;
      thread_in_team(&t, &T);
      double* sg = part + (2 * C + 1) * t;
      double* sgx = sg + C;
      double acc = 0;
      for (int64_t i = lo(HW, t, T); i < lo(HW, t + 1, T); ++i) {
        const float* xr = xn + i * C;
        const float* gr = gn + i * C;
        if (mode == 0) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            double g = gr[c];
            sg[c] += g;
            sgx[c] += g * xr[c];
          }
        } else if (mode == 1) {
          float* gs = dx + (n * HW + i) * C; /* GELU's gradient, kept in dx for the second pass */
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            float g = gr[c] * gelu_d(xr[c] * scale[c] + shift[c]);
            gs[c] = g;
            sg[c] += g;
            sgx[c] += (double)g * xr[c];
          }
        } else {
          const float* rr = rn + i * C;
          float* gs = gsn + i * C;
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < C; ++c) {
            float s = xr[c] * scale[c] + shift[c] + rr[c], d;
            acc += (double)(gelu_fd(s, &d) * gr[c]);
            float g = gr[c] * wn * d;
            gs[c] = g;
            sg[c] += g;
            sgx[c] += (double)g * xr[c];
          }
        }
      }
      sg[2 * C] = acc;
    }
    memset(sums, 0, sizeof(double) * 2 * C);
    double gwn = 0;
    for (int t = 0; t < nt; ++t) {
      const double* p = part + (2 * C + 1) * t;
      for (int64_t c = 0; c < 2 * C; ++c) sums[c] += p[c];
      gwn += p[2 * C];
    }
    const double* sg = sums;
    const double* sgx = sums + C;
    for (int64_t g = 0; g < G; ++g) {
      double ds = 0, db = 0, m = mean[n * G + g], r = rstd[n * G + g];
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        double ga = gamma ? gamma[c] : 1.0;
        ds += ga * sgx[c];
        db += ga * sg[c];
        if (dbeta) dbeta[c] += (float)sg[c];
        if (dgamma) dgamma[c] += (float)((sgx[c] - m * sg[c]) * r);
      }
      double k2 = (db * m - ds) * r * r * r / M, k3 = -k2 * m - db * r / M;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        c1[c] = (float)(r * (gamma ? gamma[c] : 1.0));
        c2[c] = (float)k2;
        c3[c] = (float)k3;
      }
    }
    if (gw) gw[n] = (float)gwn;
    float* dn = dx + n * HW * C;
    if (dxsum) memset(part, 0, sizeof(double) * (2 * C + 1) * nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      int t, T;
      thread_in_team(&t, &T);
      double* ps = part + (2 * C + 1) * t;
    for (int64_t i = lo(HW, t, T); i < lo(HW, t + 1, T); ++i) {
      const float* xr = xn + i * C;
      float* d = dn + i * C;
      if (mode == 0) {
        const float* gr = gn + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) d[c] = gr[c] * c1[c] + xr[c] * c2[c] + c3[c];
      } else if (mode == 1) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) d[c] = d[c] * c1[c] + xr[c] * c2[c] + c3[c];
      } else {
        const float* gr = gsn + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) d[c] = gr[c] * c1[c] + xr[c] * c2[c] + c3[c];
      }
      if (dxsum) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ps[c] += d[c];
      }
    }
    }
    if (dxsum)
      for (int t = 0; t < nt; ++t)
        for (int64_t c = 0; c < C; ++c) colsum[c] += part[(2 * C + 1) * t + c];
  }
  if (dxsum)
    for (int64_t c = 0; c < C; ++c) dxsum[c] = (float)colsum[c];
  free(part);
  free(sums);
  free(coef);
  return 0;
}
