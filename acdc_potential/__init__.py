"""acdc-potential: body-ordered, symmetry-adapted kernel potentials.

The pipeline, one module per stage (data flows down this list):

- :mod:`~acdc_potential.neighbors`: batches of structures and neighbour lists (vesin);
- :mod:`~acdc_potential.radial`: radial bases, densities and tabulated radial integrals;
- :mod:`~acdc_potential.density`: density coefficients ``c_i[a n l m]`` in torch;
- :mod:`~acdc_potential.cg`: real-basis Clebsch-Gordan coefficients and coupling.
"""

__version__ = "0.1.0"
