"""Model families: each family's tiny model, loaded as its real one, samples as its diffusers pipeline does,
trains, saves LoRA its stock pipeline loads, numbers its blocks as fusion expects, and runs the whole loop."""

import os

import pytest
import torch

from d_fusion.attention import attention_layers, block_parts
from d_fusion.checkpoints import save_checkpoint
from d_fusion.datadir import ExperimentDir, write_json
from d_fusion.errors import UserError
from d_fusion.experiment import run_experiment
from d_fusion.heldout import run_heldout
from d_fusion.models import load_models
from d_fusion.sampling import SamplerSettings, encode_prompts, negative_conditioning, sample_generators, sample_trajectories
from d_fusion.stages import fusion_settings, make_trainer
from d_fusion.trainer import PreferencePairs

PROMPT = "a cat playing chess"
STEPS = 4
FAMILIES = ["sd15", "sd21v", "sdxl"]  # the tiny models of tests/conftest.py's tiny_dir besides "sd"


def load(tiny_dir, name):
    return load_models(os.path.join(tiny_dir, name), mixed_precision="no")


def sample(models, indices):
    return sample_trajectories(
        models, encode_prompts(models, [PROMPT] * len(indices)), negative_conditioning(models),
        sample_generators(42, 0, 8, indices), SamplerSettings(STEPS, 1.0, 5.0), progress=False,
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_equals_the_familys_diffusers_pipeline(tiny_dir, name):
    models = load(tiny_dir, name)
    theirs = models.pipeline()(
        [PROMPT] * 2, num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0,
        generator=sample_generators(42, 0, 8, [0, 1]), output_type="latent",
    ).images
    ours = sample(models, [0, 1]).latents[:, -1]
    scale = max(1.0, theirs.abs().max().item())  # early steps of a random model amplify latents
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5 * scale, rtol=0)


def test_sdxl_conditioning_is_the_pipelines(tiny_dir):
    models = load(tiny_dir, "sdxl")
    embeds, negative_embeds, pooled, negative_pooled = models.pipeline().encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    ours, negative = encode_prompts(models, [PROMPT]), negative_conditioning(models)
    assert models.family.name == "sdxl" and ours.embeds.shape == (1, 77, 64) and ours.pooled.shape == (1, 32)
    torch.testing.assert_close(ours.embeds, embeds, atol=0, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=0, rtol=0)
    assert not negative.embeds.any() and not negative.pooled.any()  # force_zeros_for_empty_prompt
    assert not negative_embeds.any() and not negative_pooled.any()
    assert ours.time_ids.tolist() == [[128, 128, 0, 0, 128, 128]]  # uncropped, at the model's own size


@pytest.mark.parametrize("name", ["sd21v", "sdxl"])
def test_training_log_probs_rescore_the_sampled_ones_and_a_dpo_step_learns(tiny_dir, tiny_config, name):
    models = load(tiny_dir, name)
    tiny_config.sample.num_steps = STEPS
    tiny_config.train.learning_rate = 1e-3
    trajectories = sample(models, [0, 1])
    conditioning = encode_prompts(models, [PROMPT]).expand(2)
    trainer = make_trainer(tiny_config, models)
    rescored = trainer.policy.trajectory_log_probs(trajectories, conditioning)
    torch.testing.assert_close(rescored, trajectories.log_probs, atol=1e-4, rtol=0)
    pairs = PreferencePairs(trajectories[0:1], trajectories[1:2], conditioning[:1])
    metrics = trainer.train_pairs(pairs, epoch=0)
    assert metrics["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # at init every ratio is 1
    after = trainer.policy.trajectory_log_probs(trajectories, conditioning) - trajectories.log_probs
    assert (after[0] - after[1]).mean() > 0  # the preferred trajectory gained on the dispreferred one


def test_sdxl_lora_checkpoint_loads_in_the_stock_sdxl_pipeline(tiny_dir, tiny_config):
    from diffusers import StableDiffusionXLPipeline

    models = load(tiny_dir, "sdxl")
    tiny_config.sample.num_steps, tiny_config.train.learning_rate = STEPS, 1e-3
    trainer = make_trainer(tiny_config, models)
    trajectories, conditioning = sample(models, [0, 1]), encode_prompts(models, [PROMPT])
    trainer.train_pairs(PreferencePairs(trajectories[0:1], trajectories[1:2], conditioning), epoch=0)
    checkpoint = save_checkpoint(trainer, ExperimentDir(tiny_config.save_path, "sdxl"), 0)

    pipeline = StableDiffusionXLPipeline.from_pretrained(os.path.join(tiny_dir, "sdxl"))
    pipeline.load_lora_weights(checkpoint.root)
    latents = torch.randn(1, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    kwargs = conditioning.unet_kwargs(torch.float32)
    with torch.no_grad():
        ours = models.unet(latents, 500, **kwargs).sample
        stock = pipeline.unet(latents, 500, **kwargs).sample
        models.unet.disable_adapters()
        plain = models.unet(latents, 500, **kwargs).sample
    torch.testing.assert_close(stock, ours, atol=1e-6, rtol=0)
    assert not torch.allclose(plain, ours, atol=1e-6)  # the LoRA was trained


def test_sdxl_blocks_and_the_default_fusion_range(tiny_dir, tiny_config):
    models = load(tiny_dir, "sdxl")
    layers = attention_layers(models.unet)
    # the first down block has no attention and gets no number: down 0-1, mid 2, up 3-4
    assert block_parts(layers) == {"down": (0, 1), "mid": (2, 2), "up": (3, 4)}
    assert {layer.block for layer in layers if layer.mask_layer} == {1, 2, 3}  # latent side // 4
    injection = fusion_settings(tiny_config, models).injection  # the default "mid-up"
    assert [b for b in range(5) if injection.blends_k(5, tiny_config.sample.num_steps, b)] == [2, 3, 4]
    tiny_config.inject_l = "3-6,3-6,3-6,3-6,3-6,"  # the release's numbers are SD 2.1's
    with pytest.raises(UserError, match="goes beyond this UNet's blocks 0-4"):
        fusion_settings(tiny_config, models)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_whole_loop_runs_on_each_family(tiny_dir, tiny_config, name):
    config = tiny_config
    config.pretrained.model = os.path.join(tiny_dir, name)
    config.exp_name = f"loop_{name}"
    config.prompt_file, config.item_idx_file, config.prompt = "", "", PROMPT  # objects: words 1 and 3
    config.sample.num_steps, config.inject_t = 3, "0-2,0-2,0-2,0-2,0-2,"
    config.train.num_epochs, config.report.each_epoch, config.report.thumbnail = 1, True, 64
    run_experiment(config)
    experiment = ExperimentDir(config.save_path, config.exp_name)
    epoch = experiment.epoch(0)
    assert len(epoch.sampled.read_scores()) == 4 and len(epoch.injected.read_scores()) == 2
    targets = epoch.injected.load_trajectories([0, 1])
    assert targets.latents.shape[1] == 4 and torch.isfinite(targets.log_probs).all()
    assert experiment.checkpoint(0).is_checkpoint() and experiment.read_metrics()[0]["epoch"] == 0
    assert os.path.isfile(experiment.report.index_html)
    # held-out: the base model against the checkpoint, on the same seeds
    prompt_file = os.path.join(config.save_path, "heldout.json")
    write_json(prompt_file, ["a dog eating a sandwich"])
    config.heldout.prompt_file, config.heldout.checkpoint = prompt_file, experiment.checkpoints
    config.heldout.images_per_prompt = 2
    rows = run_heldout(config)
    assert [row["images"] for row in rows] == [2, 2] and "clip: checkpoint_0 - base" in rows[-1]
