"""Our torch real spherical harmonics against sphericart, and their derivatives."""

import pytest
import sphericart.torch
import torch

from acdc_potential.descriptors.harmonics import SphericalHarmonics


@pytest.mark.parametrize("l_max", [0, 1, 3, 6, 9])
def test_matches_sphericart(l_max):
    vectors = torch.randn(500, 3, dtype=torch.float64) * 3
    vectors[0] = torch.tensor([0.0, 0.0, 1.5])  # on the z axis
    vectors[1] = torch.tensor([0.0, 0.0, -0.5])
    ours = SphericalHarmonics(l_max)(vectors)
    reference = sphericart.torch.SphericalHarmonics(l_max)(vectors)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-10)


def test_gradients_match_sphericart():
    vectors = torch.randn(50, 3, dtype=torch.float64, requires_grad=True)
    projection = torch.randn(50, 25, dtype=torch.float64)
    (ours,) = torch.autograd.grad((SphericalHarmonics(4)(vectors) * projection).sum(), vectors)
    (reference,) = torch.autograd.grad((sphericart.torch.SphericalHarmonics(4)(vectors) * projection).sum(), vectors)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-10)


def test_second_derivatives_by_finite_differences():
    vectors = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    harmonics = SphericalHarmonics(3)
    assert torch.autograd.gradgradcheck(lambda v: harmonics(v), (vectors,))


def test_torchscript_and_float32():
    scripted = torch.jit.script(SphericalHarmonics(5))
    vectors = torch.randn(40, 3, dtype=torch.float64)
    torch.testing.assert_close(scripted(vectors), SphericalHarmonics(5)(vectors), atol=0, rtol=0)
    single = scripted(vectors.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), scripted(vectors), atol=1e-5, rtol=1e-5)
