"""Invariant ACDC features of chosen orders (the polynomial kernel's features): what each order is,
O(3) and permutation invariance, the PCA contraction of eq. 24, and TorchScript."""

import ase
import numpy as np
import pytest
import torch
from conftest import copper_cell, ethanol, random_rotation

from acdc_potential.descriptors.acdc import acdc_features, floored_unit_rows, power_spectrum, unit_rows
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.descriptors.invariants import Invariants, fit_contraction, joined_parts
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers

HYPERS = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=2, max_radial=2, basis="gto", width=0.4)
SPECIES = [1, 6, 8, 29]


def coefficients(frames):
    expansion = DensityExpansion(HYPERS, SPECIES)
    return expansion.compute(batch_from_atoms(frames, HYPERS.cutoff))


def gram(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T


def test_each_order_is_the_unit_invariant_of_its_definition():
    """nu = 1: the l = 0 coefficients; nu = 2: the power spectrum; nu = 3: the (0, +1) block of three
    density couplings (acdc_features). Compared by Gram matrices, which do not depend on the order of the
    features; the orders together are concatenated with weight 1/sqrt(3) each."""
    c = coefficients([ethanol(0), ethanol(1)])
    expected = {
        1: unit_rows(c[0][:, 0]),
        2: unit_rows(power_spectrum(c)),
        3: unit_rows(acdc_features(c, 3, 0, invariants_only=True)[(0, 1)][:, 0]),
    }
    for nu, x in expected.items():
        torch.testing.assert_close(gram(Invariants(HYPERS.max_angular, [nu])(c)), gram(x), rtol=0, atol=1e-12)
    together = Invariants(HYPERS.max_angular, [3, 1, 2])(c)
    torch.testing.assert_close(gram(together), sum(gram(x) for x in expected.values()) / 3, rtol=0, atol=1e-12)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(len(together), dtype=torch.float64))


@pytest.mark.parametrize("frame", ["ethanol", "copper"])
def test_invariant_under_rotation_inversion_and_permutation(frame):
    atoms = ethanol(3) if frame == "ethanol" else copper_cell()
    c = coefficients([atoms])
    module = Invariants(HYPERS.max_angular, [1, 2, 3], fit_contraction(HYPERS.max_angular, c, 5))
    reference = module(c)
    rotation = random_rotation(7)
    for transform in (rotation, -np.eye(3), -rotation):
        moved = atoms.copy()
        moved.set_cell(atoms.cell.array @ transform.T)
        moved.positions = atoms.positions @ transform.T
        torch.testing.assert_close(module(coefficients([moved])), reference, rtol=0, atol=1e-12)
    order = np.random.default_rng(0).permutation(len(atoms))
    torch.testing.assert_close(module(coefficients([atoms[order]])), reference[order], rtol=0, atol=1e-12)


def test_contraction_with_every_component_keeps_the_geometry_of_the_fitted_environments():
    """A PCA keeping every non-null component maps the span of the fitted nu = 2 blocks orthogonally:
    the nu = 3 invariants' dot products are unchanged; keeping two per block changes them."""
    c = coefficients([ethanol(k) for k in range(4)])
    full = Invariants(HYPERS.max_angular, [3])(c)
    complete = Invariants(HYPERS.max_angular, [3], fit_contraction(HYPERS.max_angular, c, 10**6))(c)
    torch.testing.assert_close(gram(complete), gram(full), rtol=0, atol=1e-10)
    truncated = Invariants(HYPERS.max_angular, [3], fit_contraction(HYPERS.max_angular, c, 2))(c)
    assert truncated.shape[1] < full.shape[1]
    assert float((gram(truncated) - gram(full)).abs().max()) > 1e-3


def test_torchscript_and_forward_mode_derivatives_agree_with_eager_reverse_mode():
    c = coefficients([ethanol(5)])
    module = Invariants(HYPERS.max_angular, [1, 2, 3], fit_contraction(HYPERS.max_angular, c, 4))
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(c), module(c), rtol=0, atol=1e-14)
    tangents = [torch.randn_like(x) for x in c]
    _, forward = torch.func.jvp(lambda *x: module(list(x)), tuple(c), tuple(tangents))
    leaves = [x.clone().requires_grad_() for x in c]
    weights = torch.randn(module(c).shape, dtype=torch.float64)
    gradients = torch.autograd.grad((module(leaves) * weights).sum(), leaves)
    torch.testing.assert_close((forward * weights).sum(), sum((g * t).sum() for g, t in zip(gradients, tangents)), rtol=1e-12, atol=0)


def test_orders_outside_one_to_three_are_refused():
    for orders in ([], [0], [4], [2, 5]):
        with pytest.raises(ValueError, match="invariant orders must be a non-empty subset of"):
            Invariants(2, orders)
    atoms = ase.Atoms("H")
    assert Invariants(HYPERS.max_angular, [1, 2])(coefficients([atoms])).abs().max() == 0  # no neighbours: zeros, not NaN


def test_two_from_one_invariants_are_the_definition_and_their_contraction_keeps_the_geometry():
    """[2 <- 1] of MessagePassingInvariants: uncontracted, the unit (0, +1) block of mp_acdc_features
    with nu = 2, nu1 = 1 (MP-ACDC eq. 12, 21-23); contracted with every component of both factors, the
    same dot products on the fitted environments; with two per block, fewer features and other dot products.
    Invariant under rotation and inversion, and the same in TorchScript."""
    from acdc_potential.descriptors.invariants import MessagePassingInvariants, fit_message_contraction
    from acdc_potential.descriptors.mpacdc import batch_mp_acdc_features

    hypers = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=1, max_radial=1, basis="gto", width=0.4)
    expansion = DensityExpansion(hypers, SPECIES)
    frames = [ethanol(k) for k in range(3)]
    batch = batch_from_atoms(frames, hypers.cutoff)

    def features(projections=None, atoms=batch):
        module = MessagePassingInvariants(expansion, expansion, [], [2], projections)
        return module(atoms.pair_vectors(), atoms.centers, atoms.neighbors, expansion.species_index(atoms.numbers)), module

    full, module = features()
    definition = batch_mp_acdc_features(batch, expansion, nu=2, nu1=1, lambda_max=0, invariants_only=True)[(0, 1)][:, 0]
    torch.testing.assert_close(full[:, :-1], unit_rows(definition), rtol=0, atol=1e-12)
    assert torch.equal(full[:, -1], torch.zeros(len(full), dtype=full.dtype))  # the floor's component (no floor given)
    complete, _ = features(fit_message_contraction(module, [batch], 10**6))
    torch.testing.assert_close(gram(complete), gram(full), rtol=0, atol=1e-10)
    projections = fit_message_contraction(module, [batch], 2)
    truncated, contracted = features(projections)
    assert truncated.shape[1] < full.shape[1] and float((gram(truncated) - gram(full)).abs().max()) > 1e-3

    moved = ethanol(0)
    moved.positions = -moved.positions @ random_rotation(5).T
    turned = batch_from_atoms([ethanol(0), moved], hypers.cutoff)
    x, _ = features(projections, turned)
    n = len(moved)
    torch.testing.assert_close(x[:n], x[n:], rtol=0, atol=1e-12)
    scripted = torch.jit.script(contracted)
    y = scripted(turned.pair_vectors(), turned.centers, turned.neighbors, expansion.species_index(turned.numbers))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("orders, message_orders", [([1, 2], [1]), ([1, 2], [1, 2]), ([2], [1, 2]), ([], [2])])
def test_message_passing_invariants_have_unit_norm_with_every_part_weighing_the_same(orders, message_orders):
    from acdc_potential.descriptors.invariants import MessagePassingInvariants

    hypers = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=1, max_radial=1, basis="gto", width=0.4)
    expansion = DensityExpansion(hypers, SPECIES)
    batch = batch_from_atoms([ethanol(1)], hypers.cutoff)
    module = MessagePassingInvariants(expansion, expansion, orders, message_orders)
    x = module(batch.pair_vectors(), batch.centers, batch.neighbors, expansion.species_index(batch.numbers))
    torch.testing.assert_close(torch.linalg.vector_norm(x, dim=1), torch.ones(x.shape[0], dtype=torch.float64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_rows_keep_zero_rows_zero_with_finite_gradients_in_both_precisions(dtype):
    """An atom without neighbours has zero invariants: they stay zero (not 0 / 0) and their gradient is
    finite, also in float32, where an exported file may run; other rows get unit norm."""
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1e-20, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    for implementation in (unit_rows, torch.jit.script(unit_rows)):
        y = implementation(x)
        assert torch.equal(y[0], torch.zeros(3, dtype=dtype))
        torch.testing.assert_close(torch.linalg.vector_norm(y[1:], dim=1), torch.ones(2, dtype=dtype))
        (gradient,) = torch.autograd.grad(y.sum(), x)
        assert bool(torch.isfinite(gradient).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floored_unit_rows_turn_smoothly_to_the_floor_as_a_row_vanishes(dtype):
    """``[x, f] / sqrt(|x|^2 + f^2)``: unit norm; far above the floor the unit row (to ``f^2 / 2|x|^2``);
    a zero row (an atom without neighbours) is ``[0, 1]``, and rows shrinking towards it approach it
    continuously (within ``|x| / f``), where the plain unit row keeps its direction and then jumps to
    zero; finite gradients, scripted too, in both precisions."""
    floor = torch.tensor(0.5, dtype=torch.float64)
    direction = torch.tensor([0.6, 0.8, 0.0], dtype=dtype)
    for implementation in (floored_unit_rows, torch.jit.script(floored_unit_rows)):
        x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [300.0, 400.0, 0.0]], dtype=dtype, requires_grad=True)
        y = implementation(x, floor)
        assert y.dtype == dtype and y.shape == (3, 4)
        torch.testing.assert_close(torch.linalg.vector_norm(y, dim=1), torch.ones(3, dtype=dtype))
        assert torch.equal(y[0], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=dtype))
        torch.testing.assert_close(y[1], torch.tensor([3.0, 4.0, 0.0, 0.5], dtype=dtype) / 25.25**0.5)
        assert float((y[2, :3].detach() - unit_rows(x[2:].detach())[0]).abs().max()) <= 0.25 / 2 / 500**2 * 1.01
        (gradient,) = torch.autograd.grad(y.sum(), x)
        assert bool(torch.isfinite(gradient).all())
        for t in (1e-1, 1e-3, 1e-6):
            shrunk = implementation(t * direction[None], floor)[0]
            assert float((shrunk - y[0]).norm()) <= t / 0.5 * 1.01
            assert float((unit_rows(t * direction[None])[0] - direction).norm()) < 1e-6  # the unit row does not move


def test_joined_parts_put_the_floor_components_last_and_weigh_every_part_the_same():
    """Two parts with floors ``f_1, f_2``: ``[x_1, x_2, f_1, f_2]`` each part (with its floor) scaled to
    unit norm, divided by ``sqrt(2)``; with zero floors, the plain unit parts followed by two zeros."""
    a, b = torch.tensor([[3.0, 4.0]], dtype=torch.float64), torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)
    joined = joined_parts([a, b], torch.tensor([1.0, 4.0], dtype=torch.float64))
    expected = torch.tensor([[3.0 / 26**0.5, 4.0 / 26**0.5, 1.0 / 5.0, 2.0 / 5.0, 2.0 / 5.0, 1.0 / 26**0.5, 4.0 / 5.0]], dtype=torch.float64) / 2**0.5
    torch.testing.assert_close(joined, expected, rtol=0, atol=1e-15)
    plain = joined_parts([a, b], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(plain, torch.cat([unit_rows(a), unit_rows(b), torch.zeros((1, 2), dtype=torch.float64)], dim=1) / 2**0.5, rtol=0, atol=1e-15)


def test_fitted_floors_are_the_relative_floor_times_the_median_norm_of_each_part():
    """:meth:`PolynomialKernel.prepare` on training batches: floor of order 1 and order 2 = ``norm_floor``
    times the median norm over the atoms of the l = 0 coefficients and of the power spectrum (numpy's
    median); the feature module then carries them."""
    from acdc_potential.kernels.polynomial import PolynomialKernel

    expansion = DensityExpansion(HYPERS, SPECIES)
    frames = [ethanol(0), ethanol(1), copper_cell()]
    kernel = PolynomialKernel(orders=[1, 2], norm_floor=0.2)
    kernel.prepare(expansion, [batch_from_atoms(frames[:2], HYPERS.cutoff), batch_from_atoms(frames[2:], HYPERS.cutoff)])
    c = coefficients(frames)
    expected = [0.2 * np.median(np.linalg.norm(x.numpy(), axis=1)) for x in (c[0][:, 0], power_spectrum(c))]
    np.testing.assert_allclose(kernel.floors, expected, rtol=1e-12)
    assert kernel.module(expansion).floors.tolist() == kernel.floors
    assert not kernel.unprepared
