"""Scientific ML on Equinox modules with Diffrax: neural ODEs/CDEs, latent ODEs, PINN losses.

Import it explicitly (`import eqzoo.sciml`); it needs the `sciml` extra (`diffrax`).
"""

from .._errors import require as _require

_require("diffrax", "sciml")

from ._cde import NeuralCDE as NeuralCDE  # noqa: E402
from ._errors import (  # noqa: E402
    SolverError as SolverError,
    TimeGridError as TimeGridError,
    VectorFieldError as VectorFieldError,
)
from ._latent import LatentODE as LatentODE  # noqa: E402
from ._node import Autonomous as Autonomous, NeuralODE as NeuralODE  # noqa: E402
from ._pinn import (  # noqa: E402
    divergence as divergence,
    gradient as gradient,
    laplacian as laplacian,
    pinn_loss as pinn_loss,
    pinn_loss_terms as pinn_loss_terms,
    pinn_residual as pinn_residual,
    sample_boundary as sample_boundary,
    sample_collocation as sample_collocation,
)

__all__ = [
    "Autonomous",
    "NeuralODE",
    "NeuralCDE",
    "LatentODE",
    "gradient",
    "laplacian",
    "divergence",
    "pinn_residual",
    "pinn_loss",
    "pinn_loss_terms",
    "sample_collocation",
    "sample_boundary",
    "SolverError",
    "TimeGridError",
    "VectorFieldError",
]
