"""Infrared spectra from the dipoles along an MD trajectory.

The classical IR line shape is the Fourier transform of the autocorrelation of the dipole's time
derivative (the form used with MD dipoles since Berens and Wilson, J. Chem. Phys. 74, 4872 (1981)):

    I(nu~) ~ int dt e^{-2 pi i c nu~ t} <mu'(0) . mu'(t)>  =  |FT[w(t) mu'(t)]|^2 / T   (Wiener-Khinchin)

with ``mu'`` the time derivative of the dipole (central differences), ``w`` a Hann window over the run
(it trades a wider line, about twice ``1 / (c T)``, for side lobes 31 dB down), summed over the three
components. Wavenumbers in cm^-1: ``nu~ = f / c`` with ``c = 2.99792458e-5 cm/fs``; the spacing of the
points is ``1 / (c N dt)``, the resolution of a line about twice that. Intensities are in arbitrary units
(normalised to a largest value of 1); no quantum correction factor is applied (it rescales intensities,
not positions).
"""

from typing import Tuple

import numpy as np

# speed of light in cm/fs
SPEED_OF_LIGHT = 2.99792458e-5


def ir_spectrum(dipoles: np.ndarray, timestep: float) -> Tuple[np.ndarray, np.ndarray]:
    """Wavenumbers (cm^-1) and normalised intensities of the dipoles ``[T, 3]`` (any unit) sampled every
    ``timestep`` fs. Frequencies above the Nyquist limit ``1 / (2 c dt)`` are not resolved."""
    dipoles = np.asarray(dipoles, dtype=np.float64)
    if dipoles.ndim != 2 or dipoles.shape[1] != 3 or dipoles.shape[0] < 8:
        raise ValueError(f"need dipoles of shape [T >= 8, 3], got {dipoles.shape}")
    derivative = np.gradient(dipoles, timestep, axis=0)
    derivative = derivative - derivative.mean(axis=0)
    window = np.hanning(len(derivative))[:, None]
    power = (np.abs(np.fft.rfft(derivative * window, axis=0)) ** 2).sum(axis=1)
    wavenumbers = np.fft.rfftfreq(len(derivative), timestep) / SPEED_OF_LIGHT
    return wavenumbers, power / power.max()


def resolution(n_frames: int, timestep: float) -> float:
    """Spacing of the spectrum's points, cm^-1 (a Hann-windowed line is about twice as wide)."""
    return 1.0 / (SPEED_OF_LIGHT * n_frames * timestep)


def peaks(wavenumbers: np.ndarray, intensity: np.ndarray, count: int = 8, minimum: float = 0.02, low: float = 200.0) -> np.ndarray:
    """Positions (cm^-1) of the ``count`` highest local maxima above ``low`` cm^-1 whose prominence exceeds
    ``minimum`` of the largest intensity, in increasing wavenumber."""
    from scipy.signal import find_peaks

    keep = wavenumbers >= low
    found, properties = find_peaks(intensity[keep], prominence=minimum * intensity[keep].max())
    strongest = found[np.argsort(properties["prominences"])[::-1][:count]]
    return np.sort(wavenumbers[keep][strongest])
