"""The operator table: what each PIDE operator is, in one place.

An :class:`Operator` holds an operator's names, its order s (allowed and default), its constant, the width
scale tau of ``kernel_scale='width'``, its aggregate form, and its kernel W as a function of x with the
derivative dW/dx: x = |theta_i - phi_j|^2 for the distance kernels, x = theta_i . phi_j for diffusion's. The
checks, the dense, low-rank and fused paths, the blocks, the heads and the FLOP counter read it, and
:func:`register_operator` adds a kernel from outside the package.

The aggregate of one stage is (1/N) sum_j w_ij F_ij with w_ij = lam c W(x_ij) and, by ``form``,
F_ij = V_j - V_i (``'difference'``), V_i - V_j (``'negated_difference'``) or V_j (``'sum'``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from torch import Tensor

from . import builtin

__all__ = ['Operator', 'BoundKernel', 'register_operator', 'get_operator', 'resolve_operator', 'operator_names',
           'AGGREGATE_FORMS', 'KERNELS', 'OPERATORS', 'OPERATOR_ALIASES', 'EULER_GAMMA', 'WIDTH_SCALE_TAU']

EULER_GAMMA = builtin.EULER_GAMMA
# (s1, s2): the aggregate is s1 sum_j w_ij V_j + s2 V_i sum_j w_ij.
AGGREGATE_FORMS = {'difference': (1.0, -1.0), 'negated_difference': (-1.0, 1.0), 'sum': (1.0, 0.0)}
# Kernels of the dot-product operators; 'gaussian' is the former name of 'embedded_gaussian'.
KERNELS = ('dot', 'embedded_gaussian')
_KERNEL_ALIASES = {'gaussian': 'embedded_gaussian'}

Weight = Callable[..., Tensor]


@dataclass(frozen=True)
class Operator:
    """One row of the operator table.

    Attributes:
        name: canonical name.
        variable: ``'distance'`` (W of x = |theta_i - phi_j|^2) or ``'dot'`` (W of x = theta_i . phi_j).
        form: ``'difference'``, ``'negated_difference'`` or ``'sum'`` (see the module docstring).
        weight: W(x, **params); need not keep x.
        derivative: dW/dx (x, **params).
        constant: c, a number or a function of (s, n, **params).
        tau: length unit tau sqrt(E) of ``kernel_scale='width'`` (distance kernels).
        params: the kernel's own parameters and their defaults.
        aliases: other names.
        singular: W is infinite where theta_i and phi_j coincide: such pairs contribute nothing.
        order: ``(default, check)`` of the order s: default(n), and check(s, n) returning an error or None;
            None for an operator without an order.
        formula: W(x) as text, for the docs.
    """

    name: str
    variable: str
    form: str
    weight: Optional[Weight] = None
    derivative: Optional[Weight] = None
    constant: Union[float, Callable[..., float]] = 1.0
    tau: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)
    aliases: Tuple[str, ...] = ()
    singular: bool = False
    order: Optional[Tuple[Callable[[int], float], Callable[[float, int], Optional[str]]]] = None
    # Built-in operators: their kernels with lambda, the constant and the embedding scale folded in.
    bind_builtin: Optional[Callable[..., Tuple[float, float, Callable, Callable]]] = None
    kernels: Tuple[str, ...] = ()
    formula: str = ''

    @property
    def lowrank(self) -> bool:
        """Whether the dot kernel of this operator has an exact low-rank evaluation."""
        return self.variable == 'dot' and self.name == 'diffusion'

    def needs_rowsum(self, normalizer: Any) -> bool:
        return AGGREGATE_FORMS[self.form][1] != 0 or normalizer == 'rowsum'

    def default_s(self, n: int = 2) -> Optional[float]:
        return None if self.order is None else self.order[0](n)

    def check_s(self, s: Optional[float], n: int = 2) -> Optional[float]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f'n (the dimension of the domain) must be a positive int, got {n!r}')
        if s is None:
            return self.default_s(n)
        if self.order is None:
            raise ValueError(f's is not used by operator {self.name!r}; pass s=None, got {s!r}')
        if not isinstance(s, Real) or isinstance(s, bool):
            raise ValueError(f's must be a real number, got {s!r}')
        error = self.order[1](float(s), n)
        if error:
            raise ValueError(f'{error} for operator {self.name!r}, got {float(s)}')
        return float(s)

    def pide_constant(self, s: Optional[float], n: int, params: Mapping[str, Any]) -> float:
        c = self.constant
        return float(c(s, n, **params) if callable(c) else c)

    def width_scale(self, kernel: str, embed_channels: int) -> float:
        if self.variable == 'distance':
            return self.tau * math.sqrt(embed_channels)
        return embed_channels ** 0.25 if kernel == 'embedded_gaussian' else 1.0

    def check_params(self, params: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        given = dict(params or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ValueError(f'kernel_params {unknown} are not parameters of operator {self.name!r} '
                             f'(its parameters: {sorted(self.params) or "none"})')
        return {**self.params, **given}


class BoundKernel:
    """An operator with its arguments bound, as the three evaluation paths use it: w = a W(x), dw/dx = a b Wd(x).

    ``pair(x, derivative, out=None)`` gives W and Wd on a fresh buffer x that it may overwrite (the fused tiles),
    Wd in ``out`` where given and used;
    ``value(x)`` gives W out of place, for autograd (the dense path). ``s1``, ``s2`` are the form's signs.
    """

    def __init__(self, op: Operator, s: Optional[float], n: int, lam: float, kernel: str, embed_scale: float,
                 params: Mapping[str, Any]):
        self.op, self.s, self.n, self.lam, self.kernel, self.embed_scale = op, s, n, lam, kernel, embed_scale
        self.params = dict(params)
        self.distance = op.variable == 'distance'
        self.singular = op.singular
        self.s1, self.s2 = AGGREGATE_FORMS[op.form]
        if op.bind_builtin is not None:
            self.a, self.b, self.pair, self.value = op.bind_builtin(s, n, lam, kernel, embed_scale)
            return
        # The kernel of theta / sigma, phi / sigma: x / sigma^2 in W, and 1 / sigma^2 on its derivative.
        inv = 1.0 / embed_scale ** 2
        self.a, self.b = lam * op.pide_constant(s, n, self.params), inv

        def scaled(x: Tensor) -> Tensor:
            return x if inv == 1.0 else x * inv

        def pair(x: Tensor, derivative: bool, out: Optional[Tensor] = None):
            xs = scaled(x)
            w = op.weight(xs, **self.params)
            return w, (op.derivative(xs, **self.params) if derivative else None)

        self.pair = pair
        self.value = lambda x: op.weight(scaled(x), **self.params)

    @property
    def operator(self) -> str:
        return self.op.name


_TABLE: Dict[str, Operator] = {}
OPERATOR_ALIASES: Dict[str, str] = {}  # every accepted spelling -> canonical name


def _add(op: Operator, replace: bool = False) -> Operator:
    names = (op.name, *op.aliases)
    taken = [a for a in names if a in OPERATOR_ALIASES]
    if taken and not replace:
        raise ValueError(f'operator names {taken} are taken (by {sorted({OPERATOR_ALIASES[a] for a in taken})}); '
                         'choose other names or pass replace=True')
    for alias in [a for a, name in OPERATOR_ALIASES.items() if name == op.name]:
        del OPERATOR_ALIASES[alias]  # a replaced row's old aliases
    _TABLE[op.name] = op
    OPERATOR_ALIASES.update({a: op.name for a in names})
    return op


for _op in builtin.OPERATORS:
    _add(Operator(**_op))
OPERATORS = tuple(op['name'] for op in builtin.OPERATORS)  # the paper's operators
WIDTH_SCALE_TAU = {name: _TABLE[name].tau for name in OPERATORS if _TABLE[name].variable == 'distance'}


def register_operator(name: str, *, weight: Weight, derivative: Weight, form: str = 'difference',
                      constant: Union[float, Callable[..., float]] = 1.0, variable: str = 'distance',
                      tau: float = 1.0, params: Optional[Mapping[str, Any]] = None, aliases: Tuple[str, ...] = (),
                      singular: bool = False, formula: str = '', replace: bool = False) -> Operator:
    """Add a kernel to the operator table; every path, block, head and the FLOP counter then accept ``name``.

    Args:
        name: the operator's name (``operator=name`` in :class:`~pide_zoo.layers.PIDEBlock`, ``PIDEHead``,
            ``block_cfg`` and :func:`nonlocal_aggregate`).
        weight: W(x, **params) as torch operations (it is differentiated by autograd in the dense path).
        derivative: dW/dx (x, **params), used by the fused path's backward.
        form: ``'difference'`` (sum_j w_ij (V_j - V_i)), ``'negated_difference'`` or ``'sum'`` (sum_j w_ij V_j).
        constant: c multiplying the kernel with lambda: a number or a function of (s, n, **params).
        variable: ``'distance'`` (x = |theta_i - phi_j|^2, default) or ``'dot'`` (x = theta_i . phi_j).
        tau: the length unit tau sqrt(E) of ``kernel_scale='width'``.
        params: the kernel's own parameters with their defaults (``kernel_params=`` sets them).
        aliases: other accepted names.
        singular: W is infinite at x = 0: coincident pairs then contribute nothing, as the paper's kernels.
        formula: W(x) as text, for the docs' operator table.
        replace: allow replacing a registered operator of that name.

    Returns:
        The table's row.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f'name must be a non-empty str, got {name!r}')
    if name in OPERATORS:
        raise ValueError(f'{name!r} is one of the paper operators {OPERATORS} and cannot be replaced')
    if form not in AGGREGATE_FORMS:
        raise ValueError(f'form must be one of {tuple(AGGREGATE_FORMS)}, got {form!r}')
    if variable not in ('distance', 'dot'):
        raise ValueError(f"variable must be 'distance' or 'dot', got {variable!r}")
    for arg, fn in (('weight', weight), ('derivative', derivative)):
        if not callable(fn):
            raise TypeError(f'{arg} must be a function of x and the parameters, got {type(fn).__name__}')
    if not callable(constant) and not (isinstance(constant, Real) and math.isfinite(constant)):
        raise ValueError(f'constant must be a finite number or a function of (s, n, **params), got {constant!r}')
    if not (isinstance(tau, Real) and 0 < tau < math.inf):
        raise ValueError(f'tau must be a positive number, got {tau!r}')
    op = _add(Operator(name=name, variable=variable, form=form, weight=weight, derivative=derivative,
                       constant=constant, tau=float(tau), params=dict(params or {}), aliases=tuple(aliases),
                       singular=bool(singular), formula=formula), replace=replace)
    from .api import _BOUND  # kernels bound from a replaced row are stale
    _BOUND.clear()
    return op


def resolve_operator(operator: str) -> str:
    """Canonical operator name for ``operator`` or one of its aliases (``OPERATOR_ALIASES``)."""
    try:
        return OPERATOR_ALIASES[operator]
    except (KeyError, TypeError):
        raise ValueError(
            f'operator must be one of {operator_names()} or an alias {sorted(OPERATOR_ALIASES)}, got {operator!r}'
        ) from None


def get_operator(operator: Union[str, Operator]) -> Operator:
    """The table's row for an operator name or alias."""
    return operator if isinstance(operator, Operator) else _TABLE[resolve_operator(operator)]


def operator_names() -> Tuple[str, ...]:
    """Every registered operator: the paper's four, then the registered ones."""
    return tuple(_TABLE)


def resolve_kernel(kernel: Optional[str], op: Operator) -> str:
    """Canonical kernel name; ``'gaussian'`` is accepted with a FutureWarning."""
    if kernel in _KERNEL_ALIASES:
        new = _KERNEL_ALIASES[kernel]
        warnings.warn(f"kernel={kernel!r} is deprecated and will be removed in pide_zoo 0.4; use kernel={new!r} "
                      '(the embedded Gaussian affinity, as mmcv calls it)', FutureWarning, stacklevel=4)
        kernel = new
    if kernel is None:
        kernel = 'dot'
    if kernel not in KERNELS:
        raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
    if kernel != 'dot' and kernel not in op.kernels:
        raise ValueError(f"kernel={kernel!r} applies to operator 'diffusion' only, got operator={op.name!r}")
    return kernel
