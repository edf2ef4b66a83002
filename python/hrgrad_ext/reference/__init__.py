"""Reference solvers (numpy/scipy, float64) for the kinetic problems of the spec.

* :func:`solve_bgk` - BGK equation, cases I-V (discrete velocities, MUSCL finite volumes,
  AP implicit relaxation with exact discrete conservation).
* :func:`solve_transport` - linear transport in diffusive scaling (S_N, diamond differencing,
  BDF2, exact scattering solve); :func:`diffusion_limit` - its eps -> 0 series solution;
  :func:`solve_transport_ld` - an independent check scheme (linear discontinuous, SDIRK2);
  :func:`solve_transport_explicit` - explicit MUSCL/SSP-RK2, for eps ~ 1 only.

Results are cached on disk (see :mod:`hrgrad_ext.reference.cache`).
"""

from .bgk import BGKResult, solve_bgk
from .transport import (TransportResult, diffusion_limit, solve_transport,
                        solve_transport_explicit, solve_transport_ld)

__all__ = ["BGKResult", "TransportResult", "solve_bgk", "solve_transport", "solve_transport_ld",
           "solve_transport_explicit", "diffusion_limit"]
