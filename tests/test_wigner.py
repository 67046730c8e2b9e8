"""Wigner kernels: symmetries, path equivalences, the basis-free nu = 1 kernel, the ACDC identity."""

import math

import ase.build
import numpy as np
import pytest
import scipy.special
import sphericart.torch
import torch
from conftest import random_rotation, wigner_d_real

from acdc_potential.descriptors.acdc import acdc_features
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers
from acdc_potential.kernels.wigner import features as features_module
from acdc_potential.kernels.wigner.features import OrderFeatures
from acdc_potential.kernels.wigner.iteration import WignerHypers, WignerKernels, equivariant_kernels, exponential_kernel, invariant_kernels, matched_invariant_kernels, nu1_kernels, wigner_iteration

SPECIES = [1, 6, 8]
DENSITY = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=3, max_radial=3, width=0.4)


def molecule(name, seed, transform=None):
    atoms = ase.build.molecule(name)
    atoms.rattle(0.15, seed=seed)
    if transform is not None:
        atoms.positions = atoms.positions @ transform.T
    return atoms


def densities(atoms, hypers=DENSITY):
    """Density coefficients (list over l) and central-species indices of one structure."""
    expansion = DensityExpansion(hypers, SPECIES)
    batch = batch_from_atoms([atoms], hypers.cutoff, torch.float64, "cpu")
    return expansion.compute(batch), expansion.species_index(batch.numbers)


def test_invariant_kernels_are_invariant_under_rotations_and_inversions():
    hypers = WignerHypers(nu_max=4, lambda_max=3, invariant_only=False)
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    reference = invariant_kernels(a, sa, b, sb, hypers)
    assert float(reference[1:].abs().max()) > 1e-3
    for seed, sign in [(1, 1.0), (2, -1.0)]:
        ra = sign * random_rotation(seed)
        rb = -sign * random_rotation(seed + 10)
        a_t, _ = densities(molecule("CH3CH2OH", 0, ra))
        b_t, _ = densities(molecule("CH3OH", 1, rb))
        torch.testing.assert_close(invariant_kernels(a_t, sa, b_t, sb, hypers), reference, rtol=1e-9, atol=1e-9)


def test_equivariant_kernels_transform_with_d_on_each_side():
    hypers = WignerHypers(nu_max=3, lambda_max=3)
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH4", 1))
    reference = equivariant_kernels(a, sa, b, sb, hypers)
    rotation_a, rotation_b = random_rotation(3), random_rotation(4)
    # inversion of a: coefficients pick up (-1)^l, blocks sigma (-1)^lambda
    a_t, _ = densities(molecule("CH3CH2OH", 0, -rotation_a))
    b_t, _ = densities(molecule("CH4", 1, rotation_b))
    transformed = equivariant_kernels(a_t, sa, b_t, sb, hypers)
    n_pseudo = 0
    for nu in range(1, hypers.nu_max + 1):
        for (lam, sigma), k in reference[nu].items():
            d_a = wigner_d_real(lam, rotation_a) * sigma * (-1) ** lam
            d_b = wigner_d_real(lam, rotation_b)
            expected = d_a @ k @ d_b.T
            assert float(k.abs().max()) > 1e-6
            torch.testing.assert_close(transformed[nu][(lam, sigma)], expected, rtol=1e-8, atol=1e-8)
            n_pseudo += sigma < 0
    assert n_pseudo >= 5


def test_swapping_environments_transposes_the_kernels():
    hypers = WignerHypers(nu_max=4, lambda_max=2)
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    forward = equivariant_kernels(a, sa, b, sb, hypers)
    backward = equivariant_kernels(b, sb, a, sa, hypers)
    for nu, blocks in forward.items():
        for key, k in blocks.items():
            torch.testing.assert_close(k, backward[nu][key].permute(1, 0, 3, 2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        invariant_kernels(a, sa, b, sb, hypers), invariant_kernels(b, sb, a, sa, hypers).transpose(1, 2)
    )


def test_species_delta_and_nu0():
    hypers = WignerHypers(nu_max=3)
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    k = invariant_kernels(a, sa, b, sb, hypers)
    same = sa.unsqueeze(1) == sb.unsqueeze(0)
    torch.testing.assert_close(k[0], same.to(k.dtype))
    assert bool((k[1:, ~same] == 0).all())
    assert bool((k[1:, same].abs() > 0).all())


@pytest.mark.parametrize("l_max, lambda_max, nu_max", [(3, 3, 6), (3, 1, 5), (1, 2, 5), (2, 3, 4)])
def test_invariant_only_path_equals_full_path(l_max, lambda_max, nu_max):
    """Both paths truncate every intermediate kernel at lambda_max; recoupling the final
    lambda = 0 contraction maps one set of truncations onto the other, so they agree for
    every nu, not only where the truncation is inactive."""
    hypers = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=l_max, max_radial=3, width=0.4)
    a, sa = densities(molecule("CH3CH2OH", 0), hypers)
    b, sb = densities(molecule("CH3OH", 1), hypers)
    full = invariant_kernels(a, sa, b, sb, WignerHypers(nu_max, lambda_max, invariant_only=False))
    fast = invariant_kernels(a, sa, b, sb, WignerHypers(nu_max, lambda_max, invariant_only=True))
    torch.testing.assert_close(fast, full, rtol=1e-11, atol=0.0)
    equivariant = equivariant_kernels(a, sa, b, sb, WignerHypers(nu_max, lambda_max))
    for nu in range(nu_max + 1):
        torch.testing.assert_close(equivariant[nu][(0, 1)][..., 0, 0], full[nu], rtol=1e-11, atol=0.0)


def gaussian_overlap_kernels(neighbors_a, neighbors_b, sigma, lambda_max):
    """WK eq. 7 summed analytically over neighbour pairs, constant width, f_cut = 1.

    ``neighbors_*``: ``{species: [n, 3] vectors from the centre}``; one ``[2 lambda + 1,
    2 lambda + 1]`` matrix per ``lambda``.

    The rotation integral of the overlap of two Gaussians gives
    k^{1,lambda}_{mu mu'} = 8 pi^2 / (2 lambda + 1) 4 pi (4 pi sigma^2)^(-3/2)
    sum_{j j'} delta(a_j, a_j') exp(-(r^2 + r'^2) / 4 sigma^2) i_lambda(r r' / 2 sigma^2)
    Y_lambda mu(r_j^) Y_lambda mu'(r_j'^).
    """
    harmonics = sphericart.torch.SphericalHarmonics(lambda_max)
    out = []
    for lam in range(lambda_max + 1):
        total = torch.zeros(2 * lam + 1, 2 * lam + 1, dtype=torch.float64)
        for species, vectors in neighbors_a.items():
            other = neighbors_b.get(species)
            if other is None:
                continue
            ya = harmonics(vectors)[:, lam * lam : (lam + 1) ** 2]
            yb = harmonics(other)[:, lam * lam : (lam + 1) ** 2]
            ra, rb = vectors.norm(dim=1), other.norm(dim=1)
            z = (ra[:, None] * rb[None, :] / (2 * sigma**2)).numpy()
            radial = torch.exp(-(ra[:, None] ** 2 + rb[None, :] ** 2) / (4 * sigma**2)) * torch.tensor(
                scipy.special.spherical_in(lam, z)
            )
            total = total + ya.T @ radial @ yb
        out.append(4 * math.pi * (4 * math.pi * sigma**2) ** -1.5 * total)
    return out


def test_nu1_kernel_equals_basis_free_gaussian_overlaps():
    sigma, lambda_max = 0.5, 3
    rng = np.random.default_rng(7)

    def environment(n):
        directions = rng.normal(size=(n, 3))
        radii = rng.uniform(0.8, 2.2, size=(n, 1))
        return torch.tensor(directions / np.linalg.norm(directions, axis=1, keepdims=True) * radii)

    neighbors = [{0: environment(3), 1: environment(2)}, {0: environment(2), 1: environment(3)}]
    expected = gaussian_overlap_kernels(neighbors[0], neighbors[1], sigma, lambda_max)

    def errors(max_radial):
        hypers = DensityHypers(density="gaussian", cutoff=5.0, smoothing=0.5, max_angular=lambda_max, max_radial=max_radial, width=sigma)
        expansion = DensityExpansion(hypers, [1, 6])
        coefficients = []
        for environment_neighbors in neighbors:
            vectors = torch.cat(list(environment_neighbors.values()))
            species = torch.cat([torch.full((len(v),), s) for s, v in environment_neighbors.items()])
            coefficients.append(expansion(vectors, torch.zeros(len(vectors), dtype=torch.long), species, 1))
        computed = nu1_kernels(coefficients[0], coefficients[1])
        return [float((computed[l][0, 0] - expected[l]).abs().max() / expected[l].abs().max()) for l in range(4)]

    # Gaussians of width 0.5 within 2.2 A of the centre: 16 LE functions on 5 A converge to
    # about 1e-11, while a small basis is visibly off, so the comparison is sensitive
    assert max(errors(16)) < 1e-9
    assert min(errors(4)) > 1e-5


def feature_kernels(features_a, features_b):
    """Scalar products of equivariant features: ``[n_a, n_b, 2 lambda + 1, 2 lambda + 1]`` per block."""
    return {key: torch.einsum("imf,jnf->ijmn", block, features_b[key]) for key, block in features_a.items()}


def scaled(coefficients, hypers):
    """``kappa_l^(1/2) c``: the channel scales that make B1 + C1 a feature scalar product."""
    kappa = hypers.channel_scales()
    return [math.sqrt(kappa[l]) * c for l, c in enumerate(coefficients)]


@pytest.mark.parametrize("channel_weights", ["uniform", "inverse_dimension"])
@pytest.mark.parametrize("nu, l_max, lambda_max", [(2, 3, 3), (3, 2, 4), (3, 2, 2)])
def test_kernels_are_scalar_products_of_acdc_features(nu, l_max, lambda_max, channel_weights):
    """WK appendix B: k^{nu, lambda sigma} = <rho^{nu}; lambda sigma mu | rho^{nu}; lambda sigma mu'>.

    (3, 2, 4) keeps every intermediate lambda (2 l_max = lambda_max), i.e. the untruncated
    identity; (3, 2, 2) truncates the intermediate nu = 2 kernels and features alike.
    """
    hypers = DensityHypers(density="gaussian", cutoff=3.0, smoothing=0.5, max_angular=l_max, max_radial=1, width=0.4)
    a, sa = densities(molecule("CH4", 0), hypers)
    b, sb = densities(molecule("CH4", 1), hypers)
    wigner = WignerHypers(nu, lambda_max, channel_weights=channel_weights)
    kernels = equivariant_kernels(a, sa, b, sb, wigner)[nu]
    options = dict(intermediate_lambda_max=lambda_max) if lambda_max < nu * l_max - l_max else {}
    expected = feature_kernels(
        acdc_features(scaled(a, wigner), nu, lambda_max, **options), acdc_features(scaled(b, wigner), nu, lambda_max, **options)
    )
    same = (sa.unsqueeze(1) == sb.unsqueeze(0)).to(torch.float64)[:, :, None, None]
    assert set(kernels) == set(expected)
    for key, k in kernels.items():
        torch.testing.assert_close(k, expected[key] * same, rtol=1e-10, atol=1e-10 * float(k.abs().max()))


def test_generalised_iteration_composes():
    """Appendix F: iterating k^2 with k^1 equals iterating k^1 with k^2 (both are k^3 up to
    the order of the CG arguments, which cancels in C C) and equals the full path."""
    a, sa = densities(molecule("CH3OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    kernels = equivariant_kernels(a, sa, b, sb, WignerHypers(3, 3))
    left = wigner_iteration(kernels[2], kernels[1], 3)
    right = wigner_iteration(kernels[1], kernels[2], 3)
    for key, k in kernels[3].items():
        torch.testing.assert_close(left[key], k, rtol=1e-10, atol=1e-10 * float(k.abs().max()))
        torch.testing.assert_close(right[key], k, rtol=1e-10, atol=1e-10 * float(k.abs().max()))


def test_matched_rows_equal_entries_of_the_kernel_matrix():
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    for invariant_only in (True, False):
        hypers = WignerHypers(nu_max=5, invariant_only=invariant_only)
        full = invariant_kernels(a, sa, b, sb, hypers)
        i = torch.tensor([0, 1, 2, 3, 4, 5, 8])
        j = torch.tensor([0, 2, 1, 3, 5, 4, 1])
        matched = matched_invariant_kernels([c[i] for c in a], sa[i], [c[j] for c in b], sb[j], hypers)
        torch.testing.assert_close(matched, full[:, i, j], rtol=1e-12, atol=0.0)


def test_exponential_kernel():
    k = torch.rand(5, 3, 4, dtype=torch.float64)
    c0, a, b = 0.3, 1.7, 0.6
    expected = c0 * k[0] + a * sum(b**nu / math.factorial(nu) * k[nu] for nu in range(1, 5))
    torch.testing.assert_close(exponential_kernel(k, c0, a, b), expected)


def test_chunked_checkpointed_gradients_match_plain_autograd():
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    weights = torch.rand(5, len(sa), len(sb), dtype=torch.float64)
    gradients = []
    for chunk_size, checkpoint in [(3, True), (100000, False)]:
        leaves = [c.detach().requires_grad_() for c in a]
        k = invariant_kernels(leaves, sa, b, sb, WignerHypers(chunk_size=chunk_size, checkpoint=checkpoint))
        gradients.append(torch.autograd.grad((k * weights).sum(), leaves))
    for first, second in zip(*gradients):
        torch.testing.assert_close(first, second, rtol=1e-10, atol=1e-12)
    # finite difference on one coefficient
    l, index = 2, (3, 1, 2)
    step = 1e-5

    def energy(shift):
        shifted = [c.clone() for c in a]
        shifted[l][index] += shift
        return float((invariant_kernels(shifted, sa, b, sb, WignerHypers()) * weights).sum())

    numerical = (energy(step) - energy(-step)) / (2 * step)
    assert abs(numerical - float(gradients[0][l][index])) < 1e-6 * abs(numerical)


def ethanol_methanol_kernels(nu_max, lambda_max):
    """Densities of ethanol and methanol, the kernel module, and its invariant kernels
    ``[nu_max, 9, 6]`` between them from the kernel-space iterations."""
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    module = WignerKernels(WignerHypers(nu_max=nu_max, lambda_max=lambda_max))
    return a, b, module, module.invariant_pairs(a, b).view(nu_max, len(sa), len(sb))


@pytest.mark.parametrize("nu_max", [1, 2, 3, 4])
@pytest.mark.parametrize("lambda_max", [1, 3])
def test_feature_path_equals_kernel_space_iterations(nu_max, lambda_max):
    a, b, module, expected = ethanol_methanol_kernels(nu_max, lambda_max)
    features = module.invariants_from_features(a, module.nu2_features(a), b, module.nu2_features(b))
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    if nu_max >= 2:
        fa, fb = module.nu2_features(a), module.nu2_features(b)
        k2 = module.iterate(module.nu1(a, b), module.nu1(a, b), True)
        # the blocks each order reads: (0, +) for nu = 2, every (l, +) for 3, all for 4
        needed = {key for key in k2 if (nu_max >= 4 or key % 2 == 0) and (nu_max >= 3 or key == 0)}
        assert set(fa) == needed
        for key in needed:
            block = k2[key]
            width = block.shape[1]
            product = torch.einsum("iud,jvd->ijuv", fa[key], fb[key]).reshape(-1, width, width)
            torch.testing.assert_close(product, block, rtol=1e-12, atol=1e-12 * float(block.abs().max()))


@pytest.mark.parametrize("nu_max", [4, 5])
def test_weighted_sum_matches_kernels_in_value_and_gradient_also_scripted(nu_max):
    """nu_max = 4 goes through the nu = 2 features, 5 through kernel-space iterations."""
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    weights = torch.randn(nu_max + 1, len(sb), dtype=torch.float64)
    leaves = [c.detach().requires_grad_() for c in a]
    k = invariant_kernels(leaves, sa, b, sb, WignerHypers(nu_max=nu_max))
    expected = (k * weights.unsqueeze(1)).sum(dim=(0, 2))
    expected_gradients = torch.autograd.grad((expected**2).sum(), leaves)
    module = WignerKernels(WignerHypers(nu_max=nu_max, chunk_size=3))
    for implementation in (module, torch.jit.script(module)):
        leaves = [c.detach().requires_grad_() for c in a]
        energy = implementation.weighted_sum(leaves, sa, b, sb, weights)
        torch.testing.assert_close(energy, expected, rtol=1e-12, atol=1e-12 * float(expected.detach().abs().max()))
        gradients = torch.autograd.grad((energy**2).sum(), leaves)
        for g, e in zip(gradients, expected_gradients):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()))


def test_torchscript_module_matches_eager():
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    module = WignerKernels(WignerHypers(chunk_size=10))
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(a, sa, b, sb), module(a, sa, b, sb), rtol=1e-12, atol=0.0)
    for c in a:
        c.requires_grad_(True)
    assert scripted(a, sa, b, sb).requires_grad


@pytest.mark.parametrize("nu_max", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("lambda_max", [1, 3])
def test_collapsed_sums_equal_the_weighted_kernel_sum_also_scripted(nu_max, lambda_max, monkeypatch):
    # every order's tensors are built over chunks of environments: several chunks here (nu = 4 eigenpairs: few environments per species)
    monkeypatch.setattr(features_module, "COLLAPSE_CHUNK", 2)
    monkeypatch.setattr(features_module, "COLLAPSE_ENTRIES", 1)
    a, sa = densities(molecule("CH3CH2OH", 0))
    b, sb = densities(molecule("CH3OH", 1))
    module = WignerKernels(WignerHypers(nu_max=nu_max, lambda_max=lambda_max))
    weights = torch.randn(nu_max + 1, len(sb), dtype=torch.float64, generator=torch.Generator().manual_seed(nu_max))
    leaves = [c.detach().requires_grad_() for c in a]
    expected = module.weighted_sum(leaves, sa, b, sb, weights)
    collapsed = OrderFeatures(module).collapse(b, sb, weights, 3)
    for implementation in (module, torch.jit.script(module)):
        energy = implementation.collapsed_energy(leaves, sa, collapsed)
        torch.testing.assert_close(energy, expected, rtol=1e-12, atol=1e-12 * float(expected.detach().abs().max()))
        if nu_max == 0:
            continue
        expected_gradients = torch.autograd.grad((expected**2).sum(), leaves, allow_unused=True, retain_graph=True)
        gradients = torch.autograd.grad((energy**2).sum(), leaves, allow_unused=True)
        for leaf, g, e in zip(leaves, gradients, expected_gradients):
            g = torch.zeros_like(leaf) if g is None else g
            e = torch.zeros_like(leaf) if e is None else e
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()) + 1e-300)


@pytest.mark.parametrize("nu_max", [1, 2, 3, 4])
@pytest.mark.parametrize("lambda_max", [1, 3])
def test_order_features_are_the_kernels_as_scalar_products(nu_max, lambda_max):
    a, b, module, expected = ethanol_methanol_kernels(nu_max, lambda_max)
    features = OrderFeatures(module)
    phi_a, phi_b = features.order_features(a), features.order_features(b)
    assert len(phi_a) == nu_max
    for nu in range(nu_max):
        torch.testing.assert_close(phi_a[nu] @ phi_b[nu].T, expected[nu], rtol=1e-11, atol=1e-11 * float(expected[nu].abs().max()))
    with pytest.raises(ValueError, match="orders above 4"):
        OrderFeatures(WignerKernels(WignerHypers(nu_max=5))).order_features(a)


@pytest.mark.parametrize("lambda_max, widths", [(1, [2, 3]), (2, [4, 3, 2]), (3, [3, 3, 3, 3]), (3, [4, 3, 2, 2])])
def test_shortened_order_three_invariants_keep_the_scalar_products(lambda_max, widths):
    """One block per set of three l (weighted by its orderings, symmetric entries once)
    gives the same k^3 as every ordering of Phi^3, with about a third of its entries."""
    generator = torch.Generator().manual_seed(sum(widths))
    a = [torch.randn(5, 2 * l + 1, q, generator=generator, dtype=torch.float64) for l, q in enumerate(widths)]
    module = OrderFeatures(WignerKernels(WignerHypers(nu_max=3, lambda_max=lambda_max)))
    phi = module.order_features(a)[2]
    index, weight = module.order3_reduction(widths)
    short = phi[:, index] * weight
    assert len(torch.unique(index)) == len(index) and len(index) < 0.5 * phi.shape[1]
    expected = phi @ phi.T
    torch.testing.assert_close(short @ short.T, expected, rtol=1e-13, atol=1e-13 * float(expected.abs().max()))


def test_orders_above_four_do_not_collapse():
    a, sa = densities(molecule("CH3OH", 1))
    with pytest.raises(ValueError, match="do not collapse"):
        OrderFeatures(WignerKernels(WignerHypers(nu_max=5))).collapse(a, sa, torch.ones(6, len(sa), dtype=torch.float64), 3)
