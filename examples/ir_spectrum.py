"""Infrared spectrum of ethanol: NVE MD with an energy model, the dipole of the kept frames from a dipole
model, against GFN2-xTB dipoles recomputed on the same frames.

usage: python examples/ir_spectrum.py --energy quickstart/ethanol.pt [--dipole DIPOLE.pt | --dipole-train FILE]
                                      [--steps 8000] [--timestep 0.5] [--every 2] [--temperature 300] [--out ir] [--seed 0]

1. The dipole model: ``--dipole``, or fitted with the default configuration (as ``acdc-potential fit --target
   dipole``) on ``--dipole-train`` (default ``../shared/data/ethanol_dipole_train.extxyz``), written to OUT/dipole.pt.
2. NVE MD (velocity Verlet, ``--timestep`` fs) from the first structure of ``examples/ethanol_test.extxyz``, with
   Maxwell-Boltzmann velocities at ``--temperature`` K (no net momentum or rotation); every ``--every`` steps the
   frame and its model dipole are kept.
3. GFN2-xTB dipoles of the kept frames (tblite: ``pip install -e .[xtb]``).
4. Both spectra (:func:`acdc_potential.spectra.ir_spectrum`: Fourier transform of the autocorrelation of the
   dipole's time derivative, Hann window over the whole run, wavenumbers in cm^-1, point spacing ``1 / (c N dt)``),
   their strongest peaks matched to each other, OUT/ir_spectrum.png and OUT/ir_spectrum.yaml.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def dipole_model(args, out: Path) -> str:
    """The dipole model file: given, or fitted on ``--dipole-train``."""
    if args.dipole:
        return args.dipole
    from acdc_potential.config import FitConfig
    from acdc_potential.data import read_structures
    from acdc_potential.fit.dipole import fit_dipole
    from acdc_potential.fit.report import FitLog

    train = read_structures(args.dipole_train, require_dipole=True)
    model = fit_dipole(train, FitConfig(), FitLog())
    path = out / "dipole.pt"
    model.export(str(path), description=f"dipole model fitted on {args.dipole_train}")
    return str(path)


def trajectory(args, dipole_path: str):
    """Kept frames (``ase.Atoms``), their model dipoles ``[T, 3]`` (e*A), and seconds per MD step and per dipole."""
    import ase.io
    from ase import units
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    from acdc_potential.calculator import ACDCCalculator

    atoms = ase.io.read(str(HERE / "ethanol_test.extxyz"), 0)
    atoms.calc = ACDCCalculator(args.energy)
    dipoles = ACDCCalculator(dipole_path)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=np.random.default_rng(args.seed))
    Stationary(atoms)
    ZeroRotation(atoms)
    frames, values, dipole_seconds = [], [], 0.0

    def keep():
        nonlocal dipole_seconds
        frame = atoms.copy()
        frame.calc = dipoles
        started = time.perf_counter()
        values.append(frame.get_dipole_moment())
        dipole_seconds += time.perf_counter() - started
        frame.calc = None
        frames.append(frame)

    dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    dynamics.attach(keep, interval=args.every)
    started = time.perf_counter()
    dynamics.run(args.steps)
    seconds = time.perf_counter() - started - dipole_seconds
    return frames, np.array(values), seconds / args.steps, dipole_seconds / len(values)


def xtb_dipoles(frames):
    from tblite.ase import TBLite

    calculator = TBLite(method="GFN2-xTB", verbosity=0)
    values = []
    for frame in frames:
        frame.calc = calculator
        values.append(frame.get_dipole_moment())
        frame.calc = None
    return np.array(values)


def matched(model_peaks, reference_peaks):
    """Each reference peak with the nearest model peak."""
    return [(float(r), float(model_peaks[np.argmin(np.abs(model_peaks - r))])) for r in reference_peaks]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--energy", required=True, help="exported energy model of ethanol (e.g. quickstart/ethanol.pt)")
    parser.add_argument("--dipole", help="exported dipole model (default: fit one on --dipole-train)")
    parser.add_argument("--dipole-train", default=str(HERE.parent.parent / "shared" / "data" / "ethanol_dipole_train.extxyz"))
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--every", type=int, default=2, help="MD steps between kept frames")
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--peaks", type=int, default=8, help="strongest peaks of the xTB spectrum compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ir")
    args = parser.parse_args()

    from acdc_potential.spectra import ir_spectrum, peaks, resolution

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    path = dipole_model(args, out)
    print(f"dipole model {path} ({time.perf_counter() - started:.0f} s)")
    frames, model, step_seconds, dipole_seconds = trajectory(args, path)
    print(f"{args.steps} NVE steps of {args.timestep} fs: {1000 * step_seconds:.1f} ms per step, {1000 * dipole_seconds:.1f} ms per model dipole, {len(frames)} frames kept")
    started = time.perf_counter()
    reference = xtb_dipoles(frames)
    print(f"GFN2-xTB dipoles of the kept frames: {1000 * (time.perf_counter() - started) / len(frames):.1f} ms per frame")
    errors = 1000 * np.abs(model - reference)
    print(f"model dipoles against xTB on the trajectory: MAE {errors.mean():.1f} me*A per component")

    dt = args.timestep * args.every
    wavenumbers, intensity = ir_spectrum(model, dt)
    _, intensity_xtb = ir_spectrum(reference, dt)
    spacing = resolution(len(frames), dt)
    pairs = matched(peaks(wavenumbers, intensity, 2 * args.peaks), peaks(wavenumbers, intensity_xtb, args.peaks))
    print(f"\npoint spacing {spacing:.1f} cm^-1 (a line is about {2 * spacing:.0f} cm^-1 wide); Nyquist limit {1 / (2 * dt * 2.99792458e-5):.0f} cm^-1")
    print(f"{'xTB peak':>10} {'model peak':>11} {'difference':>11}   (cm^-1)")
    for r, m in pairs:
        print(f"{r:10.0f} {m:11.0f} {m - r:11.0f}" + ("" if abs(m - r) <= 2 * spacing else "   beyond the resolution"))
    plot(wavenumbers, intensity, intensity_xtb, pairs, out / "ir_spectrum.png")
    summary = {
        "steps": args.steps, "timestep_fs": args.timestep, "every": args.every, "temperature_K": args.temperature,
        "frames": len(frames), "spacing_cm-1": round(spacing, 2), "dipole_mae_meA": round(float(errors.mean()), 2),
        "ms_per_step": round(1000 * step_seconds, 2), "ms_per_model_dipole": round(1000 * dipole_seconds, 2),
        "peaks_cm-1": [{"xtb": round(r, 1), "model": round(m, 1)} for r, m in pairs],
    }
    (out / "ir_spectrum.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    print(f"\nwrote {out / 'ir_spectrum.png'} and {out / 'ir_spectrum.yaml'}")


def plot(wavenumbers, intensity, intensity_xtb, pairs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.6))
    axis.plot(wavenumbers, intensity_xtb, color="0.3", linewidth=1, label="GFN2-xTB dipoles")
    axis.plot(wavenumbers, intensity, color="C1", linewidth=1, alpha=0.8, label="dipole model")
    for r, _ in pairs:
        axis.axvline(r, color="0.8", linewidth=0.5, zorder=0)
    axis.set_xlim(0, 4000)
    axis.set_xlabel("wavenumber (cm$^{-1}$)")
    axis.set_ylabel("intensity (normalised)")
    axis.set_title("ethanol, NVE MD with the energy model: IR spectra from the dipole autocorrelation", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
