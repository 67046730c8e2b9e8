"""Kernels by name: each has its fit-time rows (a :class:`~acdc_potential.kernels.base.SparseKernel`)
and a TorchScript evaluator that the exported heads use.

:data:`KERNELS` is also the list of what a checkpoint may name: loading one that names
anything else is refused (:mod:`acdc_potential.fit.checkpoint`).
"""

from typing import Dict, Type

from .base import SparseKernel
from .polynomial import FEATURES, PolynomialKernel
from .wigner.kernel import WignerKernel

KERNELS: Dict[str, Type[SparseKernel]] = {"wigner": WignerKernel, "polynomial": PolynomialKernel}

__all__ = ["FEATURES", "KERNELS", "PolynomialKernel", "SparseKernel", "WignerKernel"]
