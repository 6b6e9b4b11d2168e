"""Training (SPEC sections 7, 8): trajectory DPO on (target, base) pairs, DDPO, or DPOK, with LoRA on the UNet.

The policy is the UNet with LoRA adapters; the reference policy is the same UNet with the adapters
disabled (no second copy). Both run plain attention with CFG when `train.cfg`. The log-probability
of a stored transition x_t -> x_{t'} is SPEC section 3's, evaluated at the stored x_{t'}.

Optimisation: each pair (DPO) or sample (DDPO, DPOK) contributes a random subset of its steps;
`train.batch_size * train.gradient_accumulation_steps` of them, one after another, make one
optimizer step (the loss is the mean over their timesteps). `num_inner_epochs` reshuffled passes.

Data-parallel (`accelerate launch --num_processes K`): `train.batch_size` is per process, so a step
takes K times as many items; each process takes its share of them, and the LoRA gradients are
summed over the processes before the step, so every process takes the same step and keeps the
same weights. Every process draws the same shuffles and timesteps from the same generator.
"""

import contextlib
import importlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from d_fusion import distributed
from d_fusion.checkpoints import find_checkpoint, resume, save_epoch_checkpoint
from d_fusion.ddim import ddim_step_mean, ddim_step_with_logprob, step_std
from d_fusion.errors import UserError
from d_fusion.sampling import Trajectories, encode_prompts, guided_noise

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ALGORITHMS = ("dpo", "ddpo", "dpok")
PREFERRED = ("target", "reference")  # train.preferred: what DPO prefers over the base


# ---------------------------------------------------------------- policy and reference


def add_lora(unet, rank):
    """LoRA adapters (B = 0: the policy starts equal to the reference); returns the trainable params, in fp32."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=LORA_TARGETS))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def reference_policy(unet):
    """The UNet with its adapters disabled, for the duration of the block."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@dataclass
class Policy:
    """Everything needed to score a stored transition under the current UNet."""

    models: object  # StableDiffusion
    negative_embeds: torch.Tensor  # (1, 77, D): the empty prompt
    guidance_scale: float
    cfg: bool
    eta: float

    def transition(self, latents, timesteps, step, prompt_embeds):
        """log p(x_{t'} | x_t, c) at `step` of trajectories latents (B, T+1, C, H, W), and the noise prediction.

        Returns (log_prob (B,), noise_pred (B, C, H, W)); differentiable through the LoRA weights.
        """
        device, batch = self.models.device, latents.shape[0]
        x_t, x_next = latents[:, step].to(device), latents[:, step + 1].to(device)
        t = timesteps[step].to(device)
        noise_pred = guided_noise(
            self.models.unet,
            x_t,
            t,
            prompt_embeds,
            self.negative_embeds.expand(batch, -1, -1),
            self.guidance_scale,
            self.cfg,
        )
        _, log_prob, _ = ddim_step_with_logprob(self.models.scheduler, noise_pred, t, x_t, self.eta, prev_sample=x_next)
        return log_prob, noise_pred

    def step_mean(self, noise_pred, latents, timesteps, step):
        """SPEC section 3's mean (B, C, H, W) and std (B, 1, 1, 1) of the step from x_t, given the noise prediction."""
        x_t, t = latents[:, step].to(self.models.device), timesteps[step].to(self.models.device)
        mean, std, _ = ddim_step_mean(self.models.scheduler, noise_pred, t, x_t, self.eta)
        return mean, std

    def reference_transition(self, latents, timesteps, step, prompt_embeds):
        with torch.no_grad(), reference_policy(self.models.unet):
            return self.transition(latents, timesteps, step, prompt_embeds)

    def set_timesteps(self, num_steps):
        """The scheduler's step spacing, which `transition` uses for t' (sampling sets the same)."""
        self.models.scheduler.set_timesteps(num_steps, device=self.models.device)

    def trainable_steps(self):
        """The step indices of the spacing set last whose std is > 0: a step with std 0 (onto a final
        alpha of 1) has no log-probability and is never trained on (SPEC section 8)."""
        scheduler = self.models.scheduler
        return [j for j, t in enumerate(scheduler.timesteps) if step_std(scheduler, t.cpu(), self.eta) > 0]

    @torch.no_grad()
    def trajectory_log_probs(self, trajectories, prompt_embeds):
        """Log-probs (B, T) of every step of stored trajectories under the current policy."""
        steps = range(trajectories.timesteps.shape[0])
        self.set_timesteps(len(steps))
        return torch.stack(
            [self.transition(trajectories.latents, trajectories.timesteps, j, prompt_embeds)[0] for j in steps], dim=1
        ).cpu()


# ---------------------------------------------------------------- objectives


def clipped_ratio_stats(log_ratio, eps):
    """log of clamp(exp(log_ratio), 1 - eps, 1 + eps), and whether each ratio was clipped."""
    clipped_log_ratio = log_ratio.clamp(math.log(1 - eps), math.log(1 + eps))
    return clipped_log_ratio, clipped_log_ratio != log_ratio


def dpo_loss(log_ratio_w, log_ratio_l, noise_w, noise_ref_w, alpha, beta, eps):
    """SPEC 7's loss at one timestep of pairs (B,): preferred w = target, dispreferred l = base.

    log_ratio_*: logp_theta - logp_ref (B,); noise_w, noise_ref_w: the policy's and reference's
    noise predictions on w (B, C, H, W). Returns (loss (B,), stats).
    """
    log_r_w, clipped_w = clipped_ratio_stats(log_ratio_w, eps)
    log_r_l, clipped_l = clipped_ratio_stats(log_ratio_l, eps)
    regulariser = ((noise_w - noise_ref_w) ** 2).mean(dim=tuple(range(1, noise_w.ndim)))
    loss = -F.logsigmoid(alpha * (log_r_w - log_r_l)) + beta * regulariser
    stats = dict(
        accuracy=(log_ratio_w > log_ratio_l).float(),
        abs_log_ratio=(log_ratio_w.abs() + log_ratio_l.abs()) / 2,
        clipped=(clipped_w.float() + clipped_l.float()) / 2,
    )
    return loss, stats


def ppo_loss(log_prob, old_log_prob, advantages, eps):
    """PPO-clip loss (B,) of DDPO with ratio exp(logp_theta - logp_old) clipped to 1 +- eps."""
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))
    stats = dict(abs_log_ratio=log_ratio.abs(), clipped=((ratio - 1).abs() > eps).float())
    return loss, stats


def gaussian_kl(mean, ref_mean, std):
    """KL(N(mean, std^2) || N(ref_mean, std^2)) averaged over the latent dims: mean((mean - ref_mean)^2 / (2 std^2)).

    mean, ref_mean: (B, C, H, W); std: (B, 1, 1, 1), > 0. Returns (B,).
    """
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.ndim)))


def dpok_loss(log_prob, old_log_prob, advantages, mean, ref_mean, std, eps, kl_weight):
    """SPEC 8 (DPOK, Fan et al. 2023): DDPO's PPO-clip term plus kl_weight x the step's KL to the pretrained model.

    mean, ref_mean: the step's mean under the policy and the reference (B, C, H, W); std: (B, 1, 1, 1).
    Returns (loss (B,), stats).
    """
    loss, stats = ppo_loss(log_prob, old_log_prob, advantages, eps)
    kl = gaussian_kl(mean, ref_mean, std)
    return loss + kl_weight * kl, stats | dict(kl=kl)


def per_prompt_advantages(scores, prompts, clip, history=None, buffer_size=0, min_count=0):
    """(s - mean_p) / (std_p + 1e-6) per prompt, clipped to +-clip: (N,).

    Without `buffer_size` the statistics are those of the prompt's scores in `scores` (this epoch's).
    With it, ddpo-pytorch's per-prompt stat tracking: those of the prompt's last `buffer_size` scores
    (`history[prompt]`: its scores of earlier epochs, oldest first, then this epoch's), or of all of
    `scores` (batch-wide) while that buffer holds fewer than `min_count`.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    advantages = torch.empty_like(scores)
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        group = scores[rows]
        if buffer_size:
            buffer = torch.tensor((list((history or {}).get(prompt, [])) + group.tolist())[-buffer_size:])
            group = buffer if len(buffer) >= min_count else scores
        advantages[rows] = (scores[rows] - group.mean()) / (group.std(unbiased=False) + 1e-6)
    return advantages.clamp(-clip, clip)


def train_timesteps(steps, fraction, generator):
    """The first floor(len(steps) * fraction) of a random permutation of `steps` (step indices)."""
    steps = list(steps)
    return [steps[i] for i in torch.randperm(len(steps), generator=generator)[: int(len(steps) * fraction)].tolist()]


# ---------------------------------------------------------------- the epoch's training data


@dataclass
class PreferencePairs:
    """DPO data: pair k is (preferred[k] = target (or reference), dispreferred[k] = base), both of prompt
    prompt_embeds[k]."""

    preferred: Trajectories  # (K, T+1, C, H, W)
    dispreferred: Trajectories
    prompt_embeds: torch.Tensor  # (K, 77, D)

    def __len__(self):
        return self.prompt_embeds.shape[0]


@dataclass
class ScoredSamples:
    """DDPO data: trajectories with their old log-probs (in `trajectories.log_probs`) and advantages."""

    trajectories: Trajectories  # (N, T+1, C, H, W), log_probs (N, T) = logp_old
    prompt_embeds: torch.Tensor  # (N, 77, D)
    advantages: torch.Tensor  # (N,)

    def __len__(self):
        return self.prompt_embeds.shape[0]


# ---------------------------------------------------------------- the trainer


def require(package, setting):
    """The optional `package` that `config.<setting>` asks for, or a UserError saying how to get it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"config.{setting} is set but {package} is not installed: pip install {package}, "
            f"or set --config.{setting} False"
        ) from None


def make_optimizer(config, params):
    train = config.train
    if train.use_8bit_adam:
        optimizer_class = require("bitsandbytes", "train.use_8bit_adam").optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )


def check_train_config(config):
    """Fail at start-up on training settings that cannot work."""
    train = config.train
    if train.algorithm not in ALGORITHMS:
        raise UserError(f"config.train.algorithm = {train.algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if train.preferred not in PREFERRED:
        raise UserError(f"config.train.preferred = {train.preferred!r}; use one of {', '.join(PREFERRED)}")
    if config.sample.eta <= 0:
        raise UserError("config.sample.eta must be > 0 to train: with eta = 0 DDIM steps have no log-probability")
    if train.stat_buffer and train.stat_min_count > train.stat_buffer:
        raise UserError(
            f"config.train.stat_min_count = {train.stat_min_count} exceeds config.train.stat_buffer = "
            f"{train.stat_buffer}: the per-prompt buffer would never be used"
        )
    if not 0 < train.eps < 1:
        raise UserError(f"config.train.eps = {train.eps}: the ratio clip must lie in (0, 1)")
    if int(config.sample.num_steps * train.timestep_fraction) < 1:
        raise UserError("config.train.timestep_fraction leaves no training timestep: raise it (at most 1.0)")
    if min(train.batch_size, train.gradient_accumulation_steps, train.num_inner_epochs, train.save_interval) < 1:
        raise UserError(
            "config.train.batch_size, gradient_accumulation_steps, num_inner_epochs and save_interval must be >= 1"
        )


def check_training_inputs(config):
    """Training's start-up checks, before any model loads: settings, optional packages, resume_from."""
    check_train_config(config)
    if config.train.use_8bit_adam:
        require("bitsandbytes", "train.use_8bit_adam")
    if config.train.tensorboard:
        require("tensorboard", "train.tensorboard")
    if config.resume_from:
        find_checkpoint(config.resume_from)


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
    """The LoRA policy, its optimizer and the accelerator; `train_pairs`/`train_samples` run one epoch."""

    def __init__(self, config, models):
        check_train_config(config)
        self.config, self.models = config, models
        on_cpu = models.device.type == "cpu"
        self.accelerator = Accelerator(
            mixed_precision="no" if on_cpu else config.mixed_precision, cpu=on_cpu, device_placement=False
        )
        torch.manual_seed(config.seed)  # LoRA A's initialisation
        self.params = add_lora(models.unet, config.train.lora_rank)
        if config.train.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
        self.optimizer = self.accelerator.prepare(make_optimizer(config, self.params))
        self.policy = Policy(
            models,
            encode_prompts(models, [""]),
            config.sample.guidance_scale,
            config.train.cfg,
            config.sample.eta,
        )
        log.info(
            "LoRA rank %d: %d trainable parameters (%s, %s)",
            config.train.lora_rank,
            sum(p.numel() for p in self.params),
            config.train.algorithm,
            self.accelerator.mixed_precision,
        )

    def epoch_generator(self, epoch):
        """The generator of an epoch's shuffles and timestep subsets: a function of (seed, epoch), so resume is exact."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)

    def optimize(self, num_items, timestep_loss, epoch):
        """`num_inner_epochs` shuffled passes over items 0..num_items-1; returns the mean statistics.

        timestep_loss(item, step) -> (loss (B,), stats) for one training timestep of one item.
        """
        train = self.config.train
        generator = self.epoch_generator(epoch)
        metrics = MetricsSum()
        self.policy.set_timesteps(self.config.sample.num_steps)
        steps = self.policy.trainable_steps()
        group_size = train.batch_size * train.gradient_accumulation_steps * distributed.world_size()
        for _ in range(train.num_inner_epochs):
            order = torch.randperm(num_items, generator=generator)
            for group in order.split(group_size):
                # every process draws every item's timesteps (one random stream), then trains on its share
                item_steps = [(i, train_timesteps(steps, train.timestep_fraction, generator)) for i in group.tolist()]
                for item, steps in distributed.shard(item_steps):
                    for step in steps:
                        with self.accelerator.autocast():
                            loss, stats = timestep_loss(item, step)
                        self.accelerator.backward(loss.mean() / (len(group) * len(steps)))
                        metrics.add("loss", loss)
                        for name, values in stats.items():
                            metrics.add(name, values)
                distributed.sum_gradients(self.params)  # the group's mean gradient on every process
                self.accelerator.clip_grad_norm_(self.params, train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        metrics = MetricsSum.total(distributed.gather(metrics))
        return metrics.means() | {"lr": self.optimizer.param_groups[0]["lr"]}

    def check_steps(self, timesteps):
        """Stored trajectories must have the configured number of steps: t' depends on the spacing."""
        if len(timesteps) != self.config.sample.num_steps:
            raise UserError(
                f"the epoch's trajectories have {len(timesteps)} steps but config.sample.num_steps is "
                f"{self.config.sample.num_steps}: rerun with the sampling settings the epoch was made with"
            )

    def train_pairs(self, pairs, epoch):
        """DPO on the epoch's (target, base) pairs; returns the epoch's training metrics."""
        train = self.config.train
        timesteps = pairs.preferred.timesteps
        self.check_steps(timesteps)

        def timestep_loss(k, step):
            latents = torch.stack([pairs.preferred.latents[k], pairs.dispreferred.latents[k]])  # (2, T+1, C, H, W)
            embeds = pairs.prompt_embeds[k : k + 1].expand(2, -1, -1).to(self.models.device)
            log_prob, noise = self.policy.transition(latents, timesteps, step, embeds)
            ref_log_prob, ref_noise = self.policy.reference_transition(latents, timesteps, step, embeds)
            log_ratio = log_prob - ref_log_prob  # (2,): [w, l]
            return dpo_loss(log_ratio[:1], log_ratio[1:], noise[:1], ref_noise[:1], train.alpha, train.beta, train.eps)

        return self.optimize(len(pairs), timestep_loss, epoch)

    def train_samples(self, samples, epoch):
        """DDPO (PPO-clip), or DPOK (PPO-clip and the KL to the reference), on the epoch's scored samples;
        returns the epoch's training metrics."""
        train, policy = self.config.train, self.policy
        trajectories = samples.trajectories
        timesteps = trajectories.timesteps
        self.check_steps(timesteps)

        def timestep_loss(i, step):
            embeds = samples.prompt_embeds[i : i + 1].to(self.models.device)
            latents = trajectories.latents[i : i + 1]
            log_prob, noise = policy.transition(latents, timesteps, step, embeds)
            old_log_prob = trajectories.log_probs[i : i + 1, step].to(log_prob.device)
            advantage = samples.advantages[i : i + 1].to(log_prob.device)
            if train.algorithm == "ddpo":
                return ppo_loss(log_prob, old_log_prob, advantage, train.eps)
            _, ref_noise = policy.reference_transition(latents, timesteps, step, embeds)
            mean, std = policy.step_mean(noise, latents, timesteps, step)
            ref_mean, _ = policy.step_mean(ref_noise, latents, timesteps, step)
            return dpok_loss(log_prob, old_log_prob, advantage, mean, ref_mean, std, train.eps, train.kl_weight)

        return self.optimize(len(samples), timestep_loss, epoch)


# ---------------------------------------------------------------- the epoch's inputs from data/<exp_name>/epoch<k>/


def stack_trajectories(load, indices):
    """Stored trajectories (dicts of latents (T+1, C, H, W), log_probs (T,), timesteps (T,)) -> Trajectories."""
    stored = [load(i) for i in indices]
    return Trajectories(
        torch.stack([s["latents"] for s in stored]), torch.stack([s["log_probs"] for s in stored]), stored[0]["timesteps"]
    )


def embed_prompts(models, prompts):
    """Embeddings (N, 77, D) of a list of prompts, each distinct prompt encoded once."""
    distinct = list(dict.fromkeys(prompts))
    table = encode_prompts(models, distinct)
    return table[[distinct.index(p) for p in prompts]]


def complete_scores(image_set, count):
    scores = image_set.read_scores()
    if len(scores) != count:
        raise UserError(
            f"{image_set.scores_file} holds {len(scores)} of {count} scores: the epoch was not scored to the end"
        )
    return scores


def load_pairs(models, epoch_dir, preferred="target"):
    """The epoch's (target, base) pairs, from eval/injected_map.json and both trajectory folders; with
    preferred = "reference", the (reference, base) pairs instead (the paper's visually inconsistent
    baseline: an ordinary well-aligned sample preferred over a poorly aligned one)."""
    pairs = epoch_dir.read_injected_map()  # [(base index, reference index)] in target order
    prompts = epoch_dir.injected.published_prompts()
    if not pairs or len(prompts) != len(pairs):
        raise UserError(
            f"{epoch_dir.root}: {len(prompts)} targets published for {len(pairs)} pairs; "
            "the fusion stage did not finish, rerun to complete it"
        )
    if preferred == "target":
        winners = stack_trajectories(epoch_dir.load_injected_trajectory, range(len(pairs)))
    else:
        winners = stack_trajectories(epoch_dir.load_trajectory, [reference for _, reference in pairs])
    return PreferencePairs(
        winners,
        stack_trajectories(epoch_dir.load_trajectory, [base for base, _ in pairs]),
        embed_prompts(models, prompts),
    )


def scored_prompts(epoch_dir):
    """(prompts, scores) of the epoch's samples, then its targets: DDPO's and DPOK's training samples."""
    sample_prompts, target_prompts = epoch_dir.sampled.published_prompts(), epoch_dir.injected.published_prompts()
    scores = complete_scores(epoch_dir.sampled, len(sample_prompts)) + complete_scores(
        epoch_dir.injected, len(target_prompts)
    )
    return sample_prompts + target_prompts, scores


def score_history(experiment, epoch):
    """{prompt: its training samples' scores in the epochs before `epoch`, oldest first}: the per-prompt
    stat tracker's buffers, read back from the experiment (nothing to checkpoint)."""
    history = {}
    for k in experiment.epochs():
        if k < epoch:
            for prompt, score in zip(*scored_prompts(experiment.epoch(k))):
                history.setdefault(prompt, []).append(score)
    return history


def advantages_of(config, experiment, epoch, prompts, scores):
    """Per-prompt advantages (N,): this epoch's statistics, or with `train.stat_buffer` the tracked ones."""
    train = config.train
    history = score_history(experiment, epoch) if train.stat_buffer else None
    return per_prompt_advantages(scores, prompts, train.adv_clip_max, history, train.stat_buffer, train.stat_min_count)


def load_scored_samples(trainer, experiment, epoch):
    """The epoch's samples and targets with advantages; the targets' old log-probs recomputed without fusion,
    in batches of `sample.batch_size` and under the training's autocast (so that ratios start at 1)."""
    policy, config, epoch_dir = trainer.policy, trainer.config, experiment.epoch(epoch)
    sample_prompts, target_prompts = epoch_dir.sampled.published_prompts(), epoch_dir.injected.published_prompts()
    samples = stack_trajectories(epoch_dir.load_trajectory, range(len(sample_prompts)))
    targets = stack_trajectories(epoch_dir.load_injected_trajectory, range(len(target_prompts)))
    target_embeds = embed_prompts(policy.models, target_prompts)
    # each process recomputes its share of the targets
    rows = distributed.shard(range(len(target_prompts)))
    batches = [rows[i : i + config.sample.batch_size] for i in range(0, len(rows), config.sample.batch_size)]
    with trainer.accelerator.autocast():
        share = [policy.trajectory_log_probs(targets[batch], target_embeds[batch]) for batch in batches]
    targets.log_probs = torch.cat([log_probs for part in distributed.gather(share) for log_probs in part])
    prompts, scores = scored_prompts(epoch_dir)
    return ScoredSamples(
        Trajectories.cat([samples, targets]),
        torch.cat([embed_prompts(policy.models, sample_prompts), target_embeds]),
        advantages_of(config, experiment, epoch, prompts, scores),
    )


# ---------------------------------------------------------------- the loop's training stage


def mean_score(image_set):
    scores = image_set.read_scores()
    return sum(scores) / len(scores) if scores else None


def tensorboard_writer(config, experiment):
    if not config.train.tensorboard:
        return None
    require("tensorboard", "train.tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(experiment.tensorboard_dir)


class TrainingStage:
    """Set up before the epoch loop (LoRA, optimizer, resume); `train_epoch` is the epoch's last stage."""

    def __init__(self, config, models, experiment):
        self.config, self.experiment = config, experiment
        self.trainer = Trainer(config, models)
        self.first_epoch = resume(self.trainer, config, experiment)
        self.tensorboard = tensorboard_writer(config, experiment) if distributed.is_main() else None

    def train_epoch(self, epoch):
        """Train on the epoch's pairs (DPO) or scored samples (DDPO, DPOK), record the metrics, checkpoint."""
        epoch_dir, trainer = self.experiment.epoch(epoch), self.trainer
        if self.config.train.algorithm == "dpo":
            pairs = load_pairs(trainer.models, epoch_dir, self.config.train.preferred)
            metrics = trainer.train_pairs(pairs, epoch)
        else:
            samples = load_scored_samples(trainer, self.experiment, epoch)
            metrics = trainer.train_samples(samples, epoch)
        metrics = dict(epoch=epoch, **metrics)
        metrics.update(sample_score=mean_score(epoch_dir.sampled), target_score=mean_score(epoch_dir.injected))
        distributed.on_main(self.record, metrics)
        save_epoch_checkpoint(trainer, self.experiment, epoch)
        return metrics

    def record(self, metrics):
        """metrics.jsonl, the log and tensorboard (the main process's job)."""
        self.experiment.record_metrics(metrics)
        values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None)
        log.info("epoch %d training: %s", metrics["epoch"], values)
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if name != "epoch" and value is not None:
                    self.tensorboard.add_scalar(f"train/{name}", value, metrics["epoch"])
            self.tensorboard.flush()
