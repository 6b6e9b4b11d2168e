"""The trainer (docs/METHOD.md §7): the LoRA policy, its optimizer, and one epoch of DPO or DDPO updates.

The policy is the UNet (SD 3: the transformer) with LoRA adapters; the reference policy is the same
model with the adapters disabled (no second copy). Both run plain attention with CFG when `train.cfg`.
The log-probability of a stored transition x_t -> x_{t'} is the family's step's (docs/METHOD.md §3.2,
SD 3's flow step §10), evaluated at the stored x_{t'}.

Optimisation: each pair (DPO) or sample (DDPO) contributes a random subset of its steps;
`train.batch_size * train.gradient_accumulation_steps` of them make one optimizer step (the loss is
the mean over their (item, timestep) rows). The rows go through the UNet `train.compute_batch_size`
at a time, each row at its own timestep; the chunking changes nothing but the speed (and the last
bits of fp32 sums). `num_inner_epochs` reshuffled passes, planned before training (`epoch_plan`).
The reference's log-probabilities of the epoch's DPO rows are computed once, before the first
pass: the reference (adapters off) does not change during an epoch.

Data-parallel (`accelerate launch --num_processes K`): `train.batch_size` is per process, so a step
takes K times as many items; each process takes its share of them, and the LoRA gradients are
summed over the processes before the step, so every process takes the same step and keeps the
same weights. Every process draws the same shuffles and timesteps from the same generator.
"""

import contextlib
import logging
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from d_fusion import distributed
from d_fusion.errors import UserError
from d_fusion.families import Conditioning, UNetFamily
from d_fusion.objectives import dpo_loss, dpok_loss, ppo_loss
from d_fusion.sampling import Trajectories, negative_conditioning

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- policy and reference


def add_lora(unet, rank, seed, targets=UNetFamily.lora_targets):
    """LoRA adapters on the `targets` projections (B = 0: the policy starts equal to the reference; A drawn
    from `seed`, the global RNG left as it was); returns the trainable params, in fp32."""
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(targets)))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def add_model_lora(models, rank, seed):
    """LoRA on the family's denoiser (UNet or transformer), on the family's targets."""
    return add_lora(models.denoiser, rank, seed, models.family.lora_targets)


def lora_state_dict(unet):
    """The UNet's LoRA weights, named as `load_lora_weights` reads them (without the "unet." prefix)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def load_lora_state_dict(unet, weights):
    """Set the UNet's LoRA adapter from `lora_state_dict`'s format; returns the keys that did not fit
    ([] when all did). Raises RuntimeError on a shape mismatch (another rank or model)."""
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(weights))
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    return list(result.unexpected_keys) + missing_lora if weights else ["(no weights)"]


@contextlib.contextmanager
def reference_policy(unet):
    """The UNet with its adapters disabled, for the duration of the block."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def at_step(latents, step, device):
    """x at `step` of trajectories latents (B, T+1, C, H, W), step one index or (B,) one per row: (B, C, H, W)."""
    return latents[torch.arange(latents.shape[0]), step].to(device)


@dataclass
class Policy:
    """Everything needed to score a stored transition under the current UNet (or SD 3's transformer), with
    the family's step (`models.family.solver()`: DDIM, SD 3's flow step)."""

    models: object  # StableDiffusion, sd3.StableDiffusion3
    negative: Conditioning  # one row: CFG's unconditional conditioning
    sampler: object  # SamplerSettings of the trajectories (with train.cfg as its cfg)

    @property
    def solver(self):
        return self.models.family.solver()

    def transition(self, latents, timesteps, step, conditioning):
        """log p(x_{t'} | x_t, c) at `step` of trajectories latents (B, T+1, C, H, W), and the noise prediction
        (SD 3: the velocity).

        step: one step index, or (B,) one per row (each row at its own timestep). Returns (log_prob (B,),
        noise_pred (B, C, H, W)); differentiable through the LoRA weights.
        """
        device, batch, sampler = self.models.device, latents.shape[0], self.sampler
        x_t, x_next, t = at_step(latents, step, device), at_step(latents, step + 1, device), timesteps[step].to(device)
        noise_pred = self.solver.prediction(
            self.models.denoiser,
            x_t,
            t,
            conditioning.to(device),
            self.negative.expand(batch),
            sampler.guidance_scale,
            cfg=sampler.cfg,
        )
        _, log_prob, _ = self.solver.step(self.models.scheduler, noise_pred, t, x_t, sampler, prev_sample=x_next)
        return log_prob, noise_pred

    def step_mean(self, noise_pred, latents, timesteps, step):
        """The mean (B, C, H, W) and std (B, 1, 1, 1) of the step from x_t (docs/METHOD.md §3.1), given the
        noise prediction; step: one index or (B,), as in `transition`."""
        x_t, t = at_step(latents, step, self.models.device), timesteps[step].to(self.models.device)
        return self.solver.step_mean(self.models.scheduler, noise_pred, t, x_t, self.sampler)

    def reference_transition(self, latents, timesteps, step, conditioning):
        with torch.no_grad(), reference_policy(self.models.denoiser):
            return self.transition(latents, timesteps, step, conditioning)

    def set_timesteps(self):
        """The scheduler's step spacing, which `transition` uses for t' (sampling sets the same)."""
        self.solver.set_timesteps(self.models, self.sampler.num_steps)

    def trainable_steps(self):
        """The step indices whose std is > 0: a step with std 0 (onto a final alpha of 1, or any step at noise
        level 0) has no log-probability and is never trained on (docs/METHOD.md §3.3)."""
        self.set_timesteps()
        scheduler = self.models.scheduler
        return [j for j, t in enumerate(scheduler.timesteps) if self.solver.step_std(scheduler, t.cpu(), self.sampler) > 0]

    @torch.no_grad()
    def trajectory_log_probs(self, trajectories, conditioning):
        """Log-probs (B, T) of every step of stored trajectories under the current policy."""
        self.set_timesteps()
        steps = range(trajectories.timesteps.shape[0])
        return torch.stack(
            [self.transition(trajectories.latents, trajectories.timesteps, j, conditioning)[0] for j in steps], dim=1
        ).cpu()


def train_timesteps(steps, fraction, generator):
    """The first floor(len(steps) * fraction) of a random permutation of `steps` (step indices)."""
    steps = list(steps)
    return [steps[i] for i in torch.randperm(len(steps), generator=generator)[: int(len(steps) * fraction)].tolist()]


@dataclass(frozen=True)
class OptimizerStep:
    """One optimizer step of an epoch's plan: the (item, step index) rows this process trains on, and
    the number of rows of the whole group (every process's), by which each row's loss is divided."""

    rows: list  # [(item, step)], step-major: the items' first timesteps, then their second, ...
    group_rows: int


def chunks(rows, size):
    """`rows` in consecutive chunks of `size`, each as (items (n,) long, steps (n,) long)."""
    for start in range(0, len(rows), size):
        items, steps = zip(*rows[start : start + size])
        yield torch.tensor(items), torch.tensor(steps)


# ---------------------------------------------------------------- the epoch's training data


@dataclass
class PreferencePairs:
    """DPO data: pair k is (preferred[k] = target (or reference), dispreferred[k] = base), both of prompt
    conditioning[k]."""

    preferred: Trajectories  # (K, T+1, C, H, W)
    dispreferred: Trajectories
    conditioning: Conditioning  # K rows

    def __len__(self):
        return len(self.conditioning)


@dataclass
class ScoredSamples:
    """DDPO data: trajectories with their old log-probs (in `trajectories.log_probs`) and advantages."""

    trajectories: Trajectories  # (N, T+1, C, H, W), log_probs (N, T) = logp_old
    conditioning: Conditioning  # N rows
    advantages: torch.Tensor  # (N,)

    def __len__(self):
        return len(self.conditioning)


# ---------------------------------------------------------------- the trainer


class MetricsSum:
    """Running sums of per-timestep statistics."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, name, values):
        values = values.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + values.sum().item()
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def means(self):
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    @staticmethod
    def total(parts):
        """The sums of several MetricsSum (one per process)."""
        total = MetricsSum()
        for part in parts:
            for name in part.sums:
                total.sums[name] = total.sums.get(name, 0.0) + part.sums[name]
                total.counts[name] = total.counts.get(name, 0) + part.counts[name]
        return total


class Trainer:
    """The LoRA policy, its optimizer and the accelerator; `train_pairs` / `train_samples` run one epoch.

    train: the `config.train` block (algorithm, loss and optimisation settings); sampler: the
    SamplerSettings the trajectories were made with; make_optimizer(params) -> the optimizer.
    """

    def __init__(self, models, train, sampler, seed, mixed_precision, make_optimizer):
        self.train, self.models, self.seed = train, models, seed
        on_cpu = models.device.type == "cpu"
        self.accelerator = Accelerator(
            mixed_precision="no" if on_cpu else mixed_precision, cpu=on_cpu, device_placement=False
        )
        self.params = add_model_lora(models, train.lora_rank, seed)
        if train.gradient_checkpointing:
            models.denoiser.enable_gradient_checkpointing()
        self.optimizer = self.accelerator.prepare(make_optimizer(self.params))
        self.policy = Policy(models, negative_conditioning(models), sampler)
        log.info(
            "LoRA rank %d: %d trainable parameters (%s, %s)",
            train.lora_rank,
            sum(p.numel() for p in self.params),
            train.algorithm,
            self.accelerator.mixed_precision,
        )

    # --- state, for checkpoints ---
    def state_dict(self):
        """{"lora": the LoRA weights (load_lora_weights' names), "lora_rank", "optimizer": its state_dict,
        "grad_scaler": the fp16 gradient scaler's state or None}."""
        scaler = self.accelerator.scaler
        return dict(
            lora=self.models.family.lora_state_dict(self.models.denoiser),
            lora_rank=self.train.lora_rank,
            optimizer=self.optimizer.state_dict(),
            grad_scaler=scaler.state_dict() if scaler is not None else None,
        )

    def load_state_dict(self, state):
        """Restore `state_dict`'s output. Raises ValueError naming what does not fit this trainer."""
        if state["lora_rank"] != self.train.lora_rank:
            raise ValueError(f"LoRA rank {state['lora_rank']}, this run's train.lora_rank is {self.train.lora_rank}")
        try:
            misfits = load_lora_state_dict(self.models.denoiser, state["lora"])
        except RuntimeError as error:  # a shape mismatch
            raise ValueError(f"LoRA weights that do not fit this UNet ({error})") from None
        if misfits:
            raise ValueError(f"LoRA weights that do not match this UNet's LoRA layers ({misfits[:3]})")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"an optimizer state that does not fit this run's optimizer ({error}): "
                "use the checkpoint's settings (train.use_8bit_adam, train.lora_rank)"
            ) from None
        scaler = self.accelerator.scaler
        if scaler is not None and state["grad_scaler"] is not None:
            scaler.load_state_dict(state["grad_scaler"])

    # --- one epoch ---
    def check_steps(self, trajectories):
        """Stored trajectories must have the sampler's number of steps: t' depends on the spacing."""
        num_steps = self.policy.sampler.num_steps
        if len(trajectories.timesteps) != num_steps:
            raise UserError(
                f"the epoch's trajectories have {len(trajectories.timesteps)} steps but config.sample.num_steps is "
                f"{num_steps}: rerun with the sampling settings the epoch was made with"
            )

    def epoch_generator(self, epoch):
        """The generator of an epoch's shuffles and timestep subsets: a function of (seed, epoch), so resume is exact."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def epoch_plan(self, num_items, epoch):
        """Every OptimizerStep of the epoch: `num_inner_epochs` shuffled passes over items 0..num_items-1
        in groups of batch_size * gradient_accumulation_steps * processes items, each item with its
        random timesteps. Drawn before any training from the epoch's generator (nothing else draws
        from it), in the order the one-item-at-a-time loop drew them; every process draws the whole
        plan and keeps its share of each group."""
        train = self.train
        generator = self.epoch_generator(epoch)
        steps = self.policy.trainable_steps()
        group_size = train.batch_size * train.gradient_accumulation_steps * distributed.world_size()
        plan = []
        for _ in range(train.num_inner_epochs):
            order = torch.randperm(num_items, generator=generator)
            for group in order.split(group_size):
                item_steps = [(i, train_timesteps(steps, train.timestep_fraction, generator)) for i in group.tolist()]
                per_item = len(item_steps[0][1])
                share = distributed.shard(item_steps)
                rows = [(item, item_steps_j[s]) for s in range(per_item) for item, item_steps_j in share]
                plan.append(OptimizerStep(rows, len(group) * per_item))
        return plan

    def optimize(self, plan, rows_loss):
        """Train on an epoch's plan (`epoch_plan`); returns the mean statistics.

        Each optimizer step's rows go through the UNet `train.compute_batch_size` at a time (one forward
        and backward each), so its gradient is the mean over the group's rows whatever the chunking.
        rows_loss(items (n,), steps (n,)) -> (loss (n,), stats {name: (n,)}).
        """
        train = self.train
        metrics = MetricsSum()
        for step in plan:
            for items, steps in chunks(step.rows, train.compute_batch_size):
                with self.accelerator.autocast():
                    loss, stats = rows_loss(items, steps)
                self.accelerator.backward(loss.sum() / step.group_rows)
                metrics.add("loss", loss)
                for name, values in stats.items():
                    metrics.add(name, values)
            distributed.sum_gradients(self.params)  # the group's mean gradient on every process
            self.accelerator.clip_grad_norm_(self.params, train.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        metrics = MetricsSum.total(distributed.gather(metrics))
        return metrics.means() | {"lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def reference_log_probs(self, pairs, rows):
        """{(item, step): (2,) [logp_ref(w), logp_ref(l)]} of every distinct row of `rows`, without gradients,
        `train.reference_batch_size` pairs per UNet call: the reference does not change during an epoch."""
        table = {}
        with reference_policy(self.models.denoiser), self.accelerator.autocast():
            for items, steps in chunks(list(dict.fromkeys(rows)), self.train.reference_batch_size):
                log_prob, _ = self.policy.transition(*pair_rows(pairs, items, steps))
                for row, value in zip(zip(items.tolist(), steps.tolist()), log_prob.view(2, -1).T.cpu()):
                    table[row] = value
        return table

    def train_pairs(self, pairs, epoch):
        """DPO on the epoch's (target, base) pairs; returns the epoch's training metrics."""
        train = self.train
        self.check_steps(pairs.preferred)
        plan = self.epoch_plan(len(pairs), epoch)
        reference = self.reference_log_probs(pairs, [row for step in plan for row in step.rows])

        def rows_loss(items, steps):
            latents, timesteps, both_steps, conditioning = pair_rows(pairs, items, steps)
            log_prob, noise = self.policy.transition(latents, timesteps, both_steps, conditioning)  # (2n,): [w; l]
            ref_log_prob = torch.stack([reference[row] for row in zip(items.tolist(), steps.tolist())])  # (n, 2)
            log_ratio_w, log_ratio_l = log_prob.view(2, -1) - ref_log_prob.T.to(log_prob.device)
            w = slice(0, len(items))
            noise_w = noise[w]
            if train.beta > 0:  # the regulariser: the reference's noise prediction on w
                ref_noise_w = self.policy.reference_transition(latents[w], timesteps, steps, conditioning[w])[1]
            else:
                ref_noise_w = noise_w.detach()  # a regulariser of weight 0
            return dpo_loss(log_ratio_w, log_ratio_l, noise_w, ref_noise_w, train.alpha, train.beta, train.eps)

        return self.optimize(plan, rows_loss)

    def train_samples(self, samples, epoch):
        """DDPO (PPO-clip), or DPOK (PPO-clip and the KL to the reference), on the epoch's scored samples;
        returns the epoch's training metrics."""
        train, policy = self.train, self.policy
        trajectories = samples.trajectories
        timesteps = trajectories.timesteps
        self.check_steps(trajectories)

        def rows_loss(items, steps):
            conditioning = samples.conditioning[items].to(self.models.device)
            latents = trajectories.latents[items]
            log_prob, noise = policy.transition(latents, timesteps, steps, conditioning)
            old_log_prob = trajectories.log_probs[items, steps].to(log_prob.device)
            advantage = samples.advantages[items].to(log_prob.device)
            if train.algorithm == "ddpo":
                return ppo_loss(log_prob, old_log_prob, advantage, train.eps)
            _, ref_noise = policy.reference_transition(latents, timesteps, steps, conditioning)
            mean, std = policy.step_mean(noise, latents, timesteps, steps)
            ref_mean, _ = policy.step_mean(ref_noise, latents, timesteps, steps)
            return dpok_loss(log_prob, old_log_prob, advantage, mean, ref_mean, std, train.eps, train.kl_weight)

        return self.optimize(self.epoch_plan(len(samples), epoch), rows_loss)


def pair_rows(pairs, items, steps):
    """The rows (item, step) of both sides of their pairs, [w; l]: (latents (2n, T+1, C, H, W), timesteps
    (T,), steps (2n,), conditioning (2n rows)), as `Policy.transition` takes them."""
    latents = torch.cat([pairs.preferred.latents[items], pairs.dispreferred.latents[items]])
    conditioning = pairs.conditioning[items]
    return latents, pairs.preferred.timesteps, torch.cat([steps, steps]), Conditioning.cat([conditioning, conditioning])
