"""Density coefficients: featomic as oracle, symmetries, gradients, cutoff, edge cases."""

import ase
import ase.build
import featomic
import numpy as np
import pytest
import torch
from conftest import copper_cell, ethanol, random_rotation, wigner_d_real

from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.descriptors.neighbors import StructureError, batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers, radial_integrals

SPECIES = [1, 6, 8]




@pytest.fixture(scope="module")
def expansion():
    hypers = DensityHypers(density="gaussian", cutoff=4.0, smoothing=0.5, max_angular=4, max_radial=5, basis="le", width=0.4)
    return DensityExpansion(hypers, SPECIES)


@pytest.fixture(scope="module")
def wigner_expansion():
    hypers = DensityHypers(cutoff=4.0, smoothing=0.5, max_angular=3, max_radial=6, density="wigner", C=0.3, r0=2.0)
    return DensityExpansion(hypers, [29] + SPECIES)


def coefficients(expansion, frames, requires_grad=False, dtype=torch.float64):
    batch = batch_from_atoms(frames, expansion.cutoff, dtype=dtype)
    return expansion.compute(batch)


def featomic_reference(atoms, hypers, species):
    """featomic's SphericalExpansion in our layout (list over l of [n_atoms, 2l+1, a*n]).

    featomic's Gaussian is L2-normalised, ours has unit integral: the coefficients
    differ by the constant (pi s^2)^(3/4) / (2 pi s^2)^(3/2).
    """
    radius, width = hypers.cutoff, hypers.width
    n = hypers.max_radial
    if hypers.basis == "gto":
        radial = {l: featomic.basis.Gto(max_radial=n, radius=radius) for l in range(hypers.max_angular + 1)}
    else:
        radial = {
            l: featomic.basis.SphericalBessel(angular_channel=l, max_radial=n, radius=radius)
            for l in range(hypers.max_angular + 1)
        }
    spliner = featomic.splines.SoapSpliner(
        cutoff=featomic.cutoff.Cutoff(radius=radius, smoothing=featomic.cutoff.ShiftedCosine(width=hypers.smoothing)),
        density=featomic.density.Gaussian(width=width, center_atom_weight=0.0),
        basis=featomic.basis.Explicit(by_angular=radial, spline_accuracy=1e-10),
    )
    calculator = featomic.SphericalExpansion(**spliner.get_hypers())
    descriptor = calculator.compute(atoms).keys_to_properties("neighbor_type")
    scale = (np.pi * width**2) ** 0.75 / (2 * np.pi * width**2) ** 1.5
    result = []
    for l in range(hypers.max_angular + 1):
        values = np.zeros((len(atoms), 2 * l + 1, len(species) * (n + 1)))
        for block_key, block in descriptor.items():
            if block_key["o3_lambda"] != l:
                continue
            props = block.properties
            columns = np.array(
                [species.index(a) * (n + 1) + r for a, r in zip(props.column("neighbor_type"), props.column("n"))]
            )
            values[np.ix_(block.samples.column("atom"), np.arange(2 * l + 1), columns)] = block.values * scale
        result.append(values)
    return result


@pytest.mark.parametrize("basis", ["gto", "le"])
@pytest.mark.parametrize("structure", ["ethanol", "copper"])
def test_matches_featomic(basis, structure):
    atoms = ethanol() if structure == "ethanol" else copper_cell()
    species = SPECIES if structure == "ethanol" else [29]
    hypers = DensityHypers(density="gaussian", cutoff=4.0, smoothing=0.5, max_angular=4, max_radial=5, basis=basis, width=0.4)
    ours = coefficients(DensityExpansion(hypers, species), [atoms])
    reference = featomic_reference(atoms, hypers, species)
    for l, (c, ref) in enumerate(zip(ours, reference)):
        error = np.abs(c.numpy() - ref).max() / np.abs(ref).max()
        assert error < 1e-6, f"l={l}: relative error {error:.2e}"


def test_wigner_density_matches_direct_quadrature(wigner_expansion):
    """The Bessel-expanded radial integral equals brute-force 3D quadrature of
    int d^3x R_nl(|x|) Y_lm(x^) f(r) g_sigma(r)(x - r) for a single neighbour."""
    hypers = DensityHypers(cutoff=4.0, smoothing=0.5, max_angular=3, max_radial=6, density="wigner", C=0.3, r0=2.0)
    distance = 1.7
    basis = hypers.radial_basis()
    sigma, weight = hypers.sigma_and_weight(np.array([distance]))
    radii, radial_weights = np.polynomial.legendre.leggauss(300)
    radii = 0.5 * hypers.cutoff * (radii + 1)
    radial_weights = 0.5 * hypers.cutoff * radial_weights
    cos_theta, angular_weights = np.polynomial.legendre.leggauss(80)
    # neighbour on the z axis: only m = 0 survives, and the phi integral is 2 pi
    rho = np.sqrt(radii[:, None] ** 2 + distance**2 - 2 * radii[:, None] * distance * cos_theta[None, :])
    gaussian = (2 * np.pi * sigma[0] ** 2) ** -1.5 * np.exp(-(rho**2) / (2 * sigma[0] ** 2)) * weight[0]
    expected = radial_integrals(hypers, np.array([distance]))
    for l in range(4):
        legendre = np.polynomial.legendre.Legendre.basis(l)(cos_theta)
        y_l0 = np.sqrt((2 * l + 1) / (4 * np.pi)) * legendre
        angular = 2 * np.pi * (gaussian * y_l0[None, :]) @ angular_weights
        direct = (radial_weights * radii**2 * angular) @ basis.evaluate(l, radii)
        # Y_l0(z^) = sqrt((2l+1)/4pi) multiplies I_nl in c[n, l, m=0]
        np.testing.assert_allclose(direct, expected[l][0] * np.sqrt((2 * l + 1) / (4 * np.pi)), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("fixture", ["expansion", "wigner_expansion"])
def test_rotation_equivariance_and_inversion(fixture, request):
    expansion = request.getfixturevalue(fixture)
    atoms = ethanol()
    reference = coefficients(expansion, [atoms])
    rotation = random_rotation(7)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    inverted = atoms.copy()
    inverted.positions = -atoms.positions
    for l, (c, c_rot, c_inv) in enumerate(
        zip(reference, coefficients(expansion, [rotated]), coefficients(expansion, [inverted]))
    ):
        d = wigner_d_real(l, rotation)
        torch.testing.assert_close(c_rot, torch.einsum("mk,ikq->imq", d, c), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(c_inv, (-1) ** l * c, atol=1e-12, rtol=1e-10)
        assert c.abs().max() > 1e-3


def test_permutation_permutes_centres(expansion):
    atoms = ethanol()
    permutation = np.random.default_rng(0).permutation(len(atoms))
    permuted = atoms[permutation]
    for c, c_perm in zip(coefficients(expansion, [atoms]), coefficients(expansion, [permuted])):
        torch.testing.assert_close(c_perm, c[permutation], atol=1e-12, rtol=1e-10)


def test_translation_invariance(expansion):
    atoms = ethanol()
    shifted = atoms.copy()
    shifted.positions += np.array([1.3, -7.2, 0.4])
    for c, c_shift in zip(coefficients(expansion, [atoms]), coefficients(expansion, [shifted])):
        torch.testing.assert_close(c_shift, c, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("fixture", ["expansion", "wigner_expansion"])
def test_finite_difference_gradients(fixture, request):
    """Positions and cell gradients of a random projection of all coefficients."""
    expansion = request.getfixturevalue(fixture)
    atoms = copper_cell()[:3] if fixture == "expansion" else copper_cell()
    species = [29] if fixture == "wigner_expansion" else None
    if species is None:
        atoms.numbers = [1, 6, 8]
    batch = batch_from_atoms([atoms], expansion.cutoff)
    projections = [torch.randn_like(c) for c in expansion.compute(batch)]

    def energy(positions, cells):
        batch.positions, batch.cells = positions, cells
        return sum((c * p).sum() for c, p in zip(expansion.compute(batch), projections))

    positions = batch.positions.clone().requires_grad_()
    cells = batch.cells.clone().requires_grad_()
    assert torch.autograd.gradcheck(energy, (positions, cells), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_smooth_at_cutoff(expansion):
    """Coefficients and their derivative go to zero as a neighbour reaches r_cut."""
    cutoff = expansion.cutoff
    values, derivatives = [], []
    for distance in [cutoff - 0.5, cutoff - 1e-2, cutoff - 1e-3, cutoff - 1e-4]:
        vectors = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64)
        vectors = (vectors / vectors.norm() * distance).requires_grad_()
        c = expansion(vectors, torch.tensor([0]), torch.tensor([1]), 1)
        total = sum(x.abs().sum() for x in c)
        (gradient,) = torch.autograd.grad(sum(x.sum() for x in c), vectors)
        values.append(float(total.detach()))
        derivatives.append(float(gradient.norm()))
    assert values[0] > 1e-2 and derivatives[0] > 1e-2
    assert values[-1] < 1e-7 * values[0]
    assert derivatives[-1] < 1e-3 * derivatives[0]
    assert values == sorted(values, reverse=True)

    beyond = torch.tensor([[0.0, 0.0, cutoff + 0.1]], dtype=torch.float64, requires_grad=True)
    c = expansion(beyond, torch.tensor([0]), torch.tensor([0]), 1)
    (gradient,) = torch.autograd.grad(sum(x.sum() for x in c), beyond)
    assert all(float(x.abs().max()) == 0.0 for x in c)
    assert float(gradient.abs().max()) == 0.0


def test_isolated_atom_gives_zeros(expansion):
    atoms = ase.Atoms("O", positions=[[0.0, 0.0, 0.0]])
    far = ase.Atoms("OH", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    for c in coefficients(expansion, [atoms]) + coefficients(expansion, [far]):
        assert torch.isfinite(c).all()
        assert float(c.abs().max()) == 0.0


def test_overlapping_atoms_raise_clear_error(expansion):
    atoms = ase.Atoms("OHH", positions=[[0, 0, 0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    with pytest.raises(StructureError, match=r"structure 1 .*atoms 1 and 2"):
        batch_from_atoms([ethanol(), atoms], expansion.cutoff)


def test_unknown_species_raise_clear_error(expansion):
    atoms = ase.Atoms("OCl", positions=[[0, 0, 0], [0.0, 0.0, 1.5]])
    with pytest.raises(StructureError, match=r"structure 1: atomic numbers \[17\]"):
        expansion.compute(batch_from_atoms([ethanol(), atoms], expansion.cutoff))


def test_small_cell_equals_supercell(wigner_expansion):
    """A cell smaller than the cutoff sees many images of each atom; a 3x3x3
    supercell of it must give the same environments."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.6)  # primitive cell, 2.5 A vectors
    atoms.cell = atoms.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 1.0, 0.03], [0.0, 0.0, 1.0]])
    small = coefficients(wigner_expansion, [atoms])
    large = coefficients(wigner_expansion, [atoms * (3, 3, 3)])
    for c_small, c_large in zip(small, large):
        torch.testing.assert_close(c_large, c_small.expand(27, -1, -1), atol=1e-12, rtol=1e-9)


def test_batch_equals_separate_structures(expansion):
    frames = [ethanol(1), copper_cell()[:4], ethanol(2)]
    frames[1].numbers = [1, 6, 8, 8]
    together = coefficients(expansion, frames)
    separate = [coefficients(expansion, [f]) for f in frames]
    for l, c in enumerate(together):
        torch.testing.assert_close(c, torch.cat([s[l] for s in separate]), atol=1e-13, rtol=1e-12)


def test_float32_close_to_float64(expansion):
    atoms = ethanol()
    c64 = coefficients(expansion, [atoms])
    c32 = coefficients(expansion, [atoms], dtype=torch.float32)
    for a, b in zip(c64, c32):
        assert b.dtype == torch.float32
        assert float((a - b.double()).abs().max()) < 1e-5 * float(a.abs().max())


def test_torchscript_matches_eager(expansion):
    scripted = torch.jit.script(expansion)
    vectors = torch.randn(20, 3, dtype=torch.float64) * 1.5
    centers = torch.randint(0, 4, (20,))
    species = torch.randint(0, 3, (20,))
    for a, b in zip(scripted(vectors, centers, species, 4), expansion(vectors, centers, species, 4)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_ragged_radial_sizes():
    hypers = DensityHypers(cutoff=4.0, max_radial=8, max_angular=3, basis="le", laplacian_truncation=True)
    sizes = hypers.n_radial()
    assert sizes[0] == 9 and sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    c = coefficients(DensityExpansion(hypers, SPECIES), [ethanol()])
    assert [x.shape[2] for x in c] == [3 * n for n in sizes]
