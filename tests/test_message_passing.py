"""Message-passing ACDC: the neighbour sum against a per-pair oracle, O(3) equivariance and
parity, the degenerate pair of Pozdnyakov et al., gradients, permutations."""

import dataclasses

import ase.build
import numpy as np
import pytest
import torch
from conftest import random_rotation, wigner_d_real
from conftest import copper_cell, ethanol
from test_correlations import degenerate_pair

from acdc_potential.descriptors.acdc import acdc_features, cg_product, density_blocks
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.descriptors.mpacdc import MPACDCFeatures, batch_mp_acdc_features, message, pair_terms
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers

SPECIES = [1, 6, 8, 29]
HYPERS = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=2, max_radial=1, basis="le", width=0.4)


@pytest.fixture(scope="module")
def expansion():
    return DensityExpansion(HYPERS, SPECIES)


def batch_of(*frames):
    return batch_from_atoms(list(frames), HYPERS.cutoff)


def test_message_equals_sum_of_pair_products(expansion):
    """The factorised neighbour sum equals coupling every pair's dense term, then summing (eq. 23)."""
    batch = batch_of(ethanol(), copper_cell())
    vectors = batch.pair_vectors()
    species = expansion.species_index(batch.numbers)
    nodes = acdc_features(expansion.compute(batch), 2, 3)
    pairs = pair_terms(expansion, vectors, species[batch.neighbors])
    fast = message(nodes, pairs, batch.centers, batch.neighbors, lambda_max=3)
    dense = density_blocks(pairs.dense())
    per_pair = cg_product({key: block[batch.neighbors] for key, block in nodes.items()}, dense, 3)
    assert set(fast) == set(per_pair)
    for key, block in per_pair.items():
        expected = torch.zeros_like(fast[key]).index_add(0, batch.centers, block)
        torch.testing.assert_close(fast[key], expected, rtol=1e-12, atol=1e-14)


def test_pair_term_is_the_density_of_one_neighbour(expansion):
    batch = batch_of(ethanol())
    vectors = batch.pair_vectors()
    species = expansion.species_index(batch.numbers)
    terms = pair_terms(expansion, vectors, species[batch.neighbors]).dense()
    coefficients = expansion.compute(batch)
    for l, term in enumerate(terms):
        summed = torch.zeros_like(coefficients[l]).index_add(0, batch.centers, term)
        torch.testing.assert_close(summed, coefficients[l], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("structure", ["ethanol", "copper"])
def test_equivariance_under_rotation(expansion, structure):
    atoms = ethanol() if structure == "ethanol" else copper_cell()
    batch = batch_of(atoms)
    features = batch_mp_acdc_features(batch, expansion, lambda_max=2)
    assert {key[0] for key in features} == {0, 1, 2} and {key[1] for key in features} == {-1, 1}
    rotation = random_rotation(3)
    r = torch.tensor(rotation)
    moved = dataclasses.replace(batch, positions=batch.positions @ r.T, cells=batch.cells @ r.T)
    features_rotated = batch_mp_acdc_features(moved, expansion, lambda_max=2)
    for (lam, sigma), block in features.items():
        expected = torch.einsum("ab,sbf->saf", wigner_d_real(lam, rotation), block)
        error = (features_rotated[(lam, sigma)] - expected).abs().max() / block.abs().max()
        assert error < 1e-9, f"block {(lam, sigma)}: relative error {error:.2e}"


def test_parity_under_inversion(expansion):
    batch = batch_of(ethanol())
    features = batch_mp_acdc_features(batch, expansion, lambda_max=2)
    inverted = batch_mp_acdc_features(dataclasses.replace(batch, positions=-batch.positions), expansion, lambda_max=2)
    for (lam, sigma), block in features.items():
        sign = sigma * (-1) ** lam
        scale = block.abs().max()
        assert (inverted[(lam, sigma)] - sign * block).abs().max() < 1e-12 * scale
        assert (inverted[(lam, sigma)] + sign * block).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("nu, nu1", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_body_orders_are_invariant(nu, nu1):
    hypers = DensityHypers(density="gaussian", cutoff=3.0, smoothing=0.5, max_angular=1, max_radial=1, basis="le", width=0.4)
    expansion = DensityExpansion(hypers, [1, 6, 8])
    batch = batch_from_atoms([ethanol()], hypers.cutoff)
    options = dict(nu=nu, nu1=nu1, lambda_max=0, invariants_only=True)
    invariants = batch_mp_acdc_features(batch, expansion, **options)[(0, 1)]
    rotation = torch.tensor(random_rotation(11))
    rotated = batch_mp_acdc_features(
        dataclasses.replace(batch, positions=-batch.positions @ rotation.T), expansion, **options
    )[(0, 1)]
    assert invariants.abs().max() > 1e-6
    torch.testing.assert_close(rotated, invariants, rtol=1e-9, atol=1e-12 * invariants.abs().max().item())


def test_invariants_only_matches_full(expansion):
    batch = batch_of(ethanol())
    full = batch_mp_acdc_features(batch, expansion, lambda_max=1)
    cheap = batch_mp_acdc_features(batch, expansion, lambda_max=1, invariants_only=True)
    assert list(cheap) == [(0, 1)]
    torch.testing.assert_close(cheap[(0, 1)], full[(0, 1)], rtol=1e-12, atol=1e-15)


def test_degenerate_environments_are_resolved(expansion):
    """[1 <- 1] distinguishes the power-spectrum-degenerate pair (seed, after eq. 13)."""
    plus, minus = (batch_of(frame) for frame in degenerate_pair())
    nu2_plus, nu2_minus = (
        acdc_features(expansion.compute(b), 2, 0, invariants_only=True)[(0, 1)][0] for b in (plus, minus)
    )
    assert (nu2_plus - nu2_minus).norm() / nu2_plus.norm() < 1e-10
    mp_plus, mp_minus = (batch_mp_acdc_features(b, expansion, invariants_only=True)[(0, 1)][0] for b in (plus, minus))
    assert (mp_plus - mp_minus).norm() / mp_plus.norm() > 1e-3


def test_gradients_match_finite_differences():
    hypers = DensityHypers(density="gaussian", cutoff=3.0, smoothing=0.5, max_angular=2, max_radial=1, basis="le", width=0.4)
    expansion = DensityExpansion(hypers, [29])
    atoms = ase.build.bulk("Cu", "fcc", a=3.6)
    atoms.rattle(0.05, seed=1)
    batch = batch_from_atoms([atoms], hypers.cutoff)
    shapes = batch_mp_acdc_features(batch, expansion, lambda_max=1)
    weights = {key: torch.randn(block.shape[1:], dtype=torch.float64) for key, block in shapes.items()}

    def energy(positions, cells):
        moved = dataclasses.replace(batch, positions=positions, cells=cells)
        features = batch_mp_acdc_features(moved, expansion, lambda_max=1)
        return sum((features[key] * weights[key]).sum() for key in weights)

    inputs = (batch.positions.clone().requires_grad_(), batch.cells.clone().requires_grad_())
    assert torch.autograd.gradcheck(energy, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_permutation_of_atoms(expansion):
    atoms = ethanol()
    permutation = np.random.default_rng(1).permutation(len(atoms))
    features = batch_mp_acdc_features(batch_of(atoms), expansion, lambda_max=1)
    permuted = batch_mp_acdc_features(batch_of(atoms[permutation]), expansion, lambda_max=1)
    for key, block in features.items():
        torch.testing.assert_close(permuted[key], block[permutation], rtol=1e-10, atol=1e-12)


def test_batched_structures_equal_separate_ones(expansion):
    frames = [ethanol(0), copper_cell(), ethanol(1)]
    together = batch_mp_acdc_features(batch_of(*frames), expansion, invariants_only=True)[(0, 1)]
    apart = [batch_mp_acdc_features(batch_of(frame), expansion, invariants_only=True)[(0, 1)] for frame in frames]
    torch.testing.assert_close(together, torch.cat(apart), rtol=1e-12, atol=1e-14)


def test_torchscript_matches_eager(expansion):
    batch = batch_of(ethanol(), copper_cell())
    module = MPACDCFeatures(expansion, lambda_max=2)
    scripted = torch.jit.script(module)
    eager = batch_mp_acdc_features(batch, expansion, lambda_max=2)
    assert list(eager) == scripted.keys
    blocks = scripted(batch.pair_vectors(), batch.centers, batch.neighbors, batch.numbers)
    for block, expected in zip(blocks, eager.values()):
        torch.testing.assert_close(block, expected, rtol=1e-12, atol=1e-14)


def test_separate_pair_basis_is_equivariant(expansion):
    """Pair terms on their own basis (other l_max, radial basis and cutoff) keep the symmetry."""
    pair = DensityExpansion(
        DensityHypers(density="gaussian", cutoff=3.0, smoothing=0.5, max_angular=1, max_radial=2, basis="gto", width=0.3), SPECIES
    )
    batch = batch_of(ethanol())
    features = batch_mp_acdc_features(batch, expansion, pair, lambda_max=1)
    default = batch_mp_acdc_features(batch, expansion, lambda_max=1)
    assert features[(0, 1)].shape[2] != default[(0, 1)].shape[2]
    rotation = random_rotation(5)
    r = torch.tensor(rotation)
    moved = dataclasses.replace(batch, positions=-batch.positions @ r.T)
    rotated = batch_mp_acdc_features(moved, expansion, pair, lambda_max=1)
    for (lam, sigma), block in features.items():
        expected = sigma * (-1) ** lam * torch.einsum("ab,sbf->saf", wigner_d_real(lam, rotation), block)
        torch.testing.assert_close(rotated[(lam, sigma)], expected, rtol=1e-9, atol=1e-12 * block.abs().max().item())
