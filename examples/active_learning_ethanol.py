"""On-the-fly active learning of ethanol with GFN2-xTB (tblite) as the reference.

Starts from ``--starts`` frames of ``examples/ethanol_train.extxyz`` (positions only: xTB labels
them), runs ``acdc-potential learn`` (Langevin MD at ``--temperature``, labelling the frames whose
force uncertainty exceeds the threshold), then compares the learned model with xTB on
``examples/ethanol_test.extxyz`` (frames of an xTB MD at 500 K). Needs the ``xtb`` extra:
``pip install tblite==0.8.0`` (or ``pip install .[xtb]``).

usage: python examples/active_learning_ethanol.py [--out ethanol-learn] [--starts 3] [--steps 2000]
                                                  [--temperature 500] [--max-labels 60]
The same run from the command line:
    acdc-potential learn START.extxyz --reference tblite.ase:TBLite --reference-args '{verbosity: 0}' \\
        --temperature 500 --steps 2000 --max-labels 60 -o ethanol-learn
"""

import argparse
from pathlib import Path

import ase
import ase.io
import numpy as np

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ethanol-learn")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temperature", type=float, default=500.0)
    parser.add_argument("--max-labels", type=int, default=60)
    args = parser.parse_args()

    from acdc_potential.cli import main as cli
    from acdc_potential.data import read_structures
    from acdc_potential.fit.checkpoint import SparseKRRModel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = ase.io.read(str(HERE / "ethanol_train.extxyz"), f":{args.starts}")
    start = out / "start.extxyz"
    ase.io.write(str(start), [ase.Atoms(numbers=a.numbers, positions=a.positions) for a in frames])
    code = cli([
        "learn", str(start), "--reference", "tblite.ase:TBLite", "--reference-args", "{verbosity: 0}",
        "--temperature", str(args.temperature), "--steps", str(args.steps), "--max-labels", str(args.max_labels), "-o", str(out / "run"),
    ])
    if code != 0:
        raise SystemExit(code)
    model = SparseKRRModel.load(str(out / "run" / "model.ckpt"))
    test = read_structures(str(HERE / "ethanol_test.extxyz"))
    predicted = model.predict(test, stress=False)
    forces = np.concatenate([s.forces for s in test])
    energies = np.array([s.energy for s in test])
    labelled = len(ase.io.read(str(out / "run" / "labelled.extxyz"), ":"))
    print(f"{labelled} xTB calculations; on {len(test)} xTB test frames: force MAE "
          f"{1000 * np.abs(predicted['forces'].numpy() - forces).mean():.1f} meV/A, energy MAE "
          f"{1000 * np.abs(predicted['energy'].numpy() - energies).mean() / 9:.2f} meV/atom")


if __name__ == "__main__":
    main()
