"""From structures to atomic environments: neighbour pairs, radial and angular bases, density
coefficients and their Jacobian, CG coupling, ACDC and MP-ACDC features. TorchScript where it
runs inside an exported model; imports nothing from :mod:`acdc_potential.kernels`,
:mod:`acdc_potential.model` or :mod:`acdc_potential.fit`."""
