/* Gradients of a 3x3 depthwise convolution (stride 1, padding 1, no dilation), for channels-last
 * float32 tensors on the CPU.
 *
 * Built at first use by moelab.diffusion.kernels (the system C compiler, -O3 -march=native) and
 * called through ctypes by moelab.diffusion.depthwise. A channels-last [N, C, H, W] tensor is
 * [N][H][W][C] in memory. oneDNN's depthwise backward on that layout computes the weight gradient
 * in a pass of its own and ran at 4-8 GB/s on a 2-core Xeon; here each output row of the input
 * gradient, and that row's share of the weight and bias gradients, are made from the three
 * neighbouring rows of the output gradient and of the input while they are in cache, sixteen
 * channels at a time with a sliding 3x3 window held in vector registers (GCC/Clang vector
 * extensions: AVX-512 registers with -march=native on such a CPU, narrower ones elsewhere).
 *
 *   gx[n][h][w][c] = add[n][h][w][c] + sum_{ky,kx} g[n][h+1-ky][w+1-kx][c] * wt[c][ky][kx]
 *   gw[c][ky][kx]  = sum_{n,h,w} g[n][h][w][c] * x[n][h+ky-1][w+kx-1][c]      (zero outside)
 *   gb[c]          = sum_{n,h,w} g[n][h][w][c]
 *
 * The weight and bias sums accumulate per row in float and across rows in double. Rows split
 * between OpenMP threads in fixed ranges and the threads' sums are added in thread order: the
 * result depends on the thread count, not on the run.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moelab_kernels.h"

#define VL 16 /* channels per vector */
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf ld(const float* p) {
  vf v;
  memcpy(&v, p, sizeof(v));
  return v;
}
static inline void st(float* p, vf v) { memcpy(p, &v, sizeof(v)); }

/* what a row or column outside the image reads (with stride 0) */
static const float ZERO[VL] __attribute__((aligned(64)));

/* Row h of one sample (gn, xn, gxn, addn: its [H][W][C] planes), channels [c0, c0 + VL).
 * acc: 10 x VL floats, the 9 weight-gradient taps and the bias gradient, added to (NULL: no sums).
 * gxn: the input gradient plane, or NULL. wt: the weights as [9][C]. */
static void row_block(const float* gn, const float* xn, const float* wt, const float* addn, int64_t H, int64_t W,
                      int64_t C, int64_t h, int64_t c0, float* acc, float* gxn, int into) {
  const float *xr[3], *gr[3];
  int64_t s[3];
  for (int i = 0; i < 3; ++i) { /* rows h - 1, h, h + 1 */
    int64_t hh = h + i - 1;
    int ok = hh >= 0 && hh < H;
    xr[i] = ok ? xn + hh * W * C + c0 : ZERO;
    gr[i] = ok ? gn + hh * W * C + c0 : ZERO;
    s[i] = ok ? C : 0;
  }
  /* the rows the next output row will read first: fetched while this one computes */
  const float* next_g = h + 2 < H ? gn + (h + 2) * W * C + c0 : NULL;
  const float* next_x = h + 2 < H ? xn + (h + 2) * W * C + c0 : NULL;
  const vf z = {0};
  if (acc) {
    vf a0 = ld(acc), a1 = ld(acc + VL), a2 = ld(acc + 2 * VL), a3 = ld(acc + 3 * VL), a4 = ld(acc + 4 * VL);
    vf a5 = ld(acc + 5 * VL), a6 = ld(acc + 6 * VL), a7 = ld(acc + 7 * VL), a8 = ld(acc + 8 * VL), b = ld(acc + 9 * VL);
    vf l0 = z, l1 = z, l2 = z;                          /* x at column w - 1 of rows h-1, h, h+1 */
    vf m0 = ld(xr[0]), m1 = ld(xr[1]), m2 = ld(xr[2]); /* column w */
    for (int64_t w = 0; w < W; ++w) {
      vf r0 = z, r1 = z, r2 = z; /* column w + 1 */
      if (w + 1 < W) {
        r0 = ld(xr[0] + (w + 1) * s[0]);
        r1 = ld(xr[1] + (w + 1) * s[1]);
        r2 = ld(xr[2] + (w + 1) * s[2]);
      }
      if (next_g) {
        __builtin_prefetch(next_g + w * C);
        __builtin_prefetch(next_x + w * C);
      }
      vf gv = ld(gr[1] + w * C);
      b += gv;
      a0 += gv * l0; a1 += gv * m0; a2 += gv * r0;
      a3 += gv * l1; a4 += gv * m1; a5 += gv * r1;
      a6 += gv * l2; a7 += gv * m2; a8 += gv * r2;
      l0 = m0; l1 = m1; l2 = m2;
      m0 = r0; m1 = r1; m2 = r2;
    }
    st(acc, a0); st(acc + VL, a1); st(acc + 2 * VL, a2); st(acc + 3 * VL, a3); st(acc + 4 * VL, a4);
    st(acc + 5 * VL, a5); st(acc + 6 * VL, a6); st(acc + 7 * VL, a7); st(acc + 8 * VL, a8); st(acc + 9 * VL, b);
  } else if (next_g) {
    for (int64_t w = 0; w < W; ++w) __builtin_prefetch(next_g + w * C);
  }
  if (gxn) {
    vf w0 = ld(wt + 0 * C + c0), w1 = ld(wt + 1 * C + c0), w2 = ld(wt + 2 * C + c0), w3 = ld(wt + 3 * C + c0);
    vf w4 = ld(wt + 4 * C + c0), w5 = ld(wt + 5 * C + c0), w6 = ld(wt + 6 * C + c0), w7 = ld(wt + 7 * C + c0);
    vf w8 = ld(wt + 8 * C + c0);
    vf l0 = z, l1 = z, l2 = z; /* g at column w - 1 of rows h-1, h, h+1 */
    vf m0 = ld(gr[0]), m1 = ld(gr[1]), m2 = ld(gr[2]);
    float* out = gxn + h * W * C + c0;
    const float* add = addn ? addn + h * W * C + c0 : NULL;
    for (int64_t w = 0; w < W; ++w) {
      vf r0 = z, r1 = z, r2 = z;
      if (w + 1 < W) {
        r0 = ld(gr[0] + (w + 1) * s[0]);
        r1 = ld(gr[1] + (w + 1) * s[1]);
        r2 = ld(gr[2] + (w + 1) * s[2]);
      }
      /* row h+1 meets tap row 0, row h-1 tap row 2; column w+1 meets tap column 0. A balanced
       * sum: nine chained additions would make each column wait on the previous one */
      vf o = ((r2 * w0 + m2 * w1) + (l2 * w2 + r1 * w3)) + ((m1 * w4 + l1 * w5) + (r0 * w6 + m0 * w7)) + l0 * w8;
      if (add) o += ld(add + w * C);
      if (into) o = ld(out + w * C) + o;
      st(out + w * C, o);
      l0 = m0; l1 = m1; l2 = m2;
      m0 = r0; m1 = r1; m2 = r2;
    }
  }
}

/* The input gradient of one row (h) of sample n, just written (gxr, [W][C], in cache), taken on
 * through a GELU whose input is act_x * scale + shift (per channel): gxr = gxr * gelu'(.), and the
 * row's sums of that gradient and of it times act_x, per channel, added to sg and sgx -- the first
 * pass of fused_norm.c's GELU(GroupNorm) backward, made here instead of in a pass of its own. */
static void through_gelu(float* gxr, const float* xr, const float* scale, const float* shift, int64_t W, int64_t C,
                         float* rs, double* sg, double* sgx) {
  memset(rs, 0, sizeof(float) * 2 * C);
  for (int64_t w = 0; w < W; ++w) {
    float* o = gxr + w * C;
    const float* b = xr + w * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float v = o[c] * gelu_d(b[c] * scale[c] + shift[c]);
      o[c] = v;
      rs[c] += v;
      rs[C + c] += v * b[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sg[c] += rs[c];
    sgx[c] += rs[C + c];
  }
}

/* g, x (and add, if given): [N][H][W][C]; w: [C][3][3]. Writes gx ([N][H][W][C], the input
 * gradient plus add), gw ([C][3][3]) and gb ([C]), each only where not NULL. gx_rows (or NULL): gx
 * is a larger [*][H][W][C] tensor and sample n's input gradient (plus add) is added to its sample
 * gx_rows[n] (grouped dispatch's gradient at the gathered input; the rows must be distinct).
 * act_x (or NULL; needs gx, no gx_rows): x was GELU(GroupNorm(act_x)) with G groups, statistics
 * act_mean, act_rstd ([N][G]) and affine parameters act_gamma, act_beta ([C] or NULL), and gx is
 * taken on through that GELU as it is written (`through_gelu`), its per-sample sums going to
 * act_sums ([N][2][C], double).
 * Returns 0; 1 when C is not a multiple of 16; 2 when out of memory; 3 for act_x without gx or
 * with gx_rows. */
int moelab_dw3_backward(const float* g, const float* x, const float* w, const float* add, int64_t N, int64_t H,
                        int64_t W, int64_t C, float* gx, float* gw, float* gb, const int64_t* gx_rows,
                        const float* act_x, const float* act_mean, const float* act_rstd, const float* act_gamma,
                        const float* act_beta, int64_t G, double* act_sums, int nt) {
  if (C % VL) return 1;
  if (act_x && (!gx || gx_rows || !act_mean || !act_rstd || !act_sums || G < 1 || C % G)) return 3;
  if (nt < 1) nt = 1;
  const int64_t A = 10 * C; /* one row's sums: [C / VL][10][VL] */
  const int sums = gw || gb;
  float* wt = gx ? malloc(sizeof(float) * 9 * C) : NULL;
  double* part = sums ? calloc((size_t)(A * nt), sizeof(double)) : NULL;
  double* apart = act_x ? calloc((size_t)(2 * C * N * nt), sizeof(double)) : NULL; /* [nt][N][2][C] */
  float* act_ss = act_x ? malloc(sizeof(float) * 2 * C * N) : NULL; /* per sample: scale [C], shift [C] */
  if ((gx && !wt) || (sums && !part) || (act_x && (!apart || !act_ss))) {
    free(wt);
    free(part);
    free(apart);
    free(act_ss);
    return 2;
  }
  if (act_x)
    for (int64_t n = 0; n < N; ++n) affine(act_mean, act_rstd, act_gamma, act_beta, n, C, G, act_ss + 2 * C * n, act_ss + 2 * C * n + C);
  if (wt)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < 9; ++k) wt[k * C + c] = w[c * 9 + k];
  int fail = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t, T;
    thread_in_team(&t, &T);
    float* acc = sums ? malloc(sizeof(float) * A) : NULL;
    float* rs = act_x ? malloc(sizeof(float) * 2 * C) : NULL;
    if ((sums && !acc) || (act_x && !rs)) {
#pragma omp atomic write
      fail = 1;
    } else {
      double* d = sums ? part + A * t : NULL;
      const int64_t plane = H * W * C;
      for (int64_t r = lo(N * H, t, T); r < lo(N * H, t + 1, T); ++r) {
        int64_t n = r / H, h = r % H;
        if (acc) memset(acc, 0, sizeof(float) * A);
        for (int64_t c0 = 0; c0 < C; c0 += VL)
          row_block(g + n * plane, x + n * plane, wt, add ? add + n * plane : NULL, H, W, C, h, c0,
                    acc ? acc + 10 * c0 : NULL, gx ? gx + (gx_rows ? gx_rows[n] : n) * plane : NULL, gx_rows != NULL);
        if (acc) {
#pragma omp simd
          for (int64_t i = 0; i < A; ++i) d[i] += acc[i];
        }
        if (act_x) {
          double* as = apart + 2 * C * (N * t + n);
          through_gelu(gx + n * plane + h * W * C, act_x + n * plane + h * W * C, act_ss + 2 * C * n, act_ss + 2 * C * n + C, W,
                       C, rs, as, as + C);
        }
      }
    }
    free(acc);
    free(rs);
  }
  if (act_x && !fail)
    for (int64_t i = 0; i < 2 * C * N; ++i) {
      double sum = 0;
      for (int t = 0; t < nt; ++t) sum += apart[2 * C * N * t + i];
      act_sums[i] = sum;
    }
  free(apart);
  free(act_ss);
  if (sums && !fail)
    for (int64_t c0 = 0; c0 < C; c0 += VL)
      for (int64_t k = 0; k < 10; ++k)
        for (int64_t j = 0; j < VL; ++j) {
          double sum = 0;
          for (int t = 0; t < nt; ++t) sum += part[A * t + 10 * c0 + k * VL + j];
          if (k < 9 && gw) gw[(c0 + j) * 9 + k] = (float)sum;
          if (k == 9 && gb) gb[c0 + j] = (float)sum;
        }
  free(wt);
  free(part);
  return fail ? 2 : 0;
}
