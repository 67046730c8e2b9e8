"""Errors of predictions against reference labels: tables and parity plots.

Predictions come as a dict of numpy arrays, one entry per structure, from either a
fitted model in memory (:func:`predictions_of`, through
:meth:`~acdc_potential.fit.checkpoint.SparseKRRModel.predict`) or an exported file
(:func:`predict_with_file`), so that ``fit`` and ``eval`` report the same numbers.
Units of the table: energy per atom in meV/atom, forces in meV/A, stress in meV/A^3, dipole
components and norm in me*A (1e-3 e*A).
"""

from typing import Dict, List, Optional, Sequence

import numpy as np

from .data import Labelled

QUANTITIES = ("energy", "forces", "stress", "dipole", "|dipole|")
UNITS = {"energy": "meV/atom", "forces": "meV/A", "stress": "meV/A^3", "dipole": "me*A", "|dipole|": "me*A"}


def pairs_of(structures: Sequence[Labelled], predictions: Dict[str, List[np.ndarray]]) -> Dict[str, np.ndarray]:
    """Reference and predicted values, flattened, for every quantity both sides have.

    :return: ``{quantity: [2, n_values]}`` (row 0 reference, row 1 prediction); energies
        are per atom, in eV/atom; forces eV/A per component; stress eV/A^3 per component;
        dipoles e*A per component and their norms.
    """
    collected: Dict[str, List[np.ndarray]] = {q: [] for q in QUANTITIES}
    for k, structure in enumerate(structures):
        if structure.energy is not None and "energy" in predictions:
            n = structure.n_atoms
            collected["energy"].append(np.array([[structure.energy / n], [float(predictions["energy"][k]) / n]]))
        if structure.forces is not None and "forces" in predictions:
            collected["forces"].append(np.stack([structure.forces.ravel(), np.asarray(predictions["forces"][k]).ravel()]))
        if structure.stress is not None and "stress" in predictions:
            collected["stress"].append(np.stack([structure.stress.ravel(), np.asarray(predictions["stress"][k]).ravel()]))
        if structure.dipole is not None and "dipole" in predictions:
            predicted = np.asarray(predictions["dipole"][k]).ravel()
            collected["dipole"].append(np.stack([structure.dipole, predicted]))
            collected["|dipole|"].append(np.array([[np.linalg.norm(structure.dipole)], [np.linalg.norm(predicted)]]))
    return {q: np.concatenate(v, axis=1) for q, v in collected.items() if v}


def errors(pairs: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """MAE and RMSE of each quantity, in the units of :data:`UNITS`."""
    result = {}
    for quantity, values in pairs.items():
        difference = 1000.0 * (values[1] - values[0])
        result[quantity] = {
            "mae": float(np.mean(np.abs(difference))),
            "rmse": float(np.sqrt(np.mean(difference**2))),
            "count": int(difference.size),
        }
    return result


def format_table(rows: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Plain-text table of :func:`errors` for several sets (``{set name: errors}``)."""
    header = f"{'set':<12} {'quantity':<8} {'unit':<9} {'MAE':>10} {'RMSE':>10} {'values':>8}"
    # tuning reports give MAE and RMSE only
    lines = [header, "-" * len(header)]
    for name, table in rows.items():
        for quantity in QUANTITIES:
            if quantity in table:
                e = table[quantity]
                lines.append(
                    f"{name:<12} {quantity:<8} {UNITS[quantity]:<9} {e['mae']:>10.3f} {e['rmse']:>10.3f} {e.get('count', ''):>8}"
                )
    return "\n".join(lines)


def parity_plots(pairs: Dict[str, np.ndarray], path: str, title: Optional[str] = None) -> None:
    """One PNG with a predicted-against-reference panel per quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = [q for q in QUANTITIES if q in pairs]
    figure, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 4.0), squeeze=False)
    labels = {"energy": "energy (eV/atom)", "forces": "force components (eV/A)", "stress": "stress components (eV/A^3)", "dipole": "dipole components (e*A)", "|dipole|": "dipole norm (e*A)"}
    for axis, quantity in zip(axes[0], quantities):
        reference, predicted = pairs[quantity]
        low, high = float(min(reference.min(), predicted.min())), float(max(reference.max(), predicted.max()))
        axis.plot([low, high], [low, high], color="0.6", linewidth=1)
        axis.scatter(reference, predicted, s=4, alpha=0.5)
        e = errors({quantity: pairs[quantity]})[quantity]
        axis.set_title(f"{quantity}: MAE {e['mae']:.2f}, RMSE {e['rmse']:.2f} {UNITS[quantity]}", fontsize=9)
        axis.set_xlabel(f"reference {labels[quantity]}")
        axis.set_ylabel(f"predicted {labels[quantity]}")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def predict_with_file(calculator, structures: Sequence[Labelled], progress: bool = True) -> Dict[str, List[np.ndarray]]:
    """Energy, forces and (periodic structures) stress, and the dipole, of every structure from an
    exported file, as far as it has an energy and a dipole model: ``calculator`` is its
    :class:`~acdc_potential.calculator.ACDCCalculator`, or the file's path."""
    from tqdm import tqdm

    from .calculator import ACDCCalculator

    if not isinstance(calculator, ACDCCalculator):
        calculator = ACDCCalculator(calculator, uncertainty_threshold=None)
    kinds = (["energy", "forces", "stress"] if calculator.has_energy else []) + (["dipole"] if calculator.has_dipole else [])
    predictions: Dict[str, List[np.ndarray]] = {kind: [] for kind in kinds}
    for structure in tqdm(structures, desc="evaluating", unit="structure", disable=not progress):
        atoms = structure.atoms.copy()
        atoms.calc = calculator
        if calculator.has_energy:
            predictions["energy"].append(np.array(atoms.get_potential_energy()))
            predictions["forces"].append(atoms.get_forces())
            predictions["stress"].append(atoms.get_stress(voigt=False) if structure.periodic else np.full((3, 3), np.nan))
        if calculator.has_dipole:
            predictions["dipole"].append(atoms.get_dipole_moment())
    return predictions


def predictions_of(model, structures: Sequence[Labelled]) -> Dict[str, List[np.ndarray]]:
    """Energy, forces and stress of every structure from a fitted model in memory."""
    result = model.predict(structures, forces=True, stress=True)
    sizes = [s.n_atoms for s in structures]
    return {
        "energy": list(result["energy"].cpu().numpy()),
        "forces": list(np.split(result["forces"].cpu().numpy(), np.cumsum(sizes)[:-1])),
        "stress": list(result["stress"].cpu().numpy()),
    }


# the largest change of an exported energy under exact symmetries, as a fraction of the energy, that
# users who difference energies can live with (equations of state, elastic constants, line searches);
# every default model stays within 1e-16..1e-13
PRECISION_TARGET = 1e-10


def numerical_precision(model, atoms, step: float = 1e-4, seed: int = 0) -> Dict[str, float]:
    """How precisely ``model`` resolves the energy of ``atoms`` (an ``ase.Atoms``).

    :param model: a scripted :class:`~acdc_potential.model.potential.AtomisticPotential` (what an
        exported file runs) or an ASE calculator (e.g. metatomic's, on an exported file).

    Returns, in eV and eV/A: the energy, its changes under a translation of every atom by
    ``1e-12`` A (``translation``), a random rotation (``rotation``, the cell rotated along) and a
    random permutation of the atoms (``permutation``), each also relative to the energy
    (``..._relative``), and ``finite_difference``: the largest difference between the central
    finite difference at ``step`` of the energy and the force, over the three components of
    atom 0. The symmetries are exact, so every change is rounding.
    """
    import torch

    from .inference import run_module

    def evaluate(frame, forces: bool = False):
        if isinstance(model, torch.nn.Module):
            out = run_module(model, [frame], forces=forces, stress=False, uncertainty=False)
            return float(out["energy"][0]), (out["forces"].cpu().numpy() if forces else None)
        frame = frame.copy()
        frame.calc = model
        return frame.get_potential_energy(), (frame.get_forces() if forces else None)

    rng = np.random.default_rng(seed)
    reference, force = evaluate(atoms, forces=True)
    moved = atoms.copy()
    moved.positions += 1e-12
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.diag(r))
    if np.linalg.det(rotation) < 0:
        rotation[:, 0] *= -1
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.cell = atoms.cell.array @ rotation.T
    permuted = atoms[rng.permutation(len(atoms))]
    out = {"energy": reference}
    for name, frame in (("translation", moved), ("rotation", rotated), ("permutation", permuted)):
        out[name] = abs(evaluate(frame)[0] - reference)
        out[name + "_relative"] = out[name] / max(abs(reference), 1e-300)
    worst = 0.0
    for component in range(3):
        shifted = [atoms.copy(), atoms.copy()]
        shifted[0].positions[0, component] += step
        shifted[1].positions[0, component] -= step
        difference = -(evaluate(shifted[0])[0] - evaluate(shifted[1])[0]) / (2 * step)
        worst = max(worst, abs(difference - float(force[0, component])))
    out["finite_difference"] = worst
    out["finite_difference_step"] = step
    return out


def precision_warning(probe: Dict[str, float], n_atoms: int, plain_pairs: bool) -> Optional[str]:
    """A one-line warning when :func:`numerical_precision`'s ``probe`` of a structure of ``n_atoms``
    shows the energy changed under an exact symmetry by more than :data:`PRECISION_TARGET` of the
    energy, taken between 1 meV and 1 eV per atom; else ``None``. (Finite differences are
    reported, not judged: at a fixed step their truncation error depends on the curvature.)

    :param plain_pairs: whether the model sums over sparse environments pair by pair in plain float64
        at every call (a head's ``plain_pairs``: Wigner orders ``nu >= 5``), the
        known cause.
    """
    # the energy clamped to [1 meV, 1 eV] per atom: the size of a total energy far from zero says nothing of
    # the differences users take, and an energy near zero would flag the rounding of its terms
    scale = min(max(abs(probe["energy"]), 1e-3 * n_atoms), float(n_atoms))
    worst = max(probe["translation"], probe["rotation"], probe["permutation"])
    if worst <= PRECISION_TARGET * scale:
        return None
    cause = (
        "this model sums some kernel terms over its sparse environments pair by pair in plain float64 (Wigner "
        "orders nu >= 5), which rounds the cancellation among its large fitted weights anew at every configuration"
        if plain_pairs
        else "no known cause for this model: please report it"
    )
    return (
        f"the exported energy is not as precise as float64 allows (a 1e-12 A translation changes it by "
        f"{probe['translation']:.1e} eV, a rotation by {probe['rotation']:.1e} eV, a permutation by {probe['permutation']:.1e} eV, "
        f"up to {worst / max(abs(probe['energy']), 1e-300):.1e} of the energy; finite "
        f"differences at {probe['finite_difference_step']:g} A miss the forces by {probe['finite_difference']:.1e} eV/A): {cause}; "
        "energy differences and finite-difference steps at that scale see rounding (docs/equations.md, \"Numerical precision\")"
    )


def uncertainties_with_file(calculator, structures: Sequence[Labelled], progress: bool = True) -> Dict[str, List[np.ndarray]]:
    """Calibrated standard deviations of every structure from an exported file (an
    :class:`~acdc_potential.calculator.ACDCCalculator`): ``energy`` (eV, per structure),
    ``atoms`` (eV, per atom) and, for a calibrated model, ``forces`` (eV/A, per atom)."""
    from tqdm import tqdm

    forces = calculator.has_forces_uncertainty
    result: Dict[str, List[np.ndarray]] = {"energy": [], "atoms": [], **({"forces": []} if forces else {})}
    for structure in tqdm(structures, desc="uncertainties", unit="structure", disable=not progress):
        atoms = structure.atoms.copy()
        result["energy"].append(np.array(calculator.get_uncertainty(atoms)))
        result["atoms"].append(np.asarray(calculator.get_uncertainty(atoms, per_atom=True)))
        if forces:
            result["forces"].append(np.asarray(calculator.get_forces_uncertainty(atoms)))
    return result


def standardised_errors(structures: Sequence[Labelled], predictions: Dict[str, List[np.ndarray]], sigmas: Dict[str, List[np.ndarray]]) -> Dict[str, np.ndarray]:
    """Errors of ``predictions`` (:func:`predict_with_file`) over their predicted standard deviations
    ``sigmas`` (:func:`uncertainties_with_file`): ``energy_z`` and ``energy_sigma`` ``[S]`` (structures
    with an energy), and for atoms of structures with forces ``atom_sigma`` and ``force_error`` (the
    norm of the error) ``[N]``, with a force uncertainty ``force_sigma`` ``[N]`` and ``force_z`` ``[N, 3]``."""
    energies = [k for k, s in enumerate(structures) if s.energy is not None]
    result = {
        "energy_sigma": np.array([float(sigmas["energy"][k]) for k in energies]),
        "energy_z": np.array([abs(float(predictions["energy"][k]) - structures[k].energy) / float(sigmas["energy"][k]) for k in energies]),
    }
    labelled = [k for k, s in enumerate(structures) if s.forces is not None]
    if labelled:
        errors = np.concatenate([np.asarray(predictions["forces"][k]) - structures[k].forces for k in labelled])
        result["atom_sigma"] = np.concatenate([sigmas["atoms"][k] for k in labelled])
        result["force_error"] = np.linalg.norm(errors, axis=1)
        if "forces" in sigmas:
            result["force_sigma"] = np.concatenate([sigmas["forces"][k] for k in labelled])
            with np.errstate(divide="ignore", invalid="ignore"):  # a zero sigma: the error is outside every interval
                result["force_z"] = np.abs(errors) / result["force_sigma"][:, None]
    return result


def calibration_table(structures: Sequence[Labelled], predictions: Dict[str, List[np.ndarray]], sigmas: Dict[str, List[np.ndarray]]) -> Dict[str, Dict[str, float]]:
    """How well predicted standard deviations describe the errors (:func:`standardised_errors`):
    for energies (per structure) and force components, the fractions of errors within 1 and 2
    standard deviations (68 % and 95 % for Gaussian errors of the predicted size) and the median
    standard deviation (eV, eV/A); the Spearman rank correlation between the norm of an atom's
    force error and its force uncertainty (``forces``) or its energy uncertainty (``atoms``, with
    the median atomic energy uncertainty, eV)."""
    from scipy.stats import spearmanr

    z = standardised_errors(structures, predictions, sigmas)
    table: Dict[str, Dict[str, float]] = {}
    if z["energy_z"].size:
        table["energy"] = coverage(z["energy_z"], z["energy_sigma"])
    if "force_z" in z:
        table["forces"] = {**coverage(z["force_z"], z["force_sigma"]), "spearman": float(spearmanr(z["force_sigma"], z["force_error"])[0])}
    if "atom_sigma" in z:
        rank = float(spearmanr(z["atom_sigma"], z["force_error"])[0])
        table["atoms"] = {"spearman": rank, "median_sigma": float(np.median(z["atom_sigma"])), "count": int(z["atom_sigma"].size)}
    return table


def coverage(z: np.ndarray, sigma: np.ndarray) -> Dict[str, float]:
    """Fractions of ``|error| / sigma`` values ``z`` within 1 and 2, and the median of ``sigma``."""
    return {"within_1": float(np.mean(z <= 1.0)), "within_2": float(np.mean(z <= 2.0)), "median_sigma": float(np.median(sigma)), "count": int(z.size)}


def format_calibration(rows: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Plain-text table of :func:`calibration_table` for several sets (``{set name: table}``)."""
    header = f"{'set':<12} {'quantity':<8} {'within 1 sigma':>15} {'within 2 sigma':>15} {'median sigma':>17} {'rank corr.':>11} {'values':>8}"
    lines = [header, "-" * len(header)]
    units = {"energy": "eV", "forces": "eV/A", "atoms": "eV"}
    for name, table in rows.items():
        for quantity, e in table.items():
            within = f"{100 * e['within_1']:>14.1f}% {100 * e['within_2']:>14.1f}%" if "within_1" in e else f"{'':>15} {'':>15}"
            rank = f"{e['spearman']:>11.3f}" if "spearman" in e else f"{'':>11}"
            lines.append(f"{name:<12} {quantity:<8} {within} {e['median_sigma']:>12.3g} {units[quantity]:<4} {rank} {e['count']:>8}")
    return "\n".join(lines)


def calibration_plot(structures: Sequence[Labelled], predictions: Dict[str, List[np.ndarray]], sigmas: Dict[str, List[np.ndarray]], path: str, title: Optional[str] = None) -> None:
    """One PNG: observed against expected fraction of errors within the Gaussian interval of each
    probability (energies, force components; the diagonal is a perfect calibration), and, with a
    force uncertainty, force errors against their predicted standard deviation, atom by atom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    z = standardised_errors(structures, predictions, sigmas)
    panels = 2 if "force_z" in z else 1
    figure, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 4.0), squeeze=False)
    expected = np.linspace(0.0, 0.999, 200)
    axis = axes[0][0]
    axis.plot([0, 1], [0, 1], color="0.6", linewidth=1)
    for quantity, values in (("energy", z["energy_z"]), ("forces", z.get("force_z", np.zeros(0)).ravel())):
        if values.size:
            axis.plot(expected, [np.mean(values <= norm.ppf(0.5 + p / 2)) for p in expected], label=f"{quantity} ({values.size} values)")
    axis.set_xlabel("expected fraction within the interval (Gaussian)")
    axis.set_ylabel("observed fraction")
    axis.legend(fontsize=8)
    if panels == 2:
        axis = axes[0][1]
        sigma, error = z["force_sigma"], z["force_error"] / np.sqrt(3.0)
        axis.loglog(sigma, error, ".", markersize=2, alpha=0.4)
        positive = np.concatenate([sigma[sigma > 0], error[error > 0]])
        low, high = (float(positive.min()), float(positive.max())) if positive.size else (1e-6, 1.0)
        axis.plot([low, high], [low, high], color="0.6", linewidth=1)
        axis.set_xlabel("predicted force component sigma (eV/A)")
        axis.set_ylabel("|force error| / sqrt(3) (eV/A)")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
