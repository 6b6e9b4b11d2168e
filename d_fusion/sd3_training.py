"""The flow policy: log-probabilities of stored SD 3 / 3.5 transitions under the current transformer
(docs/METHOD.md §7 and §10), the counterpart of `trainer.Policy` for the UNet.

`transition` is the stochastic flow step's log-density (`flow.flow_step_with_logprob`) of the stored
x' given the stored x, with the transformer's CFG velocity, differentiable through LoRA
(`sd3_lora.add_sd3_lora`); the reference policy is the same transformer with its adapters off.
Its (log_prob, velocity) feed `training.dpo_loss` and `training.ppo_loss` unchanged (the velocity
takes the noise prediction's place in DPO's regulariser).
"""

from dataclasses import dataclass

import torch

from d_fusion.flow import flow_step_std, flow_step_with_logprob
from d_fusion.sd3 import TextConditioning, guided_velocity, set_flow_timesteps
from d_fusion.trainer import reference_policy


@dataclass
class FlowPolicy:
    """Everything needed to score a stored transition under the current transformer."""

    models: object  # sd3.StableDiffusion3
    negative: TextConditioning  # the empty prompt's, 1 row
    guidance_scale: float
    cfg: bool
    noise_level: float

    def transition(self, latents, timesteps, step, text):
        """log p(x' | x, c) at `step` of trajectories latents (B, T+1, C, H, W), and the velocity.

        text: `TextConditioning` of B rows. Returns (log_prob (B,), velocity (B, C, H, W)).
        """
        device, batch = self.models.device, latents.shape[0]
        x, x_next = latents[:, step].to(device), latents[:, step + 1].to(device)
        t = timesteps[step].to(device)
        velocity = guided_velocity(
            self.models.transformer, x, t, text, self.negative.expand(batch), self.guidance_scale, self.cfg
        )
        _, log_prob, _ = flow_step_with_logprob(self.models.scheduler, velocity, t, x, self.noise_level, prev_sample=x_next)
        return log_prob, velocity

    def reference_transition(self, latents, timesteps, step, text):
        with torch.no_grad(), reference_policy(self.models.transformer):
            return self.transition(latents, timesteps, step, text)

    def set_timesteps(self, num_steps):
        """The sampling schedule, which `transition` reads sigma and sigma' from."""
        set_flow_timesteps(self.models.scheduler, self.models.transformer, num_steps, self.models.device)

    def trainable_steps(self):
        """The step indices of the schedule set last whose std is > 0 (all of them unless the noise level is 0)."""
        scheduler = self.models.scheduler
        return [j for j, t in enumerate(scheduler.timesteps) if flow_step_std(scheduler, t.cpu(), self.noise_level) > 0]

    @torch.no_grad()
    def trajectory_log_probs(self, trajectories, text):
        """Log-probs (B, T) of every step of stored trajectories under the current policy."""
        steps = range(trajectories.timesteps.shape[0])
        self.set_timesteps(len(steps))
        return torch.stack([self.transition(trajectories.latents, trajectories.timesteps, j, text)[0] for j in steps], dim=1).cpu()
