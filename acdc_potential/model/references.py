"""The references of the methods a model uses, for the metadata of its exported file.

:func:`metatomic_references` gives the ``references`` of metatomic's ``ModelMetadata``:
``implementation`` (the software the model is built with), ``architecture`` (the methods) and
``model`` (the fitted model itself: nothing to cite). docs/references.md lists them with how
each DOI was checked.
"""

from typing import Dict, List

from .. import __version__

WIGNER_KERNELS = (
    "F. Bigi, S. N. Pozdnyakov, M. Ceriotti, Wigner kernels: body-ordered equivariant machine learning "
    "without a basis, J. Chem. Phys. 161, 044116 (2024), https://doi.org/10.1063/5.0208746 (arXiv:2303.04124)"
)
MP_ACDC = (
    "J. Nigam, S. Pozdnyakov, G. Fraux, M. Ceriotti, Unified theory of atom-centered representations and "
    "message-passing machine-learning schemes, J. Chem. Phys. 156, 204115 (2022) (arXiv:2202.01566)"
)
LE_BASIS = (
    "F. Bigi, K. K. Huguenin-Dumittan, M. Ceriotti, D. E. Manolopoulos, A smooth basis for atomistic "
    "machine learning, J. Chem. Phys. 157, 234101 (2022), https://doi.org/10.1063/5.0124363 (arXiv:2209.01948)"
)
SOAP = (
    "A. P. Bartok, R. Kondor, G. Csanyi, On representing chemical environments, "
    "Phys. Rev. B 87, 184115 (2013) (arXiv:1209.3140)"
)
GAP = (
    "A. P. Bartok, M. C. Payne, R. Kondor, G. Csanyi, Gaussian Approximation Potentials: the accuracy of "
    "quantum mechanics, without the electrons, Phys. Rev. Lett. 104, 136403 (2010)"
)
SPARSE_GP = (
    "J. Quinonero-Candela, C. E. Rasmussen, A unifying view of sparse approximate Gaussian process "
    "regression, J. Mach. Learn. Res. 6 (2005)"
)
PROJECTED_PROCESS = (
    "M. Seeger, C. K. I. Williams, N. D. Lawrence, Fast forward selection to speed up sparse Gaussian "
    "process regression, Proc. 9th International Workshop on Artificial Intelligence and Statistics (2003)"
)
METATOMIC = (
    "F. Bigi, J. W. Abbott, P. Loche, et al., metatensor and metatomic: foundational libraries for "
    "interoperable atomistic machine learning, https://doi.org/10.1063/5.0304911 (arXiv:2508.15704)"
)
ASE = (
    "A. H. Larsen et al., The atomic simulation environment - a Python library for working with atoms, "
    "J. Phys.: Condens. Matter 29, 273002 (2017), https://doi.org/10.1088/1361-648X/aa680e"
)

# method -> references of the method itself
METHOD_REFERENCES = {
    # exponential body-ordered Wigner kernel (WK eq. 6-8, C1, E4) on density coefficients
    # (the CG iteration and parity of MP-ACDC eq. 5)
    "wigner": [WIGNER_KERNELS, MP_ACDC],
    # polynomial kernel (p.p')^zeta on the normalised SOAP power spectrum (MP-ACDC eq. 7), GAP form
    "polynomial": [SOAP, GAP, MP_ACDC],
    # the same on message-passing ACDC invariants [1 <- 1] (MP-ACDC eq. 12, 21-23)
    "mpacdc": [MP_ACDC, SOAP, GAP],
    # a linear model on (lambda = 1, sigma = +1) ACDC or MP-ACDC features (MP-ACDC eq. 5, 12, 21-23)
    "vector_features": [MP_ACDC],
    # sparse kernel ridge regression, projected process, on energies, forces and stresses
    "sparse_krr": [GAP, SPARSE_GP, PROJECTED_PROCESS],
}
# references that depend on the density hyperparameters, not on the kernel
DENSITY_REFERENCES = {
    "density=wigner": [WIGNER_KERNELS],  # width C exp(r/r0), weight exp(-r/r0) (WK eq. E1, E2)
    "basis=le": [LE_BASIS],              # Laplacian-eigenstate radial basis
}
IMPLEMENTATION_REFERENCES = [f"acdc-potential {__version__}", METATOMIC, ASE]


def metatomic_references(kernel: str, density: str = "wigner", basis: str = "le") -> Dict[str, List[str]]:
    """``ModelMetadata(references=...)`` for a model with ``kernel`` ("wigner", "polynomial", "mpacdc" or
    "vector_features")
    and the density hyperparameters ``density`` ("wigner" or "gaussian") and ``basis`` ("le" or "gto")."""
    architecture = list(METHOD_REFERENCES[kernel])
    architecture += DENSITY_REFERENCES.get(f"density={density}", [])
    architecture += DENSITY_REFERENCES.get(f"basis={basis}", [])
    architecture += METHOD_REFERENCES["sparse_krr"]
    unique = list(dict.fromkeys(architecture))  # keep the order, drop repeats
    return {"architecture": unique, "implementation": list(IMPLEMENTATION_REFERENCES), "model": []}
