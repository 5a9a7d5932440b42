"""Fit the float32 polynomials used by the compiled Box-Muller transform (csrc/cpu, csrc/cuda).

    log1p(f) ~ f + f^2 * R(f)          for f in [-1/3, 1/3]   (log of a mantissa in [2/3, 4/3))
    sin(pi/2 h) ~ h * S(h^2)           for h in [0, 1/2]
    cos(pi/2 h) ~ C(h^2)               for h in [0, 1/2]

Least squares on dense Chebyshev nodes with relative-error weights, in float64, then rounded to
float32; prints the coefficients (highest degree first, as Horner uses them) and the worst
relative error of the float32 Horner evaluation over a dense grid. Run: python fit_box_muller_polys.py
"""
import numpy as np


def cheb_nodes(a, b, n=20000):
    t = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    return (a + b) / 2 + (b - a) / 2 * t


def fit(x, target, basis_power, degree, weight):
    # target ~ sum_i c_i x^i  (i = 0..degree), weighted least squares
    A = np.stack([x**i for i in range(degree + 1)], axis=1) * weight[:, None]
    c, *_ = np.linalg.lstsq(A, target * weight, rcond=None)
    return c[::-1].astype(np.float32)  # highest first


def horner32(c, x):
    x = x.astype(np.float32)
    acc = np.full_like(x, c[0])
    for ci in c[1:]:
        acc = (acc * x + np.float32(ci)).astype(np.float32)
    return acc


def main():
    f = cheb_nodes(-1 / 3, 1 / 3)
    f = f[np.abs(f) > 1e-6]
    r_target = (np.log1p(f) - f) / f**2
    for deg in range(6, 10):
        R = fit(f, r_target, 1, deg, np.abs(f**2 / np.log1p(f)))
        g = np.linspace(-1 / 3, 1 / 3, 200001).astype(np.float32)
        g = g[g != 0]
        val = g + g * g * horner32(R, g)
        err = np.max(np.abs(val - np.log1p(g.astype(np.float64))) / np.abs(np.log1p(g.astype(np.float64))))
        print(f"log1p R deg {deg}: max rel err {err:.2e}  coeffs {[float(v) for v in R]}")
    h = cheb_nodes(1e-4, 0.5)
    s_target = np.sin(np.pi / 2 * h) / h
    c_target = np.cos(np.pi / 2 * h)
    for deg in range(3, 6):
        S = fit(h * h, s_target, 1, deg, 1 / s_target)
        C = fit(h * h, c_target, 1, deg, 1 / c_target)
        g = np.linspace(0, 0.5, 200001).astype(np.float32)[1:]
        g2 = (g * g).astype(np.float32)
        es = np.max(np.abs(g * horner32(S, g2) - np.sin(np.pi / 2 * g.astype(np.float64))) / np.sin(np.pi / 2 * g.astype(np.float64)))
        ec = np.max(np.abs(horner32(C, g2) - np.cos(np.pi / 2 * g.astype(np.float64))) / np.cos(np.pi / 2 * g.astype(np.float64)))
        print(f"sin S deg {deg}: {es:.2e} {[float(v) for v in S]}")
        print(f"cos C deg {deg}: {ec:.2e} {[float(v) for v in C]}")


if __name__ == "__main__":
    main()
