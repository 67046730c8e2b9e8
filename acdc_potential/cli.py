"""``acdc-potential``: fit, evaluate and export potentials from the command line.

    acdc-potential fit TRAIN.extxyz -o MODEL.pt [--test TEST.extxyz] [--config CONFIG.yaml] [--workers N | --scheduler ADDRESS]
    acdc-potential fit TRAIN.extxyz -o DIPOLE.pt --target dipole [--test TEST.extxyz] [--config CONFIG.yaml]
    acdc-potential eval MODEL.pt DATA.extxyz [--plot PARITY.png] [--no-uncertainties]
    acdc-potential learn START.extxyz --reference MODULE:CLASS [--reference-args ARGS] [-o FOLDER] [--config CONFIG.yaml] [--steps N] [--temperature T ...]
    acdc-potential export CHECKPOINT.ckpt -o MODEL.pt [--dipole DIPOLE.ckpt] [--dtype float32]
    acdc-potential config [-o CONFIG.yaml]    # every option, its meaning and its default

``fit`` writes, beside MODEL.pt: MODEL.ckpt (the checkpoint), MODEL.log (what it printed),
MODEL.report.yaml (errors, chosen hyperparameters, grid, timings, memory, versions, data
fingerprints, the configuration used, the calibration of the uncertainties), MODEL.config.yaml
(that configuration, to refit) and, with --test, MODEL.test-parity.png and
MODEL.test-calibration.png. ``eval`` adds its errors and the calibration table of the
uncertainties to MODEL.report.yaml when it is there.

Units: A, eV, eV/A, eV/A^3 (ASE's stress sign), e*A. Labels are read from the extxyz keys
``energy``, ``forces``, ``stress`` (or ``virial``), ``dipole``; other names through the ``keys``
section of the configuration or ``--energy-key`` and friends.
"""

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path

import yaml

from . import __version__


def _keys(keys, args):
    """``keys`` (a ``LabelKeys``) with the names given by ``--energy-key`` and friends."""
    for name in ("energy", "forces", "stress", "dipole"):
        value = getattr(args, f"{name}_key", None)
        if value:
            setattr(keys, name, value)
    return keys


def _threads(args, n_atoms, log) -> int:
    """Set the threads ``--threads`` asks for, or the default for structures of ``n_atoms``, and say so."""
    from .runtime import SMALL_SYSTEM, available_cores, default_threads, use_threads

    if args.threads is not None:
        threads, why = args.threads, "--threads"
    else:
        threads = default_threads(n_atoms)
        why = f"the default: one for structures of fewer than {SMALL_SYSTEM} atoms, else all {available_cores()} available cores"
    log(f"using {use_threads(threads)} thread(s) ({why})")
    return threads


def _tables(model, train, test, test_path, output, threads):
    """Errors on the training set (in memory), the validation split and the test set (the exported file)."""
    from .evaluation import errors, pairs_of, parity_plots, predict_with_file, predictions_of

    tables = {"train": errors(pairs_of(train, predictions_of(model, train)))}
    if model.report is not None and model.report.validation_errors:
        # the tuning report is in eV (per atom), eV/A and eV/A^3
        tables["validation"] = {
            quantity: {name: value if name == "count" else 1000.0 * value for name, value in values.items()}
            for quantity, values in model.report.validation_errors.items()
        }
    calibration = {}
    if test:
        from .calculator import ACDCCalculator

        calculator = ACDCCalculator(output, uncertainty_threshold=None, threads=threads)
        predictions = predict_with_file(calculator, test)
        test_pairs = pairs_of(test, predictions)
        tables["test"] = errors(test_pairs)
        title = f"{Path(output).name} on {Path(test_path).name}"
        plot = Path(output).with_suffix(".test-parity.png")
        parity_plots(test_pairs, str(plot), title=title)
        print(f"parity plots of the test set: {plot}")
        calibration["test"] = _calibration(calculator, test, predictions, str(Path(output).with_suffix(".test-calibration.png")), title)
    return tables, calibration


def _calibration(calculator, structures, predictions, plot: str, title: str) -> dict:
    """:func:`~acdc_potential.evaluation.calibration_table` of the uncertainties of ``calculator``'s
    file on ``structures`` (``predictions``: its :func:`~acdc_potential.evaluation.predict_with_file`),
    with its plot written to ``plot``."""
    from .evaluation import calibration_plot, calibration_table, uncertainties_with_file

    sigmas = uncertainties_with_file(calculator, structures)
    calibration_plot(structures, predictions, sigmas, plot, title=title)
    print(f"calibration plots of the uncertainties: {plot}")
    return calibration_table(structures, predictions, sigmas)


def fit_command(args) -> int:
    import dataclasses

    from .config import FitConfig
    from .data import check_labels, read_structures, species_of
    from .fit.driver import check_config

    config = FitConfig.from_yaml(args.config)
    options = {name: False for name in ("energies", "forces", "stress") if getattr(args, f"no_{name}")}
    if args.seed is not None:
        options["seed"] = args.seed
    if args.target is not None:
        options["target"] = args.target
    if args.device is not None:
        options["device"] = args.device
    output = Path(args.output)
    cluster = {"checkpoint": config.cluster.checkpoint or str(output.with_suffix(".partial"))}
    if args.workers is not None:
        if args.workers < 0:
            raise ValueError(f"--workers {args.workers}: the number of worker processes must be >= 0")
        cluster["workers"] = args.workers
    if args.scheduler:
        cluster["scheduler"] = args.scheduler
    config = dataclasses.replace(
        config, keys=_keys(config.keys, args), options=dataclasses.replace(config.options, **options),
        cluster=dataclasses.replace(config.cluster, **cluster),
    )
    check_config(config)  # before anything is read or written
    if config.options.target == "dipole":
        return _fit_dipole(args, config, output)
    if config.cluster.workers or config.cluster.scheduler:
        return _fit_on_cluster(args, config, output)
    train = read_structures(args.train, keys=config.keys)
    check_labels(train, args.train, config.keys, config.options.energies, config.options.forces, config.options.stress)
    test = _test_set(args, config, species_of(train))
    with _fit_log(output.with_suffix(".log")) as log:
        log(f"acdc-potential {__version__}: read {len(train)} training structures from {args.train}"
            + (f", {len(test)} test structures from {args.test}" if test else ""))
        return _fit_and_report(args, config, train, train, test, output, log)


def _fit_dipole(args, config, output: Path) -> int:
    """``fit --target dipole``: a dipole model, its checkpoint, file, errors and report."""
    from .data import check_dipoles, read_structures, species_of
    from .evaluation import errors, format_table, pairs_of, parity_plots, predict_with_file
    from .fit.checkpoint import WignerDipoleModel
    from .fit.dipole import fit_dipole
    from .fit.report import fingerprint, peak_memory_gb, versions, write_report

    train = read_structures(args.train, keys=config.keys)
    check_dipoles(train, args.train, config.keys)
    test = read_structures(args.test, keys=config.keys, species=species_of(train)) if args.test else []
    if test:
        check_dipoles(test, args.test, config.keys)
    with _fit_log(output.with_suffix(".log")) as log:
        log(f"acdc-potential {__version__}: dipole model; read {len(train)} training structures from {args.train}"
            + (f", {len(test)} test structures from {args.test}" if test else ""))
        threads = _threads(args, None, log)
        model = fit_dipole(train, config, log)
        model.save(str(output.with_suffix(".ckpt")))
        model.export(str(output), description=f"dipole model fitted on {args.train}")
        log(f"wrote the model to {output} and the checkpoint to {output.with_suffix('.ckpt')}")
        with log.stage("errors"):
            tables = {"train": errors(pairs_of(train, {"dipole": list(model.predict(train).numpy())}))}
            choice = model.report["choice"]
            tables["validation"] = {"dipole": {"mae": 1000 * choice["validation_mae"], "rmse": 1000 * choice["validation_rmse"]}}
            if test:
                test_pairs = pairs_of(test, predict_with_file(str(output), test))
                tables["test"] = errors(test_pairs)
                plot = output.with_suffix(".test-parity.png")
                parity_plots(test_pairs, str(plot), title=f"{output.name} on {Path(args.test).name}")
                print(f"parity plots of the test set: {plot}")
        print("\n" + format_table(tables))
        used = config.to_dict()
        if isinstance(model, WignerDipoleModel):
            used["dipole"]["nu_max"] = int(model.kernel.nu_max)
        with open(output.with_suffix(".config.yaml"), "w") as file:
            yaml.safe_dump(used, file, sort_keys=False)
        data = {"train": {**fingerprint(args.train), "structures": len(train)}}
        if test:
            data["test"] = {**fingerprint(args.test), "structures": len(test)}
        report = {
            "acdc-potential": "fit report", "target": "dipole", "command": ["acdc-potential", *args.argv], "data": data,
            "configuration": used, "species": model.species, **model.report, "errors_meA": tables,
            "timings_s": {**{k: round(v, 2) for k, v in log.timings.items()}, "total": round(log.elapsed(), 2)},
            "threads": threads, "peak_memory_GB": round(peak_memory_gb(), 3), "peak_memory_after_GB": dict(log.peaks), "versions": versions(),
        }
        write_report(str(output.with_suffix(".report.yaml")), report)
        log(f"report: {output.with_suffix('.report.yaml')}, log: {output.with_suffix('.log')}, configuration used: {output.with_suffix('.config.yaml')}")
    return 0


@contextlib.contextmanager
def _fit_log(path: Path, append: bool = False):
    """The command's :class:`~acdc_potential.fit.report.FitLog` (printing, and writing ``path``:
    MODEL.log of a fit, FOLDER/learn.log of a learning run, appended to when ``append``), with
    warnings as lines of it (a fit's report lists them again), restored and closed whatever happens.
    Opened only once the inputs are checked, so that a bad input file writes nothing."""
    from .fit.report import FitLog

    log = FitLog(verbose=True, path=str(path), append=append)
    shown = warnings.showwarning
    warnings.showwarning = lambda message, category, *where, **options: log(f"warning: {message}")
    try:
        yield log
    finally:
        warnings.showwarning = shown
        log.close()


def _test_set(args, config, species):
    """The test structures (checked before the fit: of the training species and labelled), or ``None``."""
    from .data import check_labels, read_structures

    if not args.test:
        return None
    test = read_structures(args.test, keys=config.keys, species=species)
    check_labels(test, args.test, config.keys, config.options.energies, config.options.forces, config.options.stress)
    return test


def _fit_on_cluster(args, config, output: Path) -> int:
    """``fit_command`` on a Dask cluster: the workers read and survey the training file, nothing
    of its size comes to this process; the training errors are those of a random sample."""
    import random

    from .data import available_keys, check_label_counts
    from .fit.driver import survey_source
    from .fit.executors import make_executor
    from .fit.report import peak_memory_gb
    from .fit.sources import ExtxyzSource

    source = ExtxyzSource(args.train, config.keys)
    with make_executor(config.cluster) as executor:
        start = time.perf_counter()
        survey = survey_source(source, executor, config.cluster.task_structures, desc="survey")
        seconds, survey_peak = time.perf_counter() - start, round(peak_memory_gb(), 3)
        check_label_counts(survey.labels.any(axis=0), bool(survey.periodic.any()), args.train, config.keys,
                           (config.options.energies, config.options.forces, config.options.stress),
                           lambda: available_keys(source.read(range(min(len(source), 100)))))
        test = _test_set(args, config, survey.species())
        positions = sorted(random.Random(config.options.seed).sample(range(len(source)), min(len(source), TRAIN_SAMPLE)))
        sample = source.read(positions)
        with _fit_log(output.with_suffix(".log")) as log:
            where = config.cluster.scheduler or f"a local cluster of {config.cluster.workers} worker(s)"
            log(f"acdc-potential {__version__}: {len(source)} training structures in {args.train}, fitted on {where}; "
                f"its workers read and checked them in {seconds:.1f} s" + (f", {len(test)} test structures from {args.test}" if test else ""))
            log.timings["survey"] = seconds
            log.peaks["survey"] = survey_peak
            return _fit_and_report(args, config, source, sample, test, output, log, executor=executor, survey=survey)


# training structures whose errors a fit on a cluster reports (a random sample; all of a smaller set)
TRAIN_SAMPLE = 1000


def _fit_and_report(args, config, train, train_checked, test, output: Path, log, **fit_options) -> int:
    """The fit of ``fit_command`` once its inputs are checked: model, checkpoint, errors, report.
    ``train`` is what is fitted (a list or a source), ``train_checked`` the structures whose errors are tabulated."""
    from .evaluation import format_calibration, format_table
    from .fit.driver import fit
    from .fit.report import fingerprint, fit_report, write_report
    from .fit.tasks import discard_kept

    threads = _threads(args, None, log)
    model = fit(train, config, log=log, **fit_options)
    precision = _precision(model, test or train_checked, log)  # before the save: its warning goes into the checkpoint
    model.save(str(output.with_suffix(".ckpt")))
    model.export(str(output), description=f"fitted on {args.train}")
    discard_kept(config.cluster.checkpoint)  # the model is written: the kept triangles are of no more use
    log(f"wrote the model to {output} and the checkpoint to {output.with_suffix('.ckpt')}")
    with log.stage("errors"):
        tables, calibration = _tables(model, train_checked, test, args.test, str(output), threads)
    if len(train_checked) < len(train):
        tables = {f"train ({len(train_checked)} of {len(train)})" if name == "train" else name: table for name, table in tables.items()}
    print("\n" + format_table(tables))
    if calibration:
        print("\nuncertainties (calibrated standard deviations against errors)\n" + format_calibration(calibration))

    used = model_config(config, model)
    with open(output.with_suffix(".config.yaml"), "w") as file:
        yaml.safe_dump(used, file, sort_keys=False)
    data = {"train": {**fingerprint(args.train), "structures": len(train)}}
    if test:
        data["test"] = {**fingerprint(args.test), "structures": len(test)}
    report = fit_report(model, used, data, tables, log, ["acdc-potential", *args.argv], threads)
    report["numerical_precision"] = precision
    report["uncertainties"] = {"calibration": None if model.calibration is None else model.calibration.to_dict(), **calibration}
    write_report(str(output.with_suffix(".report.yaml")), report)
    if model.warnings:
        log(f"{len(model.warnings)} warning(s), listed in the report")
    log(f"report: {output.with_suffix('.report.yaml')}, log: {output.with_suffix('.log')}, configuration used: {output.with_suffix('.config.yaml')}")
    return 0


def _precision(model, structures, log) -> dict:
    """:func:`~acdc_potential.evaluation.numerical_precision` of the exported module (float64) on the
    first structure of ``structures``, rounded for the report; above the precision float64 allows
    (:func:`~acdc_potential.evaluation.precision_warning`), a warning in the log and the model's warnings."""
    from .evaluation import numerical_precision, precision_warning

    structure = structures[0]
    module = model.scripted()
    probe = numerical_precision(module, structure.atoms)
    warning = precision_warning(probe, len(structure.atoms), bool(module.head.plain_pairs))
    if warning is not None:
        log(f"warning: {warning}")
        model.warnings.append(warning)
    return {"structure": f"{structure.atoms.get_chemical_formula()} (first of its file)", **{k: float(f"{v:.3g}") for k, v in probe.items()}}


def model_config(config, model) -> dict:
    """``config`` as a dict with what the fit chose in place of ``auto`` (the grid's density and ``nu_max``)."""
    used = config.to_dict()
    if model.kernel.kind == "wigner":
        used["kernel"]["nu_max"] = int(model.kernel.nu_max)
        used["density"] = dict(vars(model.density_hypers))
    return used


def eval_command(args) -> int:
    import dataclasses

    from .calculator import ACDCCalculator
    from .data import LabelKeys, check_dipoles, check_labels, read_structures
    from .evaluation import errors, format_calibration, format_table, pairs_of, parity_plots, predict_with_file
    from .fit.report import extend_report

    device = _device(args.device)
    calculator = ACDCCalculator(args.model, device=device, uncertainty_threshold=None)
    keys = _keys(LabelKeys(), args)
    # validated against the model's species here, so that errors name structures by their place in the file
    structures = read_structures(args.data, keys=keys, species=calculator.species)
    energy = calculator.has_energy
    # a file with both models compares dipoles when the data have them, a dipole model needs them
    if calculator.has_dipole and (not energy or any(s.dipole is not None for s in structures)):
        check_dipoles(structures, args.data, keys)
    used = {"energy": energy and not args.no_energies, "forces": energy and not args.no_forces, "stress": energy and not args.no_stress, "dipole": True, "|dipole|": True}
    if energy:
        check_labels(structures, args.data, keys, used["energy"], used["forces"], used["stress"])
    calculator.threads = _threads(args, max(s.n_atoms for s in structures), print)
    predictions = predict_with_file(calculator, structures)
    pairs = {kind: values for kind, values in pairs_of(structures, predictions).items() if used[kind]}
    plot = args.plot or str(Path(args.data).with_suffix(".parity.png").name)
    parity_plots(pairs, plot, title=f"{Path(args.model).name} on {Path(args.data).name}")
    table = errors(pairs)
    print("\n" + format_table({Path(args.data).stem: table}))
    print(f"\nparity plots: {plot}")
    calibration = None
    if energy and not args.no_uncertainties:
        # the labels left out of the errors are left out of the calibration too
        labelled = [dataclasses.replace(s, energy=s.energy if used["energy"] else None, forces=s.forces if used["forces"] else None) for s in structures]
        calibration = _calibration(calculator, labelled, predictions, str(Path(plot).with_suffix("")) + "-calibration.png", f"{Path(args.model).name} on {Path(args.data).name}")
        print("\nuncertainties (calibrated standard deviations against errors)\n" + format_calibration({Path(args.data).stem: calibration}))
    report = Path(args.model).with_suffix(".report.yaml")
    if report.is_file():
        extend_report(str(report), Path(args.data).stem, args.data, table, calibration)
        print(f"added to the report {report}")
    return 0


def learn_command(args) -> int:
    import dataclasses

    from .active import ActiveLearner, reference_calculator
    from .config import FitConfig
    from .data import read_frames
    from .runtime import default_threads, use_threads

    config = FitConfig.from_yaml(args.config)
    learn = {name: getattr(args, name) for name in ("steps", "threshold", "max_labels") if getattr(args, name) is not None}
    if args.temperature:
        learn["temperatures"] = [float(t) for t in args.temperature]
    options = {name: False for name in ("energies", "forces", "stress") if getattr(args, f"no_{name}")}
    config = config.overridden("learn", learn).overridden("options", options)
    config = dataclasses.replace(config, keys=_keys(config.keys, args))
    starts = read_frames(args.start)
    reference = reference_calculator(args.reference, _reference_arguments(args.reference_args))
    folder = Path(args.output) if args.output else Path(args.start).with_name(Path(args.start).stem + "-learn")
    use_threads(args.threads if args.threads is not None else default_threads(len(starts[0])))  # the MD's structures
    folder.mkdir(parents=True, exist_ok=True)
    with _fit_log(folder / "learn.log", append=True) as log:
        log(f"acdc-potential {__version__} learn: {len(starts)} starting structures from {args.start}, reference {args.reference}, folder {folder}")
        name = args.reference + (f" {args.reference_args}" if args.reference_args else "")
        ActiveLearner(starts, reference, config, str(folder), log, reference_name=name).run()
    return 0


def _reference_arguments(text):
    """The keyword arguments of ``--reference-args`` (a YAML or JSON mapping of plain data)."""
    if not text:
        return {}
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, dict):
        raise ValueError(f"--reference-args {text!r}: expected a mapping of keyword arguments, e.g. '{{verbosity: 0}}'")
    return values


def export_command(args) -> int:
    import torch

    from .fit.checkpoint import DipoleModel, SparseKRRModel, export_models, load_checkpoint

    model = load_checkpoint(args.checkpoint)
    dipole = load_checkpoint(args.dipole) if args.dipole else None
    if args.dipole and not isinstance(dipole, DipoleModel):
        raise ValueError(f"--dipole {args.dipole}: not a dipole model's checkpoint (fit one with `acdc-potential fit --target dipole`)")
    if isinstance(model, DipoleModel) and dipole is not None:
        raise ValueError(f"{args.checkpoint} is a dipole model's checkpoint; give the energy model's first, the dipole model's with --dipole")
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    description = f"exported from {args.checkpoint}" + (f" and {args.dipole}" if dipole is not None else "")
    if isinstance(model, SparseKRRModel):
        export_models(model, dipole, args.output, dtype=dtype, description=description)
    else:
        model.export(args.output, dtype=dtype, description=description)
    print(f"wrote {args.output} ({args.dtype})")
    return 0


def config_command(args) -> int:
    from .config import FitConfig

    text = FitConfig.template()
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote the configuration template to {args.output}")
    else:
        print(text, end="")
    return 0


def _add_labels(parser):
    parser.add_argument("--energy-key", help="extxyz key of the energy (default: energy)")
    parser.add_argument("--forces-key", help="extxyz key of the forces (default: forces)")
    parser.add_argument("--stress-key", help="extxyz key of the stress (default: stress; virial is read when stress is absent)")
    parser.add_argument("--dipole-key", help="extxyz key of the dipole, e*A (default: dipole)")
    parser.add_argument("--no-energies", action="store_true", help="use no energies (fit or compare forces only)")
    parser.add_argument("--no-forces", action="store_true", help="use no forces (fit or compare energies only)")
    parser.add_argument("--no-stress", action="store_true", help="use no stress")


def _add_threads(parser):
    parser.add_argument("--threads", type=int, help="torch threads (default: one for structures of fewer than 100 atoms, else every available core; a fit uses every core)")


def _device(name):
    """The torch device ``name`` (``None``: the model's best); an error saying why when it cannot be used here."""
    from .runtime import usable_device

    if name is None:
        return None
    try:
        usable_device(name)
    except ValueError as error:
        raise ValueError(f"--device {error}") from None
    return name


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="acdc-potential", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    main.add_argument("--version", action="version", version=version_line())
    commands = main.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a potential and export it", description="Fit a sparse-KRR potential on TRAIN and export it as one metatomic TorchScript file; also writes MODEL.ckpt, MODEL.log, MODEL.report.yaml, MODEL.config.yaml and, with --test, parity plots.")
    fit.add_argument("train", help="training structures (extxyz)")
    fit.add_argument("-o", "--output", required=True, help="exported model file (.pt)")
    fit.add_argument("--test", help="test structures (extxyz), evaluated with the exported file")
    fit.add_argument("--config", help="YAML configuration; `acdc-potential config` writes every option with its meaning")
    fit.add_argument("--target", choices=["energy", "dipole"], help="what the model predicts: a potential (energy, default) or the dipole moment (options.target; the `dipole` section of the configuration)")
    fit.add_argument("--seed", type=int, help="seed of the validation split and samples (default: options.seed, 0)")
    fit.add_argument("--device", help="torch device of the fit, e.g. cuda (options.device; default cpu); the model is written from the CPU")
    fit.add_argument("--workers", type=int, help="build the kernel rows on a local Dask cluster of this many worker processes (cluster.workers; default 0: in this process)")
    fit.add_argument("--scheduler", help="build the kernel rows on the Dask cluster of this scheduler, e.g. tcp://HOST:8786 (cluster.scheduler); TRAIN must be readable by its workers at the same path")
    _add_labels(fit)
    _add_threads(fit)
    fit.set_defaults(run=fit_command)

    evaluate = commands.add_parser("eval", help="errors, parity plots and calibration of the uncertainties of an exported model on a data set")
    evaluate.add_argument("model", help="exported model file (.pt)")
    evaluate.add_argument("data", help="labelled structures (extxyz)")
    evaluate.add_argument("--plot", help="parity-plot PNG (default: DATA.parity.png in the current directory; the calibration plot beside it, DATA.parity-calibration.png)")
    evaluate.add_argument("--no-uncertainties", action="store_true", help="skip the calibration table and plot of the uncertainties (they cost several energy evaluations per structure)")
    _add_labels(evaluate)
    _add_threads(evaluate)
    evaluate.add_argument("--device", help="torch device to run the model on, e.g. cpu or cuda (default: the best the model supports)")
    evaluate.set_defaults(run=eval_command)

    learn = commands.add_parser(
        "learn", help="on-the-fly active learning: MD with the model, labelling uncertain structures with a reference calculator",
        description="Fit a first model on the starting structures (labelled by the reference unless they carry energy and forces), "
        "run Langevin MD with it, and whenever an atom's force uncertainty exceeds learn.threshold times the RMS force, label the "
        "structure with the reference, add it and update the model (no refit from scratch). Writes FOLDER/labelled.extxyz, "
        "resume.pt, model.ckpt, state.yaml, learn.log and, at the end, model.pt; run the same command again to resume an interrupted run.",
    )
    learn.add_argument("start", help="starting structures (extxyz or any ASE-readable file)")
    learn.add_argument("--reference", required=True, help="the reference ASE calculator class, MODULE:CLASS, e.g. ase.calculators.emt:EMT or tblite.ase:TBLite (arguments: --reference-args)")
    learn.add_argument("--reference-args", help="keyword arguments of the reference class, a YAML mapping, e.g. '{method: GFN2-xTB, verbosity: 0}'")
    learn.add_argument("-o", "--output", help="folder of the run (default: START-learn beside START)")
    learn.add_argument("--config", help="YAML configuration: the fit's sections and `learn` (`acdc-potential config` writes every option)")
    learn.add_argument("--steps", type=int, help="MD steps per starting structure and temperature (learn.steps)")
    learn.add_argument("--temperature", type=float, nargs="+", help="thermostat temperatures, K (learn.temperatures)")
    learn.add_argument("--threshold", type=float, help="label when an atom's force uncertainty exceeds this fraction of the RMS force (learn.threshold)")
    learn.add_argument("--max-labels", type=int, help="labelled structures in all (learn.max_labels)")
    _add_labels(learn)
    _add_threads(learn)
    learn.set_defaults(run=learn_command)

    export = commands.add_parser("export", help="export a checkpoint as a model file")
    export.add_argument("checkpoint", help="checkpoint written by `fit` (.ckpt)")
    export.add_argument("-o", "--output", required=True, help="exported model file (.pt)")
    export.add_argument("--dipole", help="a dipole model's checkpoint (fit --target dipole) to put in the same file as the energy model: one engine call returns both")
    export.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision of the exported model (default float64)")
    export.set_defaults(run=export_command)

    config = commands.add_parser("config", help="write the configuration template: every option, its meaning and its default (YAML)")
    config.add_argument("-o", "--output", help="file to write (default: print it)")
    config.set_defaults(run=config_command)
    return main


def version_line() -> str:
    from .fit.report import versions

    found = versions()
    return f"acdc-potential {__version__} (" + ", ".join(f"{name} {found.get(name, 'missing')}" for name in ("torch", "metatomic-torch", "metatensor-torch")) + ")"


def main(argv=None) -> int:
    from .errors import CheckpointError, ClusterError, DataFileError, ModelFileError, StructureError

    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except (StructureError, DataFileError, CheckpointError, ModelFileError, ClusterError, FileNotFoundError, ValueError) as error:
        print(f"acdc-potential {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
