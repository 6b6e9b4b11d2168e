"""SD 3 / 3.5: the tiny model loads as SD 3.5 does; prompts and sampling equal StableDiffusion3Pipeline's."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from d_fusion.sampling import SamplerSettings, decode_images, sample_generators, sample_trajectories
from d_fusion.sd3 import encode_sd3_prompts, load_sd3_models
from d_fusion.tiny import build_tiny_sd3
from tests.test_sampling import assert_regenerates_alone_and_in_any_batch

PROMPT = "a cat playing chess"
STEPS = 4


def flow_sampler(noise_level=0.7, guidance_scale=5.0, num_steps=STEPS):
    """SamplerSettings of SD 3's flow step (eta is not read)."""
    return SamplerSettings(num_steps, 1.0, guidance_scale, True, noise_level)


def sample(models, indices, prompts=None, noise_level=0.7, guidance_scale=5.0):
    """The loop's sampling (`sampling.sample_trajectories`, the family's flow step) of `indices`."""
    prompts = prompts or [PROMPT] * len(indices)
    return sample_trajectories(
        models,
        encode_sd3_prompts(models, prompts),
        encode_sd3_prompts(models, [""]),
        sample_generators(42, 0, 8, indices),
        flow_sampler(noise_level, guidance_scale),
        progress=False,
    )


def test_tiny_sd3_is_an_sd35_folder(tiny_sd3_dir, tiny_sd3):
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    config = pipeline.transformer.config
    assert config.dual_attention_layers and config.qk_norm == "rms_norm"
    assert pipeline.vae.config.latent_channels == 16 and pipeline.text_encoder_3 is None
    assert tiny_sd3.text_encoder_3 is None and tiny_sd3.latent_shape == (16, 16, 16)
    for name, ours in tiny_sd3.transformer.state_dict().items():
        assert torch.equal(ours, pipeline.transformer.state_dict()[name])


def test_prompt_encoding_equals_the_pipelines(tiny_sd3):
    prompts = [PROMPT, "a red circle and a blue square"]
    theirs = tiny_sd3.pipeline().encode_prompt(prompts, None, None, device=tiny_sd3.device)
    ours, negative = encode_sd3_prompts(tiny_sd3, prompts), encode_sd3_prompts(tiny_sd3, [""])
    assert ours.embeds.shape == (2, 77 + 256, 96) and ours.pooled.shape == (2, 32 + 48)
    assert torch.equal(ours.embeds[:, :, 80:], torch.zeros(2, 77 + 256, 16))  # CLIP zero-padded to T5's width
    assert torch.equal(ours.embeds[:, 77:], torch.zeros(2, 256, 96))  # T5 left out
    torch.testing.assert_close(ours.embeds, theirs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pooled, theirs[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(negative.embeds.expand(2, -1, -1), theirs[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(negative.pooled.expand(2, -1), theirs[3], atol=1e-6, rtol=0)


def test_trajectory_shapes_and_ends(tiny_sd3):
    trajectories = sample(tiny_sd3, [0, 1])
    assert trajectories.latents.shape == (2, STEPS + 1) + tiny_sd3.latent_shape
    assert trajectories.log_probs.shape == (2, STEPS) and torch.isfinite(trajectories.log_probs).all()
    assert trajectories.timesteps[0] == 1000 and trajectories.timesteps.dtype == torch.float32
    assert trajectories.timesteps.tolist() == sorted(trajectories.timesteps.tolist(), reverse=True)


def test_a_sample_regenerates_alone_and_in_any_batch(tiny_sd3):
    assert_regenerates_alone_and_in_any_batch(lambda indices, prompts=None: sample(tiny_sd3, indices, prompts))


def test_noise_level_zero_equals_the_pipeline(tiny_sd3):
    theirs = tiny_sd3.pipeline()(
        [PROMPT] * 2,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=sample_generators(42, 0, 8, [0, 1]),
        output_type="latent",
    ).images
    ours = sample(tiny_sd3, [0, 1], noise_level=0.0).latents[:, -1]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    assert not torch.allclose(ours, sample(tiny_sd3, [0, 1]).latents[:, -1], atol=1e-3)  # noise level 0.7 differs


def test_decoded_images_equal_the_pipelines(tiny_sd3):
    latents = sample(tiny_sd3, [0], noise_level=0.0).latents[:, -1]
    theirs = tiny_sd3.pipeline()(
        [PROMPT], num_inference_steps=STEPS, guidance_scale=5.0, generator=sample_generators(42, 0, 8, [0]),
        output_type="np",
    ).images  # (1, H, W, 3) in [0, 1]
    ours = decode_images(tiny_sd3, latents)
    assert ours.shape == (1, tiny_sd3.resolution, tiny_sd3.resolution, 3)
    assert abs(ours / 255.0 - theirs).max() <= 0.5 / 255 + 1e-4


@pytest.fixture(scope="module")
def tiny_sd3_t5_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_sd3_t5") / "sd3")
    build_tiny_sd3(folder, t5=True)
    return folder


def test_with_t5_prompts_and_sampling_equal_the_pipelines(tiny_sd3_t5_dir):
    models = load_sd3_models(tiny_sd3_t5_dir, mixed_precision="no")
    assert models.text_encoder_3 is not None
    prompts = [PROMPT, "a red circle and a blue square"]
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_t5_dir)
    with torch.no_grad():  # as in the pipeline's __call__ (T5 takes another kernel path with gradients)
        theirs = pipeline.encode_prompt(prompts, None, None, device=models.device)
    ours, negative = encode_sd3_prompts(models, prompts), encode_sd3_prompts(models, [""])
    assert ours.embeds[:, 77:].abs().sum() > 0  # T5's tokens
    for mine, their in zip((ours.embeds, negative.embeds, ours.pooled, negative.pooled), theirs):
        torch.testing.assert_close(mine.expand_as(their), their, atol=1e-6, rtol=0)
    latents = pipeline(prompts, num_inference_steps=STEPS, guidance_scale=5.0, generator=sample_generators(42, 0, 8, [0, 1]),
                       output_type="latent").images
    torch.testing.assert_close(sample(models, [0, 1], prompts, noise_level=0.0).latents[:, -1], latents, atol=1e-5, rtol=0)
    without = load_sd3_models(tiny_sd3_t5_dir, mixed_precision="no", t5=False)
    assert without.text_encoder_3 is None and encode_sd3_prompts(without, prompts).embeds[:, 77:].abs().sum() == 0
