"""The projected-process predictive variance, shared by the fit and the exported heads."""

from typing import List

import torch


def projected_variance(
    k_xm: torch.Tensor, k_xx: torch.Tensor, projection: torch.Tensor, triangular: torch.Tensor
) -> torch.Tensor:
    """``k_xx - |k_xM P|^2 + |R^-T P^T k_Mx|^2`` ``[n]`` (see :class:`~acdc_potential.fit.solver.ProjectedProcess`);
    TorchScript-compatible, used by exported models."""
    phi = k_xm @ projection
    posterior = torch.linalg.solve_triangular(triangular.T, phi.T, upper=False)
    return k_xx - (phi**2).sum(dim=1) + (posterior**2).sum(dim=0)


class SparseState(torch.nn.Module):
    """What a head keeps of a fitted sparse-KRR model (see :class:`~acdc_potential.fit.solver.ProjectedProcess`).

    Buffers: ``sparse [M, D]`` flat coefficients of the sparse environments (sorted by
    species), ``sparse_species [M]`` their central species index, ``weights [M]``,
    ``piece_weights [n_pieces]``, ``projection [M, r]`` and ``triangular [r, r]`` for the
    predictive variance ``k_xx - |k_xM P|^2 + |R^-T P^T k_Mx|^2``.
    """

    def __init__(self, kernel, weights: torch.Tensor, projection: torch.Tensor, triangular: torch.Tensor, species: List[int]):
        """:param kernel: the fitted :class:`~acdc_potential.kernels.base.SparseKernel` (its
        sparse environments and mixing); :param weights: ``[M]``; :param projection: ``[M, r]``;
        :param triangular: ``[r, r]`` of the projected process; :param species: the model's
        atomic numbers (species index = position)."""
        super().__init__()
        self.shapes: List[List[int]] = [list(shape) for shape in kernel.layout.shapes]
        index = {z: k for k, z in enumerate(species)}
        sparse_species = torch.tensor([index[int(z)] for z in kernel.sparse_species.tolist()], dtype=torch.long)
        # grouped by species, so that per-species blocks of sparse data are views
        order = torch.argsort(sparse_species, stable=True)
        self.register_buffer("sparse", kernel.sparse_coefficients.detach().to(torch.float64)[order].clone())
        self.register_buffer("sparse_species", sparse_species[order].clone())
        self.register_buffer("weights", weights.detach().to(torch.float64)[order].clone())
        self.register_buffer("piece_weights", kernel.piece_weights().to(torch.float64).clone())
        self.register_buffer("projection", projection.detach().to(torch.float64)[order].clone())
        self.register_buffer("triangular", triangular.detach().to(torch.float64).clone())

    def variance(self, k_xm: torch.Tensor, k_xx: torch.Tensor) -> torch.Tensor:
        """``[n]`` variances from kernel rows ``k_xm [n, M]`` and ``k(x, x)`` ``[n]``."""
        dtype = self.projection.dtype  # float64 unless the whole model was exported in float32
        return projected_variance(k_xm.to(dtype), k_xx.to(dtype), self.projection, self.triangular).to(k_xm.dtype)

    def group_variance(self, k_xm: torch.Tensor, k_xy: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
        """``[n_groups]`` variances of sums over groups, from atom rows ``k_xm [n, M]`` and
        the kernel between all atoms ``k_xy [n, n]``."""
        k_gm = torch.zeros((n_groups, k_xm.shape[1]), dtype=k_xm.dtype, device=k_xm.device).index_add(0, group, k_xm)
        same = (group.unsqueeze(1) == group.unsqueeze(0)).to(k_xy.dtype)
        k_gg = torch.zeros(n_groups, dtype=k_xy.dtype, device=k_xy.device).index_add(0, group, (k_xy * same).sum(dim=1))
        return self.variance(k_gm, k_gg)
