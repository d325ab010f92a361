"""Bayesian heads for any Equinox module, on NumPyro.

Priors over chosen leaves of a module (the rest kept fixed), likelihood heads, NUTS and SVI,
the posterior predictive, a Bayesian last layer for a trained trunk (closed form for Gaussian
heads), and calibration metrics. Import explicitly: `import eqzoo.bayes` (needs the `bayes`
extra, i.e. NumPyro).
"""

from .._errors import require as _require

_require("numpyro", "bayes")

from ._inference import run_nuts as run_nuts, run_svi as run_svi  # noqa: E402
from ._last_layer import (  # noqa: E402
    BayesianLastLayer as BayesianLastLayer,
    ConjugateGaussianHead as ConjugateGaussianHead,
    fit_conjugate_gaussian as fit_conjugate_gaussian,
    fit_last_layer as fit_last_layer,
    student_t_icdf as student_t_icdf,
    trunk_features as trunk_features,
)
from ._likelihoods import (  # noqa: E402
    AbstractLikelihood as AbstractLikelihood,
    Bernoulli as Bernoulli,
    Categorical as Categorical,
    Gaussian as Gaussian,
    Poisson as Poisson,
    StudentT as StudentT,
)
from ._metrics import (  # noqa: E402
    crps_gaussian as crps_gaussian,
    crps_samples as crps_samples,
    expected_calibration_error as expected_calibration_error,
    interval_coverage as interval_coverage,
    negative_log_predictive_density as negative_log_predictive_density,
    reliability_diagram as reliability_diagram,
)
from ._model import BayesianModel as BayesianModel, NonFiniteDataError as NonFiniteDataError  # noqa: E402
from ._posterior import Posterior as Posterior, Prediction as Prediction, rhat_ess as rhat_ess  # noqa: E402
from ._priors import AroundValue as AroundValue, FanInNormal as FanInNormal, Subtree as Subtree  # noqa: E402

__all__ = [
    "BayesianModel",
    "Subtree",
    "FanInNormal",
    "AroundValue",
    "AbstractLikelihood",
    "Gaussian",
    "StudentT",
    "Bernoulli",
    "Categorical",
    "Poisson",
    "run_nuts",
    "run_svi",
    "Posterior",
    "Prediction",
    "rhat_ess",
    "BayesianLastLayer",
    "ConjugateGaussianHead",
    "fit_last_layer",
    "fit_conjugate_gaussian",
    "trunk_features",
    "student_t_icdf",
    "negative_log_predictive_density",
    "interval_coverage",
    "expected_calibration_error",
    "reliability_diagram",
    "crps_gaussian",
    "crps_samples",
    "NonFiniteDataError",
]
