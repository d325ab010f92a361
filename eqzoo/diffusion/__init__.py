"""Diffusion models: noise schedules, the denoising loss, and samplers (DDPM, DDIM, probability-flow ODE).

The networks are [`eqzoo.models.DiT`][] and [`eqzoo.models.UNet`][]; this package holds what turns
them into generative models. A [`eqzoo.diffusion.NoiseSchedule`][] fixes the forward (noising)
process; [`eqzoo.diffusion.make_diffusion_loss`][] gives a `loss_fn(model, batch, key)` for
`eqzoo.train.make_train_step`; [`eqzoo.diffusion.sample`][] runs the reverse process inside one
compiled `lax.scan`, with classifier-free guidance, and [`eqzoo.diffusion.sample_ode`][] solves the
probability-flow ODE with Diffrax (the `sciml` extra).
"""

from ._loss import diffusion_loss as diffusion_loss, make_diffusion_loss as make_diffusion_loss
from ._ode import sample_ode as sample_ode
from ._sample import (
    guided_prediction as guided_prediction,
    sample as sample,
    sampling_timesteps as sampling_timesteps,
    to_epsilon_and_x0 as to_epsilon_and_x0,
)
from ._schedule import PREDICTIONS as PREDICTIONS, NoiseSchedule as NoiseSchedule

__all__ = [
    "PREDICTIONS",
    "NoiseSchedule",
    "diffusion_loss",
    "guided_prediction",
    "make_diffusion_loss",
    "sample",
    "sample_ode",
    "sampling_timesteps",
    "to_epsilon_and_x0",
]
