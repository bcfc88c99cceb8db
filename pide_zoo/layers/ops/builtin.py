"""The paper's four operators (Sections 3 and 4.2-4.4), as rows of the operator table.

Each binds to (a, b, pair, value): w = a W(x), dw/dx = a b Wd(x), with lambda, the constant and the embedding
scale sigma (the kernel of theta / sigma, phi / sigma) folded into a, b and W so that the tiles keep the unscaled
x: a gains sigma^power for the power kernels, the log kernel's gamma loses log sigma^2, lambda / sigma^2
multiplies the dot products.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

EULER_GAMMA = 0.5772156649015329
_LN2 = math.log(2.0)


def inverse_power(d2: Tensor, power: float, inplace: bool = False) -> Tensor:
    """d2^(-power/2) = |d|^-power, with rsqrt and integer powers where the exponent allows."""
    if float(power).is_integer():
        p = int(power)
        base = (d2.rsqrt_() if inplace else d2.rsqrt()) if p % 2 else (d2.reciprocal_() if inplace else d2.reciprocal())
        e = p if p % 2 else p // 2
        return base if e == 1 else (base.pow_(e) if inplace else base.pow(e))
    return d2.pow_(-power / 2) if inplace else d2.pow(-power / 2)


def _frac_constant(s: float, n: int) -> float:
    return 4 ** s * math.gamma(n / 2 + s) / (math.pi ** (n / 2) * abs(math.gamma(-s)))


def _inv_frac_constant(s: float, n: int) -> float:
    return math.gamma(n / 2 - s) / (4 ** s * math.pi ** (n / 2) * math.gamma(s))


def _log_constant(s: float, n: int) -> float:
    return 1.0 / ((4 * math.pi) ** (n / 2) * math.gamma(n / 2))


Bound = Tuple[float, float, Callable, Callable]


def _bind_diffusion(s: Optional[float], n: int, lam: float, kernel: str, embed_scale: float) -> Bound:
    lam = lam / embed_scale ** 2
    if kernel == 'embedded_gaussian':  # W = exp(lam x), dW/dx = lam W
        def pair(x, derivative, out=None):
            w = x.mul_(lam).exp_()
            return w, (w if derivative else None)
        return 1.0, lam, pair, lambda x: torch.exp(lam * x)
    return lam, 1.0, lambda x, derivative, out=None: (x, None), lambda x: x  # W = x, dW/dx = 1


def _bind_power(constant: Callable[[float, int], float], sign: int):
    def bind(s, n, lam, kernel, embed_scale) -> Bound:
        power = n + sign * 2 * s

        def pair(x, derivative, out=None):
            inv = torch.reciprocal(x, out=out) if derivative else None  # 1/x, before x is overwritten
            w = inverse_power(x, power, inplace=True)
            return w, (inv.mul_(w) if derivative else None)  # d/dx x^(-p/2) = -(p/2) x^(-p/2) / x
        return lam * constant(s, n) * embed_scale ** power, -power / 2, pair, lambda x: inverse_power(x, power)
    return bind


def _bind_log(s, n, lam, kernel, embed_scale) -> Bound:
    # -2 log|d| - gamma = -log x - gamma = -ln 2 (log2 x + gamma / ln 2): -ln 2 goes into a, since log2 is the
    # cheaper transcendental on CPUs (the tiles' dominant pass) and the sign costs no pass; d/dx = -1/x.
    shift = (EULER_GAMMA - 2 * math.log(embed_scale)) / _LN2

    def pair(x, derivative, out=None):
        inv = torch.reciprocal(x, out=out) if derivative else None
        return x.log2_().add_(shift), inv
    return -lam * _log_constant(s, n) * _LN2, 1.0 / _LN2, pair, lambda x: x.log2().add(shift)


def _check_frac(s: float, n: int) -> Optional[str]:
    return None if 0 < s < 1 else 's must satisfy 0 < s < 1'


def _check_inv_frac(s: float, n: int) -> Optional[str]:
    return None if 0 < s < n / 2 else f's must satisfy 0 < s < n/2 = {n / 2}'


def _check_log(s: float, n: int) -> Optional[str]:
    return None if s == n / 2 else f's must equal n/2 = {n / 2}'


# Keyword arguments of the table's rows. tau: the 'width' scale's length unit tau sqrt(E), chosen with
# benchmarks/bench_init.py (docs: operators, "The width-aware kernel scale").
OPERATORS = (
    dict(name='diffusion', variable='dot', form='difference', constant=1.0, kernels=('dot', 'embedded_gaussian'),
         aliases=('nonlocal_diffusion', 'L'), bind_builtin=_bind_diffusion,
         formula='x (`dot`: w = λx); `embedded_gaussian`: w = exp(λx)'),
    dict(name='frac_laplacian', variable='distance', form='negated_difference',
         constant=lambda s, n: _frac_constant(s, n), tau=1.5, singular=True,
         aliases=('fractional_laplacian', 'frac', '(-Delta)^s', '(-Delta)^{1/2}'),
         order=(lambda n: 0.5, _check_frac), bind_builtin=_bind_power(_frac_constant, 1),
         formula='x^−(n+2s)/2'),
    dict(name='inv_frac_laplacian', variable='distance', form='sum',
         constant=lambda s, n: _inv_frac_constant(s, n), tau=1.5, singular=True,
         aliases=('inverse_fractional_laplacian', 'invfrac', 'inv_frac', 'riesz', '(-Delta)^-s', '(-Delta)^{-1/2}'),
         order=(lambda n: 0.5, _check_inv_frac), bind_builtin=_bind_power(_inv_frac_constant, -1),
         formula='x^−(n−2s)/2'),
    dict(name='log', variable='distance', form='sum', constant=lambda s, n: _log_constant(s, n), tau=1.0,
         singular=True, aliases=('log_kernel', 'inv_laplacian', '(-Delta)^-1', '(-Delta)^{-1}'),
         order=(lambda n: n / 2, _check_log), bind_builtin=_bind_log, formula='−log x − γ'),
)
