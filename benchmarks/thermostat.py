"""Whether Langevin MD with an exported model holds the thermostat's temperature.

Runs the Langevin dynamics of ``acdc-potential learn`` (:func:`acdc_potential.active.langevin`) with an
exported file through metatomic's ASE calculator (no uncertainty requested), samples the instantaneous
temperature every ``--every`` steps after the first fifth of the run, and prints its mean with the standard
error from ten block means (successive samples are correlated over the thermostat's time ``1 / (2
friction)``, so the spread of single samples says little about the mean).

usage: python benchmarks/thermostat.py MODEL.pt --structure FRAMES.extxyz[@INDEX] [--temperature 500]
                                       [--steps 20000] [--timestep 0.5] [--friction 0.01] [--every 10] [--threads 1]
"""

import argparse

import dataclasses

import ase.io
import numpy as np
import torch

from acdc_potential.active import langevin, thermalize
from acdc_potential.config import LearnConfig

BLOCKS = 10


def sampled_temperatures(atoms, temperature: float, steps: int, options: LearnConfig, every: int, seed: int = 0) -> np.ndarray:
    """Instantaneous temperatures (K) every ``every`` steps of ``learn``'s Langevin MD (timestep and
    friction of ``options``) of ``atoms`` (with a calculator) from momenta drawn at ``temperature``,
    after the first fifth of ``steps``."""
    thermalize(atoms, temperature, seed)
    dynamics = langevin(atoms, temperature, options, seed + 1)
    samples = []
    dynamics.attach(lambda: samples.append(atoms.get_temperature()), interval=every)
    dynamics.run(steps)
    return np.array(samples[len(samples) // 5 :])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported model (.pt)")
    parser.add_argument("--structure", required=True, help="FRAMES.extxyz[@INDEX] (INDEX default 0)")
    parser.add_argument("--temperature", type=float, default=500.0, help="K")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--timestep", type=float, default=LearnConfig.timestep, help="fs")
    parser.add_argument("--friction", type=float, default=LearnConfig.friction, help="1/fs")
    parser.add_argument("--every", type=int, default=10, help="steps between temperature samples")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from metatomic_ase import MetatomicCalculator

    torch.set_num_threads(args.threads)
    path, _, index = args.structure.partition("@")
    atoms = ase.io.read(path, index=int(index or 0))
    atoms.calc = MetatomicCalculator(args.model, uncertainty_threshold=None)
    options = dataclasses.replace(LearnConfig(), timestep=args.timestep, friction=args.friction)
    samples = sampled_temperatures(atoms, args.temperature, args.steps, options, args.every)
    blocks = samples[: len(samples) // BLOCKS * BLOCKS].reshape(BLOCKS, -1).mean(axis=1)
    error = blocks.std(ddof=1) / np.sqrt(BLOCKS)
    print(f"{args.model}, {atoms.get_chemical_formula()}: {args.steps} Langevin steps of {args.timestep} fs at {args.temperature:.0f} K "
          f"(friction {args.friction} 1/fs): mean temperature {samples.mean():.0f} K +- {error:.0f} K over {len(samples)} samples; "
          f"block means {np.round(blocks).astype(int).tolist()} K")


if __name__ == "__main__":
    main()
