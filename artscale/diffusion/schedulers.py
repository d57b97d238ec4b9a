"""The noise schedule of training (DDPM) and the samplers built from its config (DDIM, DPM-Solver++)."""

from __future__ import annotations

from typing import Any

from artscale.core.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("ddim", "dpm++")


def train_scheduler(
    prediction_type: str = "v_prediction", beta_schedule: str = "squaredcos_cap_v2", zero_terminal_snr: bool = False
) -> Any:
    """The forward process (`add_noise`, `get_velocity`); its config is what samplers are built from."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        clip_sample=False,
    )


def make_sampler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """DDIM or DPM-Solver++(2M) from the training scheduler's config (same betas, same prediction type).

    Trailing timestep spacing starts at the last training timestep, as the zero-terminal-SNR paper
    asks (https://arxiv.org/abs/2305.08891); both samplers are deterministic given the start noise."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    raise UserError(f"sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
