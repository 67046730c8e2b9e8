"""Kernels by name: each has its fit-time rows (a :class:`~acdc_potential.kernels.base.SparseKernel`)
and a TorchScript evaluator that the exported heads use.

:data:`KERNELS` is also the list of what a checkpoint may name: loading one that names
anything else is refused (:mod:`acdc_potential.fit.checkpoint`).
"""

from typing import Dict, Type

from .base import SparseKernel
from .message_passing import MessagePassingKernel
from .polynomial import PolynomialKernel
from .wigner.kernel import WignerKernel

KERNELS: Dict[str, Type[SparseKernel]] = {"wigner": WignerKernel, "polynomial": PolynomialKernel, "mpacdc": MessagePassingKernel}

__all__ = ["KERNELS", "MessagePassingKernel", "PolynomialKernel", "SparseKernel", "WignerKernel"]
