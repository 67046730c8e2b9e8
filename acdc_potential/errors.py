"""The errors users see: each names the structure, file or option at fault."""



class StructureError(ValueError):
    """A structure the package cannot handle, with the structure's index in the message."""


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, of an unknown version, or names anything outside the registries."""


class ModelFileError(ValueError):
    """The model file is missing, unreadable, or not an exported metatomic model."""


class AccuracyWarning(UserWarning):
    """Something was computed less accurately, or with less, than the configuration asked;
    a fit records these in its model (``SparseKRRModel.warnings``)."""


class SplineAccuracyWarning(AccuracyWarning):
    """The tabulated radial integrals did not reach the requested accuracy."""


class SparseSelectionWarning(AccuracyWarning):
    """Fewer sparse environments were selected than asked."""


__all__ = ["AccuracyWarning", "CheckpointError", "ModelFileError", "SparseSelectionWarning", "SplineAccuracyWarning", "StructureError"]
