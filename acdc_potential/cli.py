"""``acdc-potential``: fit, evaluate and export potentials from the command line.

    acdc-potential fit TRAIN.extxyz -o MODEL.pt [--test TEST.extxyz] [--config CONFIG.yaml]
    acdc-potential eval MODEL.pt DATA.extxyz [--plot PARITY.png]
    acdc-potential export CHECKPOINT.ckpt -o MODEL.pt [--dtype float32]
    acdc-potential config                  # print every option with its default

Units: A, eV, eV/A, eV/A^3 (ASE's stress sign). Labels are read from the extxyz keys
``energy``, ``forces``, ``stress`` (or ``virial``); other names through the ``keys``
section of the configuration or ``--energy-key`` and friends.
"""

import argparse
import sys
import time
from pathlib import Path

import yaml


def _keys(keys, args):
    """``keys`` (a ``LabelKeys``) with the names given by ``--energy-key`` and friends."""
    for name in ("energy", "forces", "stress"):
        value = getattr(args, f"{name}_key", None)
        if value:
            setattr(keys, name, value)
    return keys


def _print_errors(tables):
    from .evaluation import format_table

    print()
    print(format_table(tables))


def fit_command(args) -> int:
    from .config import FitConfig
    from .data import read_structures
    from .evaluation import errors, pairs_of, parity_plots, predict_with_file, predictions_of
    from .fit.driver import fit

    config = FitConfig.from_yaml(args.config)
    keys = _keys(config.keys, args)
    start = time.perf_counter()
    train = read_structures(args.train, keys=keys)
    test = read_structures(args.test, keys=keys) if args.test else None
    print(f"read {len(train)} training structures from {args.train}" + (f", {len(test)} test structures from {args.test}" if test else ""))

    model = fit(train, config, verbose=True)
    checkpoint = Path(args.output).with_suffix(".ckpt")
    model.save(str(checkpoint))
    model.export(args.output, description=f"fitted on {args.train}")
    print(f"wrote the model to {args.output} and the checkpoint to {checkpoint}")

    tables = {"train": errors(pairs_of(train, predictions_of(model, train)))}
    if model.report is not None and model.report.validation_errors:
        # the tuning report is in eV (per atom), eV/A and eV/A^3
        tables["validation"] = {
            quantity: {name: 1000.0 * value for name, value in values.items()}
            for quantity, values in model.report.validation_errors.items()
        }
    if test:
        test_pairs = pairs_of(test, predict_with_file(args.output, test))
        tables["test"] = errors(test_pairs)
        plot = Path(args.output).with_suffix(".test-parity.png")
        parity_plots(test_pairs, str(plot), title=f"{Path(args.output).name} on {Path(args.test).name}")
        print(f"parity plots of the test set: {plot}")
    _print_errors(tables)
    for message in model.warnings:
        print(f"warning: {message}")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    return 0


def eval_command(args) -> int:
    from .data import LabelKeys, read_structures
    from .evaluation import errors, pairs_of, parity_plots, predict_with_file

    structures = read_structures(args.data, keys=_keys(LabelKeys(), args))
    pairs = pairs_of(structures, predict_with_file(args.model, structures))
    plot = args.plot or str(Path(args.data).with_suffix(".parity.png").name)
    parity_plots(pairs, plot, title=f"{Path(args.model).name} on {Path(args.data).name}")
    _print_errors({Path(args.data).stem: errors(pairs)})
    print(f"\nparity plots: {plot}")
    return 0


def export_command(args) -> int:
    import torch

    from .fit.checkpoint import SparseKRRModel

    model = SparseKRRModel.load(args.checkpoint)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    model.export(args.output, dtype=dtype, description=f"exported from {args.checkpoint}")
    print(f"wrote {args.output} ({args.dtype})")
    return 0


def config_command(args) -> int:
    from .config import FitConfig

    print(yaml.safe_dump(FitConfig().to_dict(), sort_keys=False))
    return 0


def _add_keys(parser):
    parser.add_argument("--energy-key", help="extxyz key of the energy (default: energy)")
    parser.add_argument("--forces-key", help="extxyz key of the forces (default: forces)")
    parser.add_argument("--stress-key", help="extxyz key of the stress (default: stress; virial is read when stress is absent)")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="acdc-potential", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a potential and export it", description="Fit a sparse-KRR potential on TRAIN and export it as one metatomic TorchScript file; also writes MODEL.ckpt (the checkpoint) and, with --test, parity plots.")
    fit.add_argument("train", help="training structures (extxyz)")
    fit.add_argument("-o", "--output", required=True, help="exported model file (.pt)")
    fit.add_argument("--test", help="test structures (extxyz), evaluated with the exported file")
    fit.add_argument("--config", help="YAML configuration; `acdc-potential config` prints every option")
    _add_keys(fit)
    fit.set_defaults(run=fit_command)

    evaluate = commands.add_parser("eval", help="errors and parity plots of an exported model on a data set")
    evaluate.add_argument("model", help="exported model file (.pt)")
    evaluate.add_argument("data", help="labelled structures (extxyz)")
    evaluate.add_argument("--plot", help="parity-plot PNG (default: DATA.parity.png in the current directory)")
    _add_keys(evaluate)
    evaluate.set_defaults(run=eval_command)

    export = commands.add_parser("export", help="export a checkpoint as a model file")
    export.add_argument("checkpoint", help="checkpoint written by `fit` (.ckpt)")
    export.add_argument("-o", "--output", required=True, help="exported model file (.pt)")
    export.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision of the exported model (default float64)")
    export.set_defaults(run=export_command)

    config = commands.add_parser("config", help="print the default configuration (YAML)")
    config.set_defaults(run=config_command)
    return main


def main(argv=None) -> int:
    from .errors import StructureError

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (StructureError, FileNotFoundError, ValueError) as error:
        print(f"acdc-potential {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
