"""ACDC correlations: O(3) equivariance and parity, featomic's power spectrum as oracle,
the degenerate environments of Pozdnyakov et al., gradients, permutations, PCA."""

import dataclasses

import ase
import ase.build
import featomic
import numpy as np
import pytest
import torch
from conftest import copper_cell, ethanol, random_rotation, wigner_d_real

from acdc_potential.descriptors.acdc import ACDCFeatures, BlockPCA, acdc_features, cg_product, coupling_layout, density_blocks, power_spectrum
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers

SPECIES = [1, 6, 8]
ALL_SPECIES = SPECIES + [29]
HYPERS = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=3, max_radial=2, basis="le", width=0.4)




def degenerate_pair(radius=1.2, theta=1.0):
    """Two environments of atom 0 with the same power spectrum (Pozdnyakov et al., PRL 125, 166001).

    Five neighbours at the same distance: two on a cone of half-angle ``theta`` around +z,
    two on the cone of half-angle ``pi - theta``, and one on the axis at +z (``A+``) or -z
    (``A-``). Flipping the axis atom swaps its angles ``theta`` and ``pi - theta`` to the
    two cones, so the multiset of neighbour-centre-neighbour triangles, and hence every
    3-body (nu = 2) feature, is unchanged; the two clusters are not congruent.
    """

    def on_sphere(polar, azimuth):
        return radius * np.array([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)])

    ring = [on_sphere(theta, 0.0), on_sphere(theta, 2.0), on_sphere(np.pi - theta, 0.7), on_sphere(np.pi - theta, 3.9)]
    frames = []
    for sign in (1.0, -1.0):
        positions = [np.zeros(3)] + ring + [np.array([0.0, 0.0, sign * radius])]
        frames.append(ase.Atoms("C" + "H" * 5, positions=positions))
    return frames


@pytest.fixture(scope="module")
def expansion():
    return DensityExpansion(HYPERS, ALL_SPECIES)


def rotated(batch, rotation):
    r = torch.tensor(rotation, dtype=batch.positions.dtype)
    return dataclasses.replace(batch, positions=batch.positions @ r.T, cells=batch.cells @ r.T)


@pytest.mark.parametrize("nu", [2, 3])
@pytest.mark.parametrize("structure", ["ethanol", "copper"])
def test_equivariance_under_rotation(expansion, nu, structure):
    atoms = ethanol() if structure == "ethanol" else copper_cell()
    batch = batch_from_atoms([atoms], HYPERS.cutoff)
    lambda_max = 2
    features = acdc_features(expansion.compute(batch), nu, lambda_max)
    assert {key[0] for key in features} == {0, 1, 2}
    assert {key[1] for key in features} == {-1, 1}
    for seed in range(2):
        rotation = random_rotation(seed)
        features_rotated = acdc_features(expansion.compute(rotated(batch, rotation)), nu, lambda_max)
        for (lam, sigma), block in features.items():
            expected = torch.einsum("ab,sbf->saf", wigner_d_real(lam, rotation), block)
            scale = block.abs().max()
            assert scale > 1e-6
            error = (features_rotated[(lam, sigma)] - expected).abs().max() / scale
            assert error < 1e-9, f"nu={nu} block {(lam, sigma)}: relative error {error:.2e}"


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_parity_under_inversion(expansion, nu):
    batch = batch_from_atoms([ethanol()], HYPERS.cutoff)
    features = acdc_features(expansion.compute(batch), nu, 2)
    inverted = acdc_features(expansion.compute(dataclasses.replace(batch, positions=-batch.positions)), nu, 2)
    for (lam, sigma), block in features.items():
        sign = sigma * (-1) ** lam
        scale = block.abs().max().item()
        np.testing.assert_allclose(inverted[(lam, sigma)].numpy(), sign * block.numpy(), atol=1e-12 * scale)
        # the opposite sign fails: each block really does change under inversion as claimed
        assert (inverted[(lam, sigma)] + sign * block).abs().max() > 1e-3 * block.abs().max()


def featomic_power_spectrum(atoms, hypers):
    calculator = featomic.SoapPowerSpectrum(
        cutoff={"radius": hypers.cutoff, "smoothing": {"type": "ShiftedCosine", "width": hypers.smoothing}},
        density={"type": "Gaussian", "width": hypers.width, "center_atom_weight": 0.0},
        basis={
            "type": "TensorProduct",
            "max_angular": hypers.max_angular,
            "radial": {"type": "Gto", "max_radial": hypers.max_radial},
        },
    )
    return calculator.compute(atoms)


@pytest.mark.parametrize("structure", ["ethanol", "copper"])
def test_power_spectrum_matches_featomic(structure):
    """featomic: ``(-1)^l / sqrt(2l+1) sum_m c c`` for every ``(n1, n2)``, neighbour species pairs
    ``a1 <= a2`` only, ``a1 < a2`` scaled by ``sqrt(2)``; L2-normalised Gaussians."""
    atoms = ethanol() if structure == "ethanol" else copper_cell()
    species = SPECIES if structure == "ethanol" else [29]
    hypers = DensityHypers(density="gaussian", cutoff=4.0, smoothing=0.5, max_angular=3, max_radial=3, basis="gto", width=0.4)
    n_radial = hypers.max_radial + 1
    ours = power_spectrum(DensityExpansion(hypers, species).compute(batch_from_atoms([atoms], hypers.cutoff)))
    scale = ((np.pi * hypers.width**2) ** 0.75 / (2 * np.pi * hypers.width**2) ** 1.5) ** 2
    n_channels = len(species) * n_radial
    rows, columns = np.triu_indices(n_channels)
    column_of = {(int(q1), int(q2)): k for k, (q1, q2) in enumerate(zip(rows, columns))}
    per_l = n_channels * (n_channels + 1) // 2

    checked = 0
    for key, block in featomic_power_spectrum(atoms, hypers).items():
        a1, a2 = species.index(key["neighbor_1_type"]), species.index(key["neighbor_2_type"])
        atoms_index = block.samples.column("atom")
        for k, (l, n1, n2) in enumerate(block.properties.values):
            q1, q2 = a1 * n_radial + n1, a2 * n_radial + n2
            ours_column = ours[atoms_index, l * per_l + column_of[(min(q1, q2), max(q1, q2))]]
            # ours carries sqrt(2) on every q1 != q2, featomic only on a1 != a2
            factor = np.sqrt(2.0) if (a1 == a2 and n1 != n2) else 1.0
            np.testing.assert_allclose(
                ours_column.numpy(), factor * block.values[:, k] * scale, rtol=1e-6, atol=1e-9 * ours.abs().max().item()
            )
            checked += 1
    assert checked > 0


def test_power_spectrum_is_nu2_invariant(expansion):
    """The direct sum equals the CG route's (0, +1) block up to the q <-> q' redundancy."""
    coefficients = expansion.compute(batch_from_atoms([ethanol()], HYPERS.cutoff))
    invariants = acdc_features(coefficients, 2, 0, invariants_only=True)[(0, 1)][:, 0]
    power = power_spectrum(coefficients)
    widths = {(l, 1): c.shape[2] for l, c in enumerate(coefficients)}
    chunks = coupling_layout(widths, widths, 0, invariants_only=True)[(0, 1)]
    start = 0
    for chunk in chunks:
        q = widths[(chunk.l1, 1)]
        square = invariants[:, chunk.start : chunk.stop].reshape(-1, q, q)
        rows, columns = torch.triu_indices(q, q)
        weight = torch.tensor(np.where(rows == columns, 1.0, np.sqrt(2.0)))
        expected = square[:, rows, columns] * weight
        torch.testing.assert_close(power[:, start : start + expected.shape[1]], expected, rtol=1e-12, atol=1e-14)
        start += expected.shape[1]
    assert start == power.shape[1]


def test_invariants_only_matches_full_iteration(expansion):
    coefficients = expansion.compute(batch_from_atoms([ethanol()], HYPERS.cutoff))
    full = acdc_features(coefficients, 3, 1)
    cheap = acdc_features(coefficients, 3, 1, invariants_only=True)
    assert list(cheap) == [(0, 1)]
    torch.testing.assert_close(cheap[(0, 1)], full[(0, 1)], rtol=1e-12, atol=1e-15)


def test_untruncated_intermediates_keep_all_invariants(expansion):
    """With the default truncation, nu = 3 invariants equal those of a fully untruncated iteration."""
    coefficients = expansion.compute(batch_from_atoms([ethanol()], HYPERS.cutoff))
    l_max = len(coefficients) - 1
    nu2 = cg_product(density_blocks(coefficients), density_blocks(coefficients), 2 * l_max)
    reference = cg_product(nu2, density_blocks(coefficients), 0, invariants_only=True)[(0, 1)]
    torch.testing.assert_close(acdc_features(coefficients, 3, 0, invariants_only=True)[(0, 1)], reference)
    truncated = acdc_features(coefficients, 3, 0, invariants_only=True, intermediate_lambda_max=1)[(0, 1)]
    assert truncated.shape[2] < reference.shape[2]


def test_degenerate_environments_are_resolved_by_bispectrum(expansion):
    plus, minus = (
        expansion.compute(batch_from_atoms([frame], HYPERS.cutoff)) for frame in degenerate_pair()
    )
    p_plus, p_minus = power_spectrum(plus)[0], power_spectrum(minus)[0]
    assert (p_plus - p_minus).norm() / p_plus.norm() < 1e-10
    nu2_plus, nu2_minus = (acdc_features(c, 2, 0, invariants_only=True)[(0, 1)][0] for c in (plus, minus))
    assert (nu2_plus - nu2_minus).norm() / nu2_plus.norm() < 1e-10
    # the densities themselves differ: the pair is not trivially identical
    assert (plus[1][0] - minus[1][0]).norm() > 1e-2 * plus[1][0].norm()
    nu3_plus, nu3_minus = (acdc_features(c, 3, 0, invariants_only=True)[(0, 1)][0] for c in (plus, minus))
    assert (nu3_plus - nu3_minus).norm() / nu3_plus.norm() > 1e-3


def test_gradients_match_finite_differences():
    hypers = DensityHypers(density="gaussian", cutoff=3.0, smoothing=0.5, max_angular=2, max_radial=1, basis="le", width=0.4)
    expansion = DensityExpansion(hypers, [29])
    atoms = ase.build.bulk("Cu", "fcc", a=3.6)
    atoms.rattle(0.05, seed=1)
    batch = batch_from_atoms([atoms], hypers.cutoff)
    size = acdc_features(expansion.compute(batch), 3, 1)
    weights = {key: torch.randn(block.shape[1:], dtype=torch.float64) for key, block in size.items()}

    def energy(positions, cells):
        moved = dataclasses.replace(batch, positions=positions, cells=cells)
        features = acdc_features(expansion.compute(moved), 3, 1)
        return sum((features[key] * weights[key]).sum() for key in weights)

    inputs = (batch.positions.clone().requires_grad_(), batch.cells.clone().requires_grad_())
    assert torch.autograd.gradcheck(energy, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_permutation_of_atoms(expansion):
    atoms = ethanol()
    permutation = np.random.default_rng(0).permutation(len(atoms))
    features = acdc_features(expansion.compute(batch_from_atoms([atoms], HYPERS.cutoff)), 3, 1)
    permuted = acdc_features(expansion.compute(batch_from_atoms([atoms[permutation]], HYPERS.cutoff)), 3, 1)
    for key, block in features.items():
        torch.testing.assert_close(permuted[key], block[permutation], rtol=1e-10, atol=1e-12)


def test_batched_structures_equal_separate_ones(expansion):
    frames = [ethanol(0), copper_cell(), ethanol(1)]
    together = acdc_features(expansion.compute(batch_from_atoms(frames, HYPERS.cutoff)), 2, 2)
    apart = [acdc_features(expansion.compute(batch_from_atoms([f], HYPERS.cutoff)), 2, 2) for f in frames]
    for key, block in together.items():
        torch.testing.assert_close(block, torch.cat([a[key] for a in apart]), rtol=1e-12, atol=1e-14)


def test_block_pca_keeps_equivariance_and_variance(expansion):
    batch = batch_from_atoms([ethanol(0), ethanol(1), ethanol(2)], HYPERS.cutoff)
    features = acdc_features(expansion.compute(batch), 2, 2)
    pca = BlockPCA(n_components=20).fit(features)
    contracted = pca.transform(features)
    for key, block in contracted.items():
        assert block.shape[2] <= 20 and block.shape[:2] == features[key].shape[:2]
        assert pca.explained_variance[key] > 0.9
    # full rank: the projection is orthogonal, so norms are preserved
    complete = BlockPCA(n_components=10**6, tolerance=0.0).fit(features).transform(features)
    for key, block in complete.items():
        torch.testing.assert_close(block.norm(dim=2), features[key].norm(dim=2))
    rotation = random_rotation(7)
    rotated_features = pca.transform(acdc_features(expansion.compute(rotated(batch, rotation)), 2, 2))
    for (lam, sigma), block in contracted.items():
        expected = torch.einsum("ab,sbf->saf", wigner_d_real(lam, rotation), block)
        torch.testing.assert_close(rotated_features[(lam, sigma)], expected, rtol=1e-9, atol=1e-12)


def test_torchscript_matches_eager(expansion, tmp_path):
    coefficients = expansion.compute(batch_from_atoms([ethanol(), copper_cell()], HYPERS.cutoff))
    module = ACDCFeatures(HYPERS.max_angular, 3, 2)
    path = tmp_path / "acdc.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    scripted = torch.jit.load(str(path))
    eager = acdc_features(coefficients, 3, 2)
    assert list(eager) == module.keys
    for block, expected in zip(scripted(coefficients), eager.values()):
        torch.testing.assert_close(block, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.jit.script(power_spectrum)(coefficients), power_spectrum(coefficients))


def test_selected_keys_equal_the_full_blocks(expansion):
    coefficients = expansion.compute(batch_from_atoms([ethanol()], HYPERS.cutoff))
    full = acdc_features(coefficients, 3, 2)
    module = ACDCFeatures(HYPERS.max_angular, 3, 2, keys=[(1, -1), (2, 1)])
    assert module.keys == [(1, -1), (2, 1)]
    for key, block in zip(module.keys, module(coefficients)):
        torch.testing.assert_close(block, full[key], rtol=1e-12, atol=1e-15)


def test_block_pca_of_wide_blocks_uses_the_gram_matrix(expansion):
    """Fewer samples than features: the Gram route gives orthonormal components spanning the data."""
    coefficients = expansion.compute(batch_from_atoms([ethanol(0)], HYPERS.cutoff))
    features = acdc_features(coefficients, 3, 0, invariants_only=True)
    block = features[(0, 1)]
    assert block.shape[0] < block.shape[2]
    pca = BlockPCA(n_components=10**6).fit(features)
    u = pca.projections[(0, 1)]
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), rtol=0, atol=1e-8)
    torch.testing.assert_close(pca.transform(features)[(0, 1)].norm(dim=2), block.norm(dim=2))
