"""The fitted models (energy: :class:`SparseKRRModel`; dipole: :class:`DipoleModel`) and their
checkpoints: plain dicts of tensors, numbers and strings.

Nothing read from a checkpoint chooses code to run: the kernel is named by a key of
:data:`~acdc_potential.kernels.KERNELS` (and a polynomial kernel's features by their body orders,
numbers checked by the kernel); anything else is refused, with a
:class:`~acdc_potential.errors.CheckpointError` (a ``ValueError`` from the kernel for orders it does
not have), before any object of the model is built. Files are read
with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.

Format history (``version``; :func:`upgrade` brings older files to the current one):

1. ``format: acdc-potential/sparse-krr/1`` (the first layout of the package): the kernel
   named Python objects by ``module:name`` (the Wigner hyperparameter class, the
   polynomial kernel's feature function). Those of the package are mapped to registry
   names; any other name is refused.
2. ``format: acdc-potential/sparse-krr``, ``version: 2``: registry names only.
3. Wigner kernels gained ``channel_weights`` (earlier files: ``inverse_dimension``).
4. ``calibration`` of the uncertainties (earlier files: none, factors 1 and no force
   uncertainty; their atomic energy uncertainties are now the unexplained prior variance).
5. Polynomial kernels name their features by body orders (``orders``, ``contraction``,
   ``projections``) instead of a feature name (earlier files: ``power_spectrum``, i.e. orders ``[2]``).
6. Message-passing kernels name their ``message_orders`` and their ``contraction`` (earlier files:
   ``[1 <- 1]`` only, uncontracted).
7. Polynomial kernels store their sparse environments as unit features, not density coefficients (the
   upgrade computes them with the kernel's own invariants); polynomial and message-passing kernels name
   ``feature_space`` (earlier files: ``false``, selected environments).
8. Polynomial and message-passing kernels give each part of their features a floor (``norm_floor``,
   ``floors``, one more feature per part) and message-passing kernels their message's ``cutoff``
   (earlier files: floors 0, i.e. zero components of the floors appended to the sparse features, and the
   density's cutoff).

Dipole checkpoints (``format: acdc-potential/dipole-krr``): version 1 held Wigner models; version 2
names the ``kind`` of model (``wigner``, ``features``).
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

from ..config import Regularisers
from ..descriptors.density import DensityExpansion, Layout
from ..descriptors.invariants import Invariants
from ..descriptors.vectors import VECTOR_KINDS, VectorFeatures
from ..descriptors.radial import DensityHypers
from ..errors import CheckpointError
from ..inference import predict, predict_dipoles
from ..kernels import KERNELS
from ..kernels.base import SparseKernel
from ..model.export import export_model
from ..kernels.wigner.iteration import exponential_weights
from ..model.heads import DipoleHead, FeatureDipoleHead, MessagePassingHead, PolynomialHead, WignerHead
from ..model.potential import AtomisticPotential
from ..model.references import metatomic_references
from ..model.uncertainty import Calibration, SparseState
from .baseline import Baseline
from .solver import ProjectedProcess
from .tuning import HyperparameterReport

FORMAT = "acdc-potential/sparse-krr"
VERSION = 8
# version 1 named these objects by their qualified Python name; nothing else is accepted
_VERSION_1_NAMES = {
    "acdc_potential.wigner:WignerHypers": "wigner",
    "acdc_potential.correlations:power_spectrum": "power_spectrum",
}


def upgrade(state: Dict) -> Dict:
    """The checkpoint dict ``state`` in the current format (``state`` itself when it is; else a new
    dict, ``state`` is not changed)."""
    if state.get("format") == FORMAT and state.get("version") == VERSION:
        return state
    if state.get("format") == FORMAT and state.get("version") == 7:
        return _upgrade_from_7(state)
    if state.get("format") == FORMAT and state.get("version") == 6:
        return _upgrade_from_6(state)
    if state.get("format") == FORMAT and state.get("version") == 5:
        return _upgrade_from_5(state)
    if state.get("format") == FORMAT and state.get("version") == 4:
        return _upgrade_from_4(state)
    if state.get("format") == FORMAT and state.get("version") == 3:
        return _upgrade_from_3(state)
    if state.get("format") == FORMAT and state.get("version") == 2:
        return _upgrade_from_2(state)
    if state.get("format") != "acdc-potential/sparse-krr/1":
        found = state.get("format"), state.get("version")
        raise CheckpointError(f"not an acdc-potential checkpoint of a known version (format {found[0]!r}, version {found[1]!r})")
    kernel = dict(state["kernel"])
    hypers = dict(kernel["hypers"])
    if kernel["kind"] == "wigner":
        if _VERSION_1_NAMES.get(hypers.get("class")) != "wigner":
            raise CheckpointError(f"the checkpoint names an unknown class {hypers.get('class')!r} for its Wigner hyperparameters")
        hypers = {"wigner": dict(hypers["fields"]), "species_scale": hypers["species_scale"]}
    elif kernel["kind"] == "polynomial":
        features = _VERSION_1_NAMES.get(hypers.get("features"))
        if features != "power_spectrum":
            raise CheckpointError(f"the checkpoint names an unknown feature function {hypers.get('features')!r}")
        hypers = {"zeta": hypers["zeta"], "features": features}
    kernel["hypers"] = hypers
    return _upgrade_from_2({**state, "format": FORMAT, "version": 2, "kernel": kernel})


def _upgrade_from_2(state: Dict) -> Dict:
    """Version 2 -> 3: Wigner kernels gained ``channel_weights``; earlier ones were fitted with
    ``inverse_dimension`` (``8 pi^2 / (2l + 1)``), the new default is ``uniform``."""
    kernel = dict(state["kernel"])
    if kernel["kind"] == "wigner":
        hypers = dict(kernel["hypers"])
        hypers["wigner"] = {**hypers["wigner"], "channel_weights": "inverse_dimension"}
        kernel["hypers"] = hypers
    return _upgrade_from_3({**state, "version": 3, "kernel": kernel})


def _upgrade_from_3(state: Dict) -> Dict:
    """Version 3 -> 4: a ``calibration`` of the uncertainties; earlier models have none."""
    return _upgrade_from_4({**state, "version": 4, "calibration": None})


def _upgrade_from_4(state: Dict) -> Dict:
    """Version 4 -> 5: polynomial kernels name the body orders of their features; the only
    feature name of earlier files, ``power_spectrum``, is the order 2."""
    kernel = dict(state["kernel"])
    if kernel["kind"] == "polynomial":
        hypers = dict(kernel["hypers"])
        if hypers.get("features") != "power_spectrum":
            raise CheckpointError(f"the checkpoint names unknown features {hypers.get('features')!r} for its polynomial kernel")
        kernel["hypers"] = {"zeta": hypers["zeta"], "orders": [2], "contraction": 0, "projections": None}
    return _upgrade_from_5({**state, "version": 5, "kernel": kernel})


def _upgrade_from_5(state: Dict) -> Dict:
    """Version 5 -> 6: message-passing kernels name the orders of their ``[nu <- 1]`` invariants and
    their contraction; earlier ones had ``[1 <- 1]`` only, uncontracted."""
    kernel = dict(state["kernel"])
    if kernel["kind"] == "mpacdc":
        kernel["hypers"] = {**kernel["hypers"], "message_orders": [1], "contraction": 0, "projections": None}
    return _upgrade_from_6({**state, "version": 6, "kernel": kernel})


def _upgrade_from_6(state: Dict) -> Dict:
    """Version 6 -> 7: polynomial kernels store their sparse environments as unit features (they stored
    density coefficients), and polynomial and message-passing kernels name ``feature_space`` (earlier
    fits chose their sparse environments, as ``feature_space: false`` does)."""
    kernel = dict(state["kernel"])
    if kernel["kind"] in ("polynomial", "mpacdc"):
        kernel["hypers"] = {**kernel["hypers"], "feature_space": False}
    if kernel["kind"] == "polynomial" and kernel["sparse_coefficients"] is not None:
        layout = Layout(kernel["layout"])
        hypers = kernel["hypers"]
        coefficients = kernel["sparse_coefficients"]
        invariants = Invariants(len(layout.shapes) - 1, [int(nu) for nu in hypers["orders"]], hypers["projections"]).to(coefficients.device)
        with torch.no_grad():
            features = invariants(layout.unflatten(coefficients))
        # version 7 had no floors: the (zero) components that today's invariants append dropped
        features = features[:, : features.shape[1] - len(invariants.orders)]
        kernel["sparse_coefficients"], kernel["layout"] = features, [[1, features.shape[1]]]
    return _upgrade_from_7({**state, "version": 7, "kernel": kernel})


def _upgrade_from_7(state: Dict) -> Dict:
    """Version 7 -> 8: polynomial and message-passing kernels had no floors (``norm_floor`` 0) and
    message-passing kernels the density's cutoff: zero components of the floors appended to the sparse
    features, which leave every kernel value as it was."""
    kernel = dict(state["kernel"])
    if kernel["kind"] in ("polynomial", "mpacdc"):
        hypers = dict(kernel["hypers"])
        n_parts = len(hypers["orders"]) + len(hypers.get("message_orders", []))
        hypers.update(norm_floor=0.0, floors=[0.0] * n_parts)
        if kernel["kind"] == "mpacdc":
            hypers["cutoff"] = None
        kernel["hypers"] = hypers
        features = kernel["sparse_coefficients"]
        if features is not None:
            kernel["sparse_coefficients"] = torch.cat([features, features.new_zeros((features.shape[0], n_parts))], dim=1)
            kernel["layout"] = [[1, features.shape[1] + n_parts]]
    return {**state, "version": VERSION, "kernel": kernel}


def kernel_from_dict(state: Dict) -> SparseKernel:
    """Rebuild a kernel (with its sparse environments) from :meth:`SparseKernel.to_dict`; refuses
    kinds outside :data:`~acdc_potential.kernels.KERNELS`."""
    if state["kind"] not in KERNELS:
        raise CheckpointError(f"the checkpoint names an unknown kernel {state['kind']!r} (known: {sorted(KERNELS)})")
    kernel = KERNELS[state["kind"]].from_hypers(state["hypers"], state["mixing"])
    if state["sparse_coefficients"] is not None:
        kernel.set_sparse(state["sparse_coefficients"], state["sparse_species"], Layout(state["layout"]))
    return kernel


class SparseKRRModel:
    """A fitted sparse KRR potential: density, kernel with sparse set, weights, baseline.

    :param density_hypers: the density expansion's hyperparameters.
    :param species: atomic numbers the model knows (density channels and central species).
    :param kernel: the kernel, with its sparse environments and mixing coefficients.
    :param solution: the projected-process solution (weights and variance factors).
    :param baseline: per-species energies.
    :param regularisers: the regularisers used.
    :param report: the hyperparameter selection report, if any.
    :param expansion: an already built ``DensityExpansion(density_hypers, species)``
        (tabulating the radial integrals takes seconds).
    :param warnings: what the fit warned about (:class:`~acdc_potential.errors.AccuracyWarning`:
        fewer sparse environments than asked, radial integrals less accurate than asked).
    :param calibration: of the uncertainties (:class:`~acdc_potential.model.uncertainty.Calibration`),
        if the fit held out structures for it.
    :param sparse_owners: ``[M]`` position in the training set of the structure of each sparse
        environment, when the model comes from a fit (what a later calibration must hold out
        with a structure; -1 for the feature directions of a solve in feature space, owned by none;
        not kept in checkpoints).

    :meth:`potential` is the deployable module; :meth:`predict` runs it (scripted, as the
    exported file) on structures in memory.
    """

    def __init__(
        self,
        density_hypers: DensityHypers,
        species: Sequence[int],
        kernel: SparseKernel,
        solution: ProjectedProcess,
        baseline: Baseline,
        regularisers: Regularisers,
        report: Optional[HyperparameterReport] = None,
        expansion: Optional[DensityExpansion] = None,
        warnings: Optional[List[str]] = None,
        calibration: Optional[Calibration] = None,
        sparse_owners: Optional[torch.Tensor] = None,
    ):
        self.density_hypers = density_hypers
        self.species = [int(z) for z in species]
        self.expansion = expansion if expansion is not None else DensityExpansion(density_hypers, self.species)
        self.kernel = kernel
        self.solution = solution
        self.baseline = baseline
        self.regularisers = regularisers
        self.report = report
        self.warnings = list(warnings or [])
        self.calibration = calibration
        self.sparse_owners = sparse_owners
        self._scripted: Optional[torch.jit.ScriptModule] = None

    @property
    def weights(self) -> torch.Tensor:
        return self.solution.weights

    def potential(self, route: str = "collapsed") -> AtomisticPotential:
        """The deployable :class:`~acdc_potential.model.potential.AtomisticPotential`; ``route``
        chooses how a head sums over its sparse environments
        (:class:`~acdc_potential.model.heads.WignerHead`, :class:`~acdc_potential.model.heads.PolynomialHead`)."""
        state = SparseState(self.kernel, self.solution.weights, self.solution.projection, self.solution.triangular, self.species, self.calibration, self.regularisers.energy**2)
        if self.kernel.kind == "wigner":
            head = WignerHead(self.expansion, self.kernel, state, self.species, route)
        elif self.kernel.kind == "polynomial":
            head = PolynomialHead(self.expansion, self.kernel, state, self.species, route)
        elif self.kernel.kind == "mpacdc":
            head = MessagePassingHead(self.expansion, self.kernel, state, self.species, route)
        else:
            raise ValueError(f"cannot export a '{self.kernel.kind}' kernel")
        baseline = torch.tensor([self.baseline.energies.get(z, 0.0) for z in self.species], dtype=torch.float64)
        return AtomisticPotential(head, baseline, None if self.calibration is None else self.calibration.force_scale(self.species))

    def references(self) -> Dict[str, List[str]]:
        """The references of the methods this model uses (for the exported metadata)."""
        return metatomic_references(self.kernel.kind, self.density_hypers.density, self.density_hypers.basis)

    def export(self, path: str, dtype: torch.dtype = torch.float64, description: str = "") -> None:
        """Write the deployable model as one metatomic TorchScript file (:func:`~acdc_potential.model.export.export_model`)."""
        export_model(self.potential(), path, dtype=dtype, description=description, references=self.references())

    def predict(self, structures: Sequence, forces: bool = True, stress: bool = True, uncertainty: bool = False, batch_size: int = 16):
        """:func:`acdc_potential.inference.predict` with the scripted :meth:`potential` (the
        exported module, in float64)."""
        return predict(self.scripted(), self.species, structures, forces, stress, uncertainty, batch_size)

    def scripted(self) -> torch.jit.ScriptModule:
        """:meth:`potential`, scripted as in the exported file (built once)."""
        if self._scripted is None:
            self._scripted = torch.jit.script(self.potential().eval())
        return self._scripted

    def to_dict(self) -> Dict:
        """Plain-dict checkpoint (tensors, numbers, strings), loadable with ``weights_only=True``."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "density_hypers": dataclasses.asdict(self.density_hypers),
            "species": list(self.species),
            "kernel": self.kernel.to_dict(),
            "weights": self.solution.weights,
            "projection": self.solution.projection,
            "triangular": self.solution.triangular,
            "baseline": {int(z): float(e) for z, e in self.baseline.energies.items()},
            "regularisers": dataclasses.asdict(self.regularisers),
            "report": None if self.report is None else self.report.to_dict(),
            "warnings": list(self.warnings),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
        }

    def save(self, path: str) -> None:
        torch.save(self.to_dict(), path)

    @classmethod
    def from_dict(cls, state: Dict) -> "SparseKRRModel":
        try:
            return cls._from_state(upgrade(state))
        except (KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"the checkpoint is incomplete or malformed ({type(error).__name__}: {error})") from None

    @classmethod
    def _from_state(cls, state: Dict) -> "SparseKRRModel":
        report = state["report"]
        if report is not None:
            report = HyperparameterReport(**{**report, "regularisers": Regularisers(**report["regularisers"])})
        return cls(
            DensityHypers(**state["density_hypers"]),
            state["species"],
            kernel_from_dict(state["kernel"]),
            ProjectedProcess(state["weights"], state["projection"], state["triangular"]),
            Baseline({int(z): e for z, e in state["baseline"].items()}),
            Regularisers(**state["regularisers"]),
            report,
            warnings=state.get("warnings", []),
            calibration=None if state["calibration"] is None else Calibration.from_dict(state["calibration"]),
        )

    @classmethod
    def load(cls, path: str, map_location=None) -> "SparseKRRModel":
        """Read a checkpoint written by :meth:`save` (any known format version)."""
        return cls.from_dict(_read_checkpoint(path, map_location))


def _read_checkpoint(path: str, map_location=None) -> Dict:
    """The plain dict of the checkpoint file ``path`` (tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' is not an acdc-potential checkpoint")
    return state


DIPOLE_FORMAT = "acdc-potential/dipole-krr"
DIPOLE_VERSION = 2


class DipoleModel:
    """What every fitted dipole model does with its head (:meth:`head`, defined by each kind): the
    deployable module, export, predictions, checkpoints (``to_dict`` with its ``kind``).

    :param density_hypers: the hyperparameters of the model's density expansion. :param species: atomic
        numbers. :param regulariser: expected error of a dipole component (e*A) the weights were solved with.
        :param report: what the fit chose and measured (plain data). :param expansion: an already built
        density expansion.
    """

    kind = ""

    def __init__(self, density_hypers: DensityHypers, species: Sequence[int], regulariser: float, report: Optional[Dict], expansion: Optional[DensityExpansion]):
        self.density_hypers = density_hypers
        self.species = [int(z) for z in species]
        self.expansion = expansion if expansion is not None else DensityExpansion(density_hypers, self.species)
        self.regulariser = float(regulariser)
        self.report = dict(report or {})
        self._scripted: Optional[torch.jit.ScriptModule] = None

    def head(self) -> torch.nn.Module:
        raise NotImplementedError

    def references(self) -> Dict[str, List[str]]:
        raise NotImplementedError

    def fields(self) -> Dict:
        """What the checkpoint holds besides its format, version and kind (plain data and tensors)."""
        raise NotImplementedError

    def to_dict(self) -> Dict:
        return {"format": DIPOLE_FORMAT, "version": DIPOLE_VERSION, "kind": self.kind, **self.fields()}

    def potential(self) -> AtomisticPotential:
        """The deployable module, a dipole-only :class:`~acdc_potential.model.potential.AtomisticPotential`."""
        return AtomisticPotential(dipole=self.head())

    def export(self, path: str, dtype: torch.dtype = torch.float64, description: str = "") -> None:
        export_model(self.potential(), path, dtype=dtype, description=description, references=self.references())

    def scripted(self) -> torch.jit.ScriptModule:
        if self._scripted is None:
            self._scripted = torch.jit.script(self.potential().eval())
        return self._scripted

    def predict(self, structures: Sequence, batch_size: int = 16) -> torch.Tensor:
        """``[S, 3]`` dipoles (e*A) of ``structures`` by the scripted :meth:`potential`."""
        return predict_dipoles(self.scripted(), self.species, structures, batch_size)

    def save(self, path: str) -> None:
        torch.save(self.to_dict(), path)

    @staticmethod
    def from_dict(state: Dict) -> "DipoleModel":
        """The dipole model of a checkpoint dict (version 1 files hold Wigner models)."""
        if state.get("format") != DIPOLE_FORMAT or state.get("version") not in (1, DIPOLE_VERSION):
            raise CheckpointError(f"not an acdc-potential dipole checkpoint of a known version (format {state.get('format')!r}, version {state.get('version')!r})")
        kind = state.get("kind", "wigner")
        kinds = {model.kind: model for model in (WignerDipoleModel, FeatureDipoleModel)}
        if kind not in kinds:
            raise CheckpointError(f"the checkpoint names an unknown kind of dipole model {kind!r} (known: {sorted(kinds)})")
        try:
            return kinds[kind].from_state(state)
        except CheckpointError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise CheckpointError(f"the checkpoint is incomplete or malformed ({type(error).__name__}: {error})") from None


class WignerDipoleModel(DipoleModel):
    """A dipole model of Wigner kernels (:class:`~acdc_potential.model.heads.DipoleHead`): density, Wigner
    kernel with its sparse environments (``nu_max`` the chosen order), weights, mixing ``b``.

    :param density_hypers: the density expansion's hyperparameters. :param species: atomic numbers.
    :param kernel: the :class:`~acdc_potential.kernels.wigner.kernel.WignerKernel` with its sparse
        environments and order scales. :param weights: ``[M, 3]`` ``w_m`` (real ``l = 1`` components).
    :param b: the order mixing (``omega_nu = b^nu / nu!``). :param regulariser: expected error of a
        dipole component (e*A) the weights were solved with. :param report: what the fit chose and
        measured (plain data). :param expansion: an already built density expansion.
    :param charge_weights: ``[M]`` weights of the atomic charges' invariant kernel, or ``None`` (local
        dipoles only). :param charge_scale: the scale of the charges' kernel.
    """

    kind = "wigner"

    def __init__(
        self, density_hypers: DensityHypers, species: Sequence[int], kernel: SparseKernel, weights: torch.Tensor, b: float, regulariser: float,
        report: Optional[Dict] = None, expansion: Optional[DensityExpansion] = None, charge_weights: Optional[torch.Tensor] = None, charge_scale: float = 0.0,
    ):
        super().__init__(density_hypers, species, regulariser, report, expansion)
        self.kernel = kernel
        self.weights = weights
        self.b = float(b)
        self.charge_weights = charge_weights
        self.charge_scale = float(charge_scale)

    def head(self) -> DipoleHead:
        nu_max = self.kernel.nu_max
        omega = exponential_weights(nu_max, 1.0, 1.0, self.b, torch.zeros((), dtype=torch.float64))
        charges = None if self.charge_weights is None else (self.charge_scale * omega, self.charge_weights)
        return DipoleHead(self.expansion, self.kernel, self.weights, omega[1:], self.species, charges)

    def references(self) -> Dict[str, List[str]]:
        return metatomic_references("wigner", self.density_hypers.density, self.density_hypers.basis)

    def fields(self) -> Dict:
        return {
            "density_hypers": dataclasses.asdict(self.density_hypers),
            "species": list(self.species),
            "kernel": self.kernel.to_dict(),
            "weights": self.weights,
            "b": self.b,
            "regulariser": self.regulariser,
            "report": self.report,
            "charge_weights": self.charge_weights,
            "charge_scale": self.charge_scale,
        }

    @classmethod
    def from_state(cls, state: Dict) -> "WignerDipoleModel":
        kernel = kernel_from_dict(state["kernel"])
        if kernel.kind != "wigner":
            raise CheckpointError(f"a Wigner dipole model needs a Wigner kernel, the checkpoint has '{kernel.kind}'")
        return cls(
            DensityHypers(**state["density_hypers"]), state["species"], kernel, state["weights"], state["b"], state["regulariser"], state["report"],
            charge_weights=state["charge_weights"], charge_scale=state["charge_scale"],
        )


class FeatureDipoleModel(DipoleModel):
    """A linear dipole model on true-vector features (:class:`~acdc_potential.model.heads.FeatureDipoleHead`):
    ``mu_i = x_i v_{a_i}``, ``x_i`` the ``(1, +1)`` features of :class:`~acdc_potential.descriptors.vectors.VectorFeatures`.

    :param density_hypers: hyperparameters of the features' density expansion. :param species: atomic numbers.
    :param features: ``acdc`` or ``mpacdc``. :param order: the body order of ``acdc`` features.
    :param vectors: ``[S, Q]`` ``v_a`` per species (in the order of ``species``). :param regulariser: expected
        error of a dipole component (e*A) the weights were solved with. :param report: what the fit chose and
        measured (plain data). :param expansion: an already built density expansion.
    """

    kind = "features"

    def __init__(
        self, density_hypers: DensityHypers, species: Sequence[int], features: str, order: int, vectors: torch.Tensor, regulariser: float,
        report: Optional[Dict] = None, expansion: Optional[DensityExpansion] = None,
    ):
        super().__init__(density_hypers, species, regulariser, report, expansion)
        self.features = features
        self.order = int(order)
        self.vectors = vectors

    def feature_module(self) -> VectorFeatures:
        return VectorFeatures(self.expansion, self.features, self.order)

    def feature_count(self) -> int:
        """``Q``, the number of features of an atom."""
        empty = torch.zeros(0, dtype=torch.long)
        with torch.no_grad():
            return int(self.feature_module()(torch.zeros((0, 3), dtype=torch.float64), empty, empty, torch.zeros(1, dtype=torch.long)).shape[2])

    def head(self) -> FeatureDipoleHead:
        return FeatureDipoleHead(self.feature_module(), self.vectors)

    def references(self) -> Dict[str, List[str]]:
        return metatomic_references("vector_features", self.density_hypers.density, self.density_hypers.basis)

    def fields(self) -> Dict:
        return {
            "density_hypers": dataclasses.asdict(self.density_hypers),
            "species": list(self.species),
            "features": self.features,
            "order": self.order,
            "vectors": self.vectors,
            "regulariser": self.regulariser,
            "report": self.report,
        }

    @classmethod
    def from_state(cls, state: Dict) -> "FeatureDipoleModel":
        if state["features"] not in VECTOR_KINDS:
            raise CheckpointError(f"the checkpoint names unknown vector features {state['features']!r} (known: {list(VECTOR_KINDS)})")
        vectors = state["vectors"]
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] != len(state["species"]):
            raise CheckpointError(f"the checkpoint's vectors are not one row per species ({len(state['species'])})")
        model = cls(DensityHypers(**state["density_hypers"]), state["species"], state["features"], int(state["order"]), vectors, state["regulariser"], state["report"])
        if model.feature_count() != vectors.shape[1]:
            raise CheckpointError(f"the checkpoint's vectors have {vectors.shape[1]} components, its features {model.feature_count()}")
        return model


def load_checkpoint(path: str, map_location=None):
    """The :class:`SparseKRRModel` or :class:`DipoleModel` of the checkpoint ``path`` (its ``format`` says which)."""
    state = _read_checkpoint(path, map_location)
    if state.get("format") == DIPOLE_FORMAT:
        return DipoleModel.from_dict(state)
    return SparseKRRModel.from_dict(state)


def export_models(energy: Optional[SparseKRRModel], dipole: Optional[DipoleModel], path: str, dtype: torch.dtype = torch.float64, description: str = "") -> None:
    """One file with the energy model ``energy`` and the dipole model ``dipole`` (either may be
    ``None``): one engine call returns both."""
    if energy is None:
        return dipole.export(path, dtype, description)
    potential = energy.potential()
    combined = AtomisticPotential(potential.head, potential.baseline, potential.force_scale, None if dipole is None else dipole.head())
    references = energy.references()
    if dipole is not None:
        references = {kind: list(dict.fromkeys(items + dipole.references().get(kind, []))) for kind, items in references.items()}
    export_model(combined, path, dtype=dtype, description=description, references=references)
