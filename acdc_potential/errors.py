"""The errors users see: each names the structure, file or option at fault."""



class StructureError(ValueError):
    """A structure the package cannot handle, with the structure's index in the message."""


class DataFileError(ValueError):
    """A data file that is missing, empty, truncated or not extxyz, or lacks the labels asked for."""


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, of an unknown version, or names anything outside the registries."""


class ModelFileError(ValueError):
    """The model file is missing, unreadable, or not an exported metatomic model."""


class ClusterError(RuntimeError):
    """A distributed fit that cannot reach its cluster or lost its tasks; the message says what is kept."""


class AccuracyWarning(UserWarning):
    """Something was computed less accurately, or with less, than the configuration asked;
    a fit records these in its model (``SparseKRRModel.warnings``)."""


class SplineAccuracyWarning(AccuracyWarning):
    """The tabulated radial integrals did not reach the requested accuracy."""


class SparseSelectionWarning(AccuracyWarning):
    """Fewer sparse environments were selected than asked."""


class BaselineWarning(AccuracyWarning):
    """The per-species baseline is not tied to isolated-atom energies, so isolated atoms are extrapolations."""


__all__ = ["AccuracyWarning", "BaselineWarning", "CheckpointError", "ClusterError", "DataFileError", "ModelFileError", "SparseSelectionWarning", "SplineAccuracyWarning", "StructureError"]
