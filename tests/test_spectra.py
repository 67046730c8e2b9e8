"""IR spectra from dipole trajectories: known frequencies come back where they were put."""

import numpy as np
import pytest

from acdc_potential.spectra import SPEED_OF_LIGHT, ir_spectrum, peaks, resolution


def test_sinusoidal_dipoles_give_peaks_at_their_wavenumbers_within_the_resolution():
    dt, n = 1.0, 8000  # fs
    t = np.arange(n) * dt
    rng = np.random.default_rng(0)
    lines = {1043.0: [0.3, 0.0, 0.1], 1650.0: [0.0, 0.05, 0.0], 3012.0: [0.03, 0.03, 0.0]}
    dipoles = 0.01 * rng.normal(size=(n, 3)) * 1e-3 + np.array([0.5, -0.2, 0.1])
    for wavenumber, amplitude in lines.items():
        phase = rng.uniform(0, 2 * np.pi)
        dipoles += np.outer(np.cos(2 * np.pi * SPEED_OF_LIGHT * wavenumber * t + phase), amplitude)
    wavenumbers, intensity = ir_spectrum(dipoles, dt)
    assert intensity.max() == pytest.approx(1.0)
    found = peaks(wavenumbers, intensity, count=3)
    spacing = resolution(n, dt)
    assert spacing == pytest.approx(wavenumbers[1] - wavenumbers[0])
    np.testing.assert_allclose(found, sorted(lines), atol=spacing)
    # the derivative weighs a line by its frequency squared: 3012's, of 0.72 times the squared amplitude
    # of 1650's, is 2.4 times higher (peak heights, within two points of each line)
    at = {w: intensity[np.abs(wavenumbers - w) < 2 * spacing].max() for w in lines}
    assert at[1043.0] > at[3012.0] > at[1650.0]


def test_too_short_or_misshapen_dipoles_are_refused():
    with pytest.raises(ValueError, match=r"shape \[T >= 8, 3\]"):
        ir_spectrum(np.zeros((5, 3)), 1.0)
    with pytest.raises(ValueError):
        ir_spectrum(np.zeros((100, 2)), 1.0)
