"""Fit, and check, the rational GELU of moelab's CPU kernels (`src/moelab/diffusion/moelab_kernels.h`).

Why: exact GELU is MoEFsDiC's activation and its experts evaluate it about five times per value
and expert call in a training step. The Abramowitz & Stegun erf the kernels first used needs an
``exp`` and a division per value (about 27 cycles per sixteen values with AVX-512); a rational
function of ``a = |s|`` for the Gaussian tail needs one division and ~15 multiply-adds (2.3x faster
in cache), and one for the derivative's tail replaces the ``exp`` in backward too:

    gelu(s)  = s - s * c(a)  (s >= 0),   s * c(a)  (s < 0),   c(a) = 0.5 * erfc(a / sqrt(2))
    gelu'(s) = 1 + h(a)      (s >= 0),  -h(a)      (s < 0),   h(a) = a * phi(a) - c(a)

Each is fitted on ``[0, 5.6]`` (beyond it c < 1.1e-8 and both are taken as 0) by linearised least
squares with Lawson's weights (towards the minimax fit), then the coefficients are rounded to
float32 one at a time from the lowest degree up, the higher ones refitted after each rounding, so
that the rounding leaves no systematic error (rounding them all at once left a mean error of
-1.4e-8 in c, which sums up in the routing weights' gradients). Prints the header's two functions
and their float32 accuracy (Horner in float32, as the C code evaluates them) against float64. The
monomial basis is ill-conditioned, so another BLAS can land a coefficient on the neighbouring
float32; the header holds this script's fit on the machine it was made on, and the tests check the
kernels' GELU and its derivative against float64 (tests/test_diffusion_fused_norm.py).

    python bench/gelu_fit.py
"""

from __future__ import annotations

import argparse
import math

import numpy as np

TAIL_A = 5.6


def _targets(a: np.ndarray) -> dict[str, np.ndarray]:
    c = np.array([0.5 * math.erfc(v / math.sqrt(2.0)) for v in a])
    phi = np.exp(-a * a / 2.0) / math.sqrt(2.0 * math.pi)
    return {"c": c, "h": a * phi - c}


def fit(y: np.ndarray, a: np.ndarray, n_p: int, n_q: int, iterations: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Numerator (``n_p + 1``) and denominator (``n_q + 1``, constant 1) coefficients, lowest degree
    first, float32-representable, of a rational fit of ``y(a)`` with small maximal error."""
    basis = np.hstack([np.vander(a, n_p + 1, increasing=True), -y[:, None] * np.vander(a, n_q + 1, increasing=True)[:, 1:]])
    scale = np.abs(basis).max(0)

    def solve(w: np.ndarray, fixed: dict[int, float]) -> np.ndarray:
        m, rhs = basis * w[:, None], y * w
        free = [i for i in range(basis.shape[1]) if i not in fixed]
        for i, v in fixed.items():
            rhs = rhs - m[:, i] * v
        sol = np.linalg.lstsq(m[:, free] / scale[free], rhs, rcond=None)[0]
        x = np.zeros(basis.shape[1])
        x[list(fixed)] = list(fixed.values())
        x[free] = sol / scale[free]
        return x

    def error(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.polyval(np.concatenate([[1.0], x[n_p + 1:]])[::-1], a)
        return np.polyval(x[: n_p + 1][::-1], a) / q - y, q

    lawson, q_prev = np.ones_like(a), np.ones_like(a)
    best = None
    for it in range(iterations):
        e, q = error(solve(lawson / q_prev, {}))
        if (q > 0).all() and (best is None or np.abs(e).max() < best[0]):
            best = (np.abs(e).max(), lawson.copy(), q_prev.copy())
        q_prev = q
        if it >= 10:
            lawson = np.maximum(lawson * np.abs(e), 1e-14)
            lawson /= lawson.max()
    assert best is not None, "no fit with a positive denominator"
    _, lawson, q_prev = best
    fixed: dict[int, float] = {}
    for i in [*range(n_p + 1), *range(n_p + 1, basis.shape[1])]:  # lowest degrees first
        fixed[i] = float(np.float32(solve(lawson / q_prev, fixed)[i]))
    x = np.array([fixed[i] for i in range(basis.shape[1])])
    return x[: n_p + 1], np.concatenate([[1.0], x[n_p + 1:]])


def _horner32(coef: np.ndarray, m: np.ndarray) -> np.ndarray:
    r = np.full_like(m, np.float32(coef[-1]))
    for c in coef[-2::-1]:
        r = r * m + np.float32(c)
    return r


def _c_source(name: str, p: np.ndarray, q: np.ndarray) -> str:
    def poly(coef: np.ndarray) -> str:
        s = f"{float(coef[-1]):.9e}f"
        for c in coef[-2::-1]:
            s = f"({s}) * m {'+' if c >= 0 else '-'} {abs(float(c)):.9e}f"
        return s

    return f"static inline float gelu_{name}(float m) {{\n  float p = {poly(p)};\n  float q = {poly(q)};\n  return p / q;\n}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=30000, help="fitting grid on [0, 5.6]")
    args = ap.parse_args()
    a = np.linspace(0.0, TAIL_A, args.points)
    coef = {}
    for name, (n_p, n_q) in (("c", (6, 8)), ("h", (7, 8))):
        p, q = fit(_targets(a)[name], a, n_p, n_q)
        coef[name] = (p, q)
        print(_c_source(name, p, q))
    # float32 evaluation as the kernels do it, against float64
    s = np.linspace(-9.0, 9.0, 2_000_001).astype(np.float32)
    m = np.abs(s)
    inside = m < np.float32(TAIL_A)
    mc = np.minimum(m, np.float32(TAIL_A))
    c = np.where(inside, _horner32(coef["c"][0], mc) / _horner32(coef["c"][1], mc), np.float32(0))
    h = np.where(inside, _horner32(coef["h"][0], mc) / _horner32(coef["h"][1], mc), np.float32(0))
    gelu = np.where(s < 0, s * c, np.where(inside, s - s * c, s)).astype(np.float32)
    grad = np.where(s < 0, -h, np.float32(1) + h).astype(np.float32)
    s64 = s.astype(np.float64)
    t = _targets(np.abs(s64))
    ref_c = np.where(s64 < 0, t["c"], 1.0 - t["c"])
    ref = s64 * ref_c
    ref_grad = np.where(s64 < 0, -t["h"], 1.0 + t["h"])
    err, err_grad = gelu - ref, grad - ref_grad
    print(f"float32 on [-9, 9]: |gelu error| max {np.abs(err).max():.2e}, |gelu' error| max {np.abs(err_grad).max():.2e}")
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(s), 200_000)
    print(f"mean error over {len(pick)} uniform points: gelu {err[pick].mean():+.1e}, gelu' {err_grad[pick].mean():+.1e}")


if __name__ == "__main__":
    main()
