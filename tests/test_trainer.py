"""The trainer (docs/METHOD.md §7, §8): LoRA policy vs reference, log-prob recomputation, one step of each
algorithm, DPOK's KL and ratio at initialisation."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from d_fusion.errors import UserError
from d_fusion.families import Conditioning
from d_fusion.models import load_models
from d_fusion.objectives import dpo_loss
from d_fusion.sampling import (
    SamplerSettings,
    Trajectories,
    encode_prompts,
    guided_noise,
    sample_generators,
    sample_trajectories,
)
from d_fusion.stages import check_training_inputs, make_trainer
from d_fusion.trainer import (
    PreferencePairs,
    ScoredSamples,
    add_lora,
    reference_policy,
    train_timesteps,
)

NUM_STEPS = 4


def small(config):
    config.sample.num_steps = NUM_STEPS
    config.train.num_inner_epochs = 1
    return config


def sample(models, prompt, indices, epoch=0):
    """Trajectories of `prompt` for sample indices, and the prompt's embeddings (B, 77, D)."""
    embeds = encode_prompts(models, [prompt]).expand(len(indices))
    negative = encode_prompts(models, [""]).expand(len(indices))
    generators = sample_generators(0, epoch, 8, indices)
    trajectories = sample_trajectories(models, embeds, negative, generators, SamplerSettings(NUM_STEPS, 1.0, 5.0, True), progress=False)
    return trajectories, embeds


def log_ratios(trainer, trajectories, embeds):
    """logp_theta - logp_ref (B, T) of every step."""
    policy = trainer.policy
    with reference_policy(trainer.models.unet):
        reference = policy.trajectory_log_probs(trajectories, embeds)
    return policy.trajectory_log_probs(trajectories, embeds) - reference


def test_train_timesteps_are_a_random_subset():
    generator = torch.Generator().manual_seed(0)
    steps = train_timesteps(range(10), 0.55, generator)
    assert len(steps) == 5 and len(set(steps)) == 5 and all(0 <= s < 10 for s in steps)
    assert steps != train_timesteps(range(10), 0.55, generator)
    assert set(train_timesteps([1, 4, 7], 1.0, generator)) == {1, 4, 7}


def test_initial_policy_is_the_reference_and_recomputation_matches_sampling(fresh_tiny_sd, tiny_config):
    trajectories, embeds = sample(fresh_tiny_sd, "a cat playing chess", [0, 1])
    trainer = make_trainer(small(tiny_config), fresh_tiny_sd)
    assert torch.equal(log_ratios(trainer, trajectories, embeds), torch.zeros(2, NUM_STEPS))
    # one trajectory at a time, not in its sampling batch
    recomputed = torch.cat([trainer.policy.trajectory_log_probs(trajectories[i : i + 1], embeds[:1]) for i in range(2)])
    torch.testing.assert_close(recomputed, trajectories.log_probs, atol=1e-5, rtol=0)


def test_one_dpo_step_prefers_the_target_and_changes_only_lora(fresh_tiny_sd, tiny_config):
    trajectories, embeds = sample(fresh_tiny_sd, "a cat playing chess", [0, 1])
    config = small(tiny_config)
    config.train.learning_rate = 1e-3
    config.train.eps = 0.5  # no clipping in one step
    trainer = make_trainer(config, fresh_tiny_sd)
    frozen = {k: v.clone() for k, v in fresh_tiny_sd.unet.state_dict().items() if "lora" not in k}
    lora = [p.detach().clone() for p in trainer.params]

    metrics = trainer.train_pairs(PreferencePairs(trajectories[0:1], trajectories[1:2], embeds[:1]), epoch=0)

    ratios = log_ratios(trainer, trajectories, embeds)
    assert (ratios[0] - ratios[1]).mean() > 0  # logp(target) - logp(base) rose relative to the reference
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)  # at init every ratio is 1
    after = fresh_tiny_sd.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.params, lora))


def test_one_ddpo_step_raises_the_log_prob_of_a_positive_advantage(fresh_tiny_sd, tiny_config):
    trajectories, embeds = sample(fresh_tiny_sd, "a cat playing chess", [0])
    config = small(tiny_config)
    config.train.algorithm = "ddpo"
    config.train.learning_rate = 1e-3
    config.train.eps = 0.5
    trainer = make_trainer(config, fresh_tiny_sd)
    trainer.train_samples(ScoredSamples(trajectories, embeds, torch.tensor([1.0])), epoch=0)
    assert log_ratios(trainer, trajectories, embeds).mean() > 0


def test_steps_with_std_0_are_never_trained_on(fresh_tiny_sd, tiny_config):
    # a final alpha of 1 makes the last step deterministic: std 0, no log-probability
    fresh_tiny_sd.scheduler = DDIMScheduler.from_config(fresh_tiny_sd.scheduler.config, set_alpha_to_one=True)
    trajectories, embeds = sample(fresh_tiny_sd, "a cat playing chess", [0, 1])
    assert torch.isnan(trajectories.log_probs[:, -1]).all() and torch.isfinite(trajectories.log_probs[:, :-1]).all()
    config = small(tiny_config)
    config.train.learning_rate = 1e-3
    trainer = make_trainer(config, fresh_tiny_sd)
    assert trainer.policy.trainable_steps() == list(range(NUM_STEPS - 1))
    metrics = trainer.train_pairs(PreferencePairs(trajectories[0:1], trajectories[1:2], embeds[:1]), epoch=0)
    assert math.isfinite(metrics["loss"]) and all(torch.isfinite(p).all() for p in trainer.params)


def dpok_trainer(models, config, learning_rate=1e-3):
    config = small(config)
    config.train.algorithm, config.train.kl_weight = "dpok", 1.0
    config.train.learning_rate, config.train.eps = learning_rate, 0.5
    return make_trainer(config, models)


def test_dpok_at_initialisation_kl_is_0_and_every_ratio_is_1(fresh_tiny_sd, tiny_config):
    trajectories, embeds = sample(fresh_tiny_sd, "a cat playing chess", [0, 1])
    tiny_config.train.gradient_accumulation_steps = 2  # one optimizer step, after every timestep's loss
    tiny_config.train.compute_batch_size = 1  # one row per UNet call, as logp_old is recomputed below
    trainer = dpok_trainer(fresh_tiny_sd, tiny_config)
    # logp_old as training recomputes it (one trajectory at a time), so that the ratio is exactly 1
    policy = trainer.policy
    one_by_one = [policy.trajectory_log_probs(trajectories[i : i + 1], embeds[:1]) for i in range(2)]
    trajectories.log_probs = torch.cat(one_by_one)
    advantages = torch.tensor([1.0, -0.5])
    metrics = trainer.train_samples(ScoredSamples(trajectories, embeds, advantages), epoch=0)
    assert metrics["kl"] == 0 and metrics["abs_log_ratio"] == 0 and metrics["clipped"] == 0
    assert metrics["loss"] == pytest.approx(-advantages.mean().item(), abs=1e-7)  # -A x ratio 1, KL 0


def test_one_dpok_step_raises_the_log_prob_of_a_positive_advantage(fresh_tiny_sd, tiny_config):
    trajectories, embeds = sample(fresh_tiny_sd, "a cat playing chess", [0])
    trainer = dpok_trainer(fresh_tiny_sd, tiny_config)
    before = trainer.policy.trajectory_log_probs(trajectories, embeds)
    trainer.train_samples(ScoredSamples(trajectories, embeds, torch.tensor([1.0])), epoch=0)
    assert (trainer.policy.trajectory_log_probs(trajectories, embeds) - before).mean() > 0
    assert log_ratios(trainer, trajectories, embeds).abs().max() > 0  # away from the reference: the KL is > 0 now


def test_bad_training_config_is_a_user_error(fresh_tiny_sd, tiny_config):
    tiny_config.train.algorithm = "ppo"
    with pytest.raises(UserError, match="algorithm"):
        make_trainer(tiny_config, fresh_tiny_sd)
    tiny_config.train.algorithm = "dpo"
    tiny_config.sample.eta = 0.0
    with pytest.raises(UserError, match="eta"):
        make_trainer(tiny_config, fresh_tiny_sd)
    tiny_config.sample.eta = 1.0
    tiny_config.train.algorithm, tiny_config.train.stat_buffer, tiny_config.train.stat_min_count = "dpok", 8, 16
    with pytest.raises(UserError, match="stat_min_count = 16 exceeds config.train.stat_buffer = 8"):
        check_training_inputs(tiny_config)
    tiny_config.train.stat_buffer = 0  # off: stat_min_count is not read
    check_training_inputs(tiny_config)
    tiny_config.train.save_interval = 0
    with pytest.raises(UserError, match="save_interval"):
        check_training_inputs(tiny_config)
    tiny_config.train.save_interval = 1
    tiny_config.resume_from = tiny_config.save_path + "/no-such-checkpoints"
    with pytest.raises(UserError, match="resume_from"):
        check_training_inputs(tiny_config)  # at start-up, before the models load


def test_8bit_adam_without_bitsandbytes_says_so(fresh_tiny_sd, tiny_config):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    tiny_config.train.use_8bit_adam = True
    with pytest.raises(UserError, match="bitsandbytes"):
        make_trainer(tiny_config, fresh_tiny_sd)


def test_gradient_checkpointing_gives_the_same_lora_gradients(fresh_tiny_sd):
    unet = fresh_tiny_sd.unet
    params = add_lora(unet, rank=4, seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)  # B != 0: gradients reach every LoRA matrix
    embeds, negative = encode_prompts(fresh_tiny_sd, ["a cat"]), encode_prompts(fresh_tiny_sd, [""])
    latents = torch.randn(1, *fresh_tiny_sd.latent_shape, generator=torch.Generator().manual_seed(0))
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        for p in params:
            p.grad = None
        guided_noise(unet, latents, 500, embeds, negative, 5.0).square().mean().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in params]))
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-6, rtol=1e-5)


def pairs_of(models, prompt, count):
    """`count` (preferred, dispreferred) pairs of one prompt, sampled."""
    trajectories, embeds = sample(models, prompt, list(range(2 * count)))
    return PreferencePairs(trajectories[:count], trajectories[count:], embeds[:count])


def batched(config, algorithm="dpo", beta=0.0):
    """3 items x 2 timesteps in one optimizer step (batch 2 x accumulation 2), 2 inner epochs."""
    config = small(config)
    config.train.algorithm, config.train.beta = algorithm, beta
    config.train.batch_size, config.train.gradient_accumulation_steps = 2, 2
    config.train.timestep_fraction, config.train.num_inner_epochs = 0.5, 2
    config.train.learning_rate, config.train.eps = 1e-3, 0.5
    return config


def perturb(trainer):
    """LoRA B != 0: the policy differs from the reference, and gradients reach every LoRA matrix."""
    with torch.no_grad():
        for i, p in enumerate(trainer.params):
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))


def test_the_plan_draws_what_the_one_item_loop_drew(fresh_tiny_sd, tiny_config):
    trainer = make_trainer(batched(tiny_config), fresh_tiny_sd)
    plan = trainer.epoch_plan(3, epoch=5)
    generator, steps = trainer.epoch_generator(5), trainer.policy.trainable_steps()
    expected = []
    for _ in range(2):  # inner epochs: a shuffle, then each item's timesteps in shuffled order
        item_steps = [(i, train_timesteps(steps, 0.5, generator)) for i in torch.randperm(3, generator=generator).tolist()]
        expected.append([(i, s[j]) for j in range(2) for i, s in item_steps])
    assert [step.rows for step in plan] == expected and [step.group_rows for step in plan] == [6, 6]


def in_float64(trainer, conditioning):
    """The trainer's UNet (LoRA included) and the text conditioning in float64: UNet calls of other batch
    sizes then agree to ~1e-15, where fp32 kernels of this random model differ by ~1e-5 of the gradient."""
    trainer.models.unet.to(torch.float64)
    trainer.policy.negative = Conditioning(trainer.policy.negative.embeds.double())
    return Conditioning(conditioning.embeds.double())


@pytest.mark.parametrize("algorithm", ["dpo", "ddpo"])
def test_a_batched_step_has_the_gradient_of_one_row_at_a_time(fresh_tiny_sd, tiny_config, algorithm):
    config = batched(tiny_config, algorithm)
    config.train.max_grad_norm = 1e9  # the raw gradient
    pairs = pairs_of(fresh_tiny_sd, "a cat playing chess", 3)
    trainer = make_trainer(config, fresh_tiny_sd)
    perturb(trainer)
    pairs.conditioning = in_float64(trainer, pairs.conditioning)
    samples = ScoredSamples(
        Trajectories.cat([pairs.preferred, pairs.dispreferred]), Conditioning.cat([pairs.conditioning] * 2), torch.linspace(-1, 1, 6)
    )
    gradients = []
    trainer.optimizer.step = lambda: gradients.append(torch.cat([p.grad.flatten() for p in trainer.params]))
    for size in (1, 4):  # one row per UNet call (the old loop), then rows of several items and timesteps
        config.train.compute_batch_size = size
        trainer.train_pairs(pairs, epoch=0) if algorithm == "dpo" else trainer.train_samples(samples, epoch=0)
    half = len(gradients) // 2
    for ours, one_row in zip(gradients[half:], gradients[:half]):
        assert one_row.abs().max() > 0
        assert (ours - one_row).norm() <= 1e-12 * one_row.norm()


def one_row_at_a_time(trainer, pairs, epoch):
    """The oracle, the trainer's loop before batching: the epoch's plan trained row by row, each row's
    reference computed with it (bench/bench_epoch.py times it as today's training)."""
    train, policy, metrics = trainer.train, trainer.policy, {}
    for step in trainer.epoch_plan(len(pairs), epoch):
        for item, j in step.rows:
            latents = torch.stack([pairs.preferred.latents[item], pairs.dispreferred.latents[item]])  # (2, T+1, C, H, W)
            rows = latents, pairs.preferred.timesteps, j, pairs.conditioning[item : item + 1].expand(2)
            with trainer.accelerator.autocast():
                log_prob, noise = policy.transition(*rows)
                ref_log_prob, ref_noise = policy.reference_transition(*rows)
                log_ratio = log_prob - ref_log_prob
                loss, stats = dpo_loss(log_ratio[:1], log_ratio[1:], noise[:1], ref_noise[:1], train.alpha, train.beta, train.eps)
            trainer.accelerator.backward(loss.sum() / step.group_rows)
            for name, value in dict(loss=loss, **stats).items():
                metrics.setdefault(name, []).append(value.item())
        trainer.accelerator.clip_grad_norm_(trainer.params, train.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return {name: sum(values) / len(values) for name, values in metrics.items()}


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_an_epoch_with_batches_and_cached_references_equals_the_one_row_oracle(fresh_tiny_sd, tiny_dir, tiny_config, beta):
    config = batched(tiny_config, beta=beta)
    config.train.compute_batch_size = 4
    pairs = pairs_of(fresh_tiny_sd, "a cat playing chess", 3)
    trainers = [make_trainer(config, models) for models in (fresh_tiny_sd, load_models(f"{tiny_dir}/sd", mixed_precision="no"))]
    for trainer in trainers:
        perturb(trainer)
        lora = [p.detach().double() for p in trainer.params]
        conditioning = in_float64(trainer, pairs.conditioning)
    pairs.conditioning = conditioning
    metrics = trainers[0].train_pairs(pairs, epoch=0)
    expected = one_row_at_a_time(trainers[1], pairs, epoch=0)
    assert {name: metrics[name] for name in expected} == pytest.approx(expected, rel=1e-6, abs=1e-9)  # the DDIM step is fp32
    moved = 0
    for ours, oracle, start in zip(*(t.params for t in trainers), lora):
        torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-14)
        moved += not torch.equal(oracle, start)
    assert moved == len(lora)  # 2 AdamW steps moved every LoRA matrix
