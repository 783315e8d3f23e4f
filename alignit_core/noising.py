"""The forward (noising) process of a DDPM-trained model and its ε-parametrisation, as the MI
score needs them: z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε, the weight k_t of each timestep, and any output
(ε, v or x0) turned into a noise prediction. A model family says which process it was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ModelError


@dataclass(frozen=True)
class Noising:
    """The DDPM forward process of a model's scheduler, and its ε-parametrisation."""

    betas: torch.Tensor  # (T,) float64
    alphas_cumprod: torch.Tensor  # (T,) float64
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"

    @classmethod
    def of_scheduler(cls, scheduler_config: dict) -> Noising:
        """The process a diffusers scheduler config describes. Raises ModelError for a model that
        predicts something other than noise, velocity or the clean sample."""
        from diffusers import DDPMScheduler

        # any SD scheduler config describes the same training process; DDPM's reads it plainly
        sched = DDPMScheduler.from_config(scheduler_config)
        kind = sched.config.prediction_type
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ModelError(f"cannot score a model that predicts {kind!r}")
        return cls(sched.betas.double(), sched.alphas_cumprod.double(), kind)

    @property
    def T(self) -> int:
        return len(self.betas)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """k_t = T·β_t / (2(1−ᾱ_t)): the change of log-SNR per step, times T (t uniform)."""
        return self.T * self.betas[t] / (2 * (1 - self.alphas_cumprod[t]))

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod[t].to(like.device, torch.float32).view(-1, *[1] * (like.ndim - 1))
        return a.sqrt(), (1 - a).sqrt()

    def noised(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε, one t per batch row."""
        sa, sb = self._coefficients(t, z0)
        return sa * z0 + sb * eps

    def to_epsilon(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's output as a noise prediction: ε = √ᾱ v + √(1−ᾱ) z_t for v-prediction,
        (z_t − √ᾱ x̂0)/√(1−ᾱ) for x0-prediction."""
        if self.prediction_type == "epsilon":
            return output
        sa, sb = self._coefficients(t, z_t)
        if self.prediction_type == "v_prediction":
            return sa * output + sb * z_t
        return (z_t - sa * output) / sb
