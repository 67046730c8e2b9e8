"""What a fit tells its user: a log on one clock, and a report file.

:class:`FitLog` prints timestamped lines (one clock from the start of the run) and keeps them
for the log file; :meth:`FitLog.stage` times the named steps. :func:`fit_report` gathers what a
fit should leave behind (errors per set, chosen hyperparameters, grid points, timings, peak
memory, versions, data fingerprints, the configuration), :func:`write_report` writes it as YAML,
and :func:`extend_report` adds the errors of a later ``acdc-potential eval``.
"""

import contextlib
import hashlib
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, TextIO

import yaml

from ..errors import DataFileError

# the distributions whose versions a report records
DEPENDENCIES = (
    "acdc-potential", "torch", "numpy", "scipy", "ase", "metatensor-core", "metatensor-operations", "metatensor-learn",
    "metatensor-torch", "metatomic-torch", "metatomic-ase", "vesin", "vesin-torch", "wigners", "sphericart-torch",
)


class FitLog:
    """Timestamped messages on one clock, printed (when ``verbose``) and written to ``path``;
    ``progress`` (default: ``verbose``) shows the progress bars of long steps."""

    def __init__(self, verbose: bool = True, path: Optional[str] = None, progress: Optional[bool] = None, append: bool = False):
        self.start = time.perf_counter()
        self.verbose = verbose
        self.progress = verbose if progress is None else progress
        self.file: Optional[TextIO] = open(path, "a" if append else "w") if path is not None else None
        self.timings: Dict[str, float] = {}
        # the process's peak memory (GB) at the end of each step: the step that raised it names the culprit
        self.peaks: Dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(f"[{self.elapsed():7.1f} s] {message}", flush=True)
        self.write(message)

    def write(self, message: str) -> None:
        """``message`` to the file only (details the screen need not show)."""
        if self.file is not None:
            self.file.write(f"[{self.elapsed():7.1f} s] {message}\n")
            self.file.flush()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time the step ``name`` (seconds added to :attr:`timings`; the peak memory so far in :attr:`peaks`)."""
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.peaks[name] = round(peak_memory_gb(), 3)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def fingerprint(path: str) -> Dict[str, object]:
    """Absolute path, SHA-256 and size of a data file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "sha256": digest.hexdigest(), "bytes": stat.st_size}


def versions() -> Dict[str, str]:
    """Python and the versions of :data:`DEPENDENCIES` that are installed."""
    found = {"python": platform.python_version()}
    for name in DEPENDENCIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far (GB)."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1e6 if sys.platform != "darwin" else kilobytes / 1e9


def fit_report(
    model,
    config: Dict,
    data: Dict[str, Dict[str, object]],
    errors: Dict[str, Dict[str, Dict[str, float]]],
    log: FitLog,
    command: List[str],
    threads: int,
) -> Dict:
    """The report of a fit (plain data, YAML-ready).

    :param model: the fitted :class:`~acdc_potential.fit.checkpoint.SparseKRRModel`.
    :param config: the configuration used (``FitConfig.to_dict()``, ``auto`` resolved).
    :param data: ``{role: fingerprint and number of structures}`` of the data files.
    :param errors: ``{set: {quantity: {mae, rmse, count}}}`` in meV units.
    """
    report = model.report
    return {
        "acdc-potential": "fit report",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "data": data,
        "configuration": config,
        "species": list(model.species),
        "sparse_environments": {int(z): int((model.kernel.sparse_species == z).sum()) for z in model.species},
        "chosen": {
            "kernel": model.kernel.kind,
            "mixing": dict(model.kernel.mixing),
            "regularisers": dict(vars(model.regularisers)),
            "baseline_eV": {int(z): float(e) for z, e in model.baseline.energies.items()},
            "regulariser_scale": None if report is None else report.regulariser_scale,
            "tuning": None if report is None else report.method,
            "validation_loss": report.loss if report is not None and report.method == "validation" else None,
            "minus_log_evidence_per_row": report.loss if report is not None and report.method == "evidence" else None,
        },
        "grid": [] if report is None else list(report.density_grid),
        "errors_meV": errors,
        "warnings": list(model.warnings),
        "timings_s": {**{k: round(v, 2) for k, v in log.timings.items()}, "total": round(log.elapsed(), 2)},
        "threads": threads,
        "peak_memory_GB": round(peak_memory_gb(), 3),
        "peak_memory_after_GB": dict(log.peaks),
        "versions": versions(),
    }


def write_report(path: str, report: Dict) -> None:
    with open(path, "w") as file:
        yaml.safe_dump(report, file, sort_keys=False)


def read_report(path: str) -> Dict:
    """The report ``path`` (a :class:`~acdc_potential.errors.DataFileError` if it is not one)."""
    try:
        with open(path) as file:
            report = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as error:
        raise DataFileError(f"{path}: not a readable report ({type(error).__name__})") from None
    if not isinstance(report, dict) or report.get("acdc-potential") != "fit report":
        raise DataFileError(f"{path}: not an acdc-potential fit report")
    return report


def extend_report(path: str, name: str, data_file: str, errors: Dict[str, Dict[str, float]], calibration: Optional[Dict] = None) -> None:
    """Add the errors of the model on ``data_file`` (and the
    :func:`~acdc_potential.evaluation.calibration_table` of its uncertainties, if given) under
    ``evaluations`` of the report ``path``."""
    report = read_report(path)
    entry = {"data": fingerprint(data_file), "errors_meV": errors, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if calibration is not None:
        entry["uncertainties"] = calibration
    report.setdefault("evaluations", {})[name] = entry
    write_report(path, report)
