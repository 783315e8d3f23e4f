"""The forward (noising) processes the MI score integrates over, one per way a model was trained:
how a clean latent z0 is noised at a time t, the weight of each time in the integral, what the
model is asked to predict and its output read as that prediction. A model family says which process
it was trained with (`family.noising()`); the estimator itself (scores.py) is the same for all.

* `Noising`: the DDPM process of SD 1.x / 2.x / SDXL, z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε; the model's
  output (ε, v or x0) read as a noise prediction ε̂.
* `RectifiedFlow`: the flow-matching process of SD3 / Flux, z_σ = (1−σ) z0 + σ ε; the model
  predicts the velocity v = ε − z0 (RFMI, Wang et al. 2025).

Both weights come from the I-MMSE relation (Kong et al., "Information-Theoretic Diffusion"):
i(z0; p) = ½ ∫ (mmse(z0, ∅, γ) − mmse(z0, p, γ)) dγ over the signal-to-noise ratio γ, with mmse the
squared error of the model's estimate of z0; each process rewrites dγ and that error in its own
time and its own prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ModelError

T_MIN = 51  # MITUNE's lower end of DDPM time: below it ε̂ barely depends on the prompt


def stratified(low: float, high: float, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(samples,) float64 in [low, high): the range cut into `samples` equal strata, one uniform draw in each."""
    edges = torch.linspace(low, high, samples + 1, dtype=torch.float64)
    u = torch.rand(samples, generator=generator, dtype=torch.float64)
    return edges[:-1] + u * (edges[1:] - edges[:-1])


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

    def times(self, samples: int, generator: torch.Generator) -> torch.Tensor:
        """(samples,) long: t stratified in [T_MIN, T−1], one uniform draw per stratum."""
        return stratified(T_MIN, self.T, samples, generator).floor().long().clamp(T_MIN, self.T - 1)

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

    def target(self, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the estimator compares predictions with: the noise ε itself."""
        return eps

    def predicted(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output as a prediction of `target`: `to_epsilon`."""
        return self.to_epsilon(output, z_t, t)

    def to_epsilon(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's output as a noise prediction: ε = √ᾱ v + √(1−ᾱ) z_t for v-prediction,
        (z_t − √ᾱ x̂0)/√(1−ᾱ) for x0-prediction."""
        if self.prediction_type == "epsilon":
            return output
        sa, sb = self._coefficients(t, z_t)
        if self.prediction_type == "v_prediction":
            return sa * output + sb * z_t
        return (z_t - sa * output) / sb


@dataclass(frozen=True)
class RectifiedFlow:
    """The rectified-flow (flow-matching) forward process of SD3 / Flux and its velocity:
    z_σ = (1−σ) z0 + σ ε for a noise level σ in (0, 1] (diffusers' convention: σ = 1 is pure noise;
    RFMI's t = 1 − σ), and the model predicts v = dz_σ/dσ = ε − z0.

    The model's estimate of z0 is ẑ0 = z_σ − σ v̂, so its squared error is σ²‖v − v̂‖²; with
    γ = (1−σ)²/σ², |dγ/dσ| = 2(1−σ)/σ³, and the I-MMSE integral becomes
    i(z0; p) = ∫ (1−σ)/σ · (‖v − v̂(z_σ, ∅)‖² − ‖v − v̂(z_σ, p)‖²) dσ  (t/(1−t) in RFMI's time).
    σ is drawn stratified-uniform in [sigma_min, sigma_max], so the weight carries the width."""

    sigma_min: float  # 1 / the scheduler's training steps: the least noise the model was trained at
    sigma_max: float = 1.0

    @classmethod
    def of_scheduler(cls, scheduler_config: dict) -> RectifiedFlow:
        """The noise levels a flow-matching scheduler config trains on (σ = t / num_train_timesteps)."""
        return cls(1.0 / scheduler_config.get("num_train_timesteps", 1000))

    def times(self, samples: int, generator: torch.Generator) -> torch.Tensor:
        """(samples,) float64: σ stratified in [sigma_min, sigma_max], one uniform draw per stratum."""
        return stratified(self.sigma_min, self.sigma_max, samples, generator)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """(sigma_max − sigma_min)·(1−σ)/σ: the integrand's weight, σ uniform in its range."""
        return (self.sigma_max - self.sigma_min) * (1 - sigma) / sigma

    def _sigma(self, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.to(like.device, torch.float32).view(-1, *[1] * (like.ndim - 1))

    def noised(self, z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """z_σ = (1−σ) z0 + σ ε, one σ per batch row."""
        s = self._sigma(sigma, z0)
        return (1 - s) * z0 + s * eps

    def target(self, z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The velocity v = ε − z0 (broadcast like its inputs)."""
        return eps - z0

    def predicted(self, output: torch.Tensor, z_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The model's output is the velocity already."""
        return output
