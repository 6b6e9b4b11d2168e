"""SD 3 / 3.5: our flow sampler vs StableDiffusion3Pipeline, fusion vs a three-pass loop, one DPO step.

    python bench/bench_sd3.py                                  # tiny SD 3.5, CPU, 1 thread
    python bench/bench_sd3.py --size sd35m --resolution 1024   # SD 3.5 Medium's architecture, GPU, fp16

`sd35m` is SD 3.5 Medium's transformer, CLIP-L/G text encoders and VAE with random weights (no
download; T5 left out, its tokens zeros, as the pipeline allows: the transformer's cost is the
same). Runs alternate in one process; medians after a warm-up.

- sampling (noise level 0, so the pipeline makes the same latents; the script checks it): ours
  records every latent and log-prob; the pipeline gives latents (goal: ratio <= 1.05);
- fusion: ours, per step one pass over the distinct references (each guides two targets) and one
  over the targets (1.5 transformer passes per target), vs the release's way, per target its
  reference, its base and the target (3 passes), batched like ours (goal: ratio <= 0.55);
- one DPO step: one (target, base) pair at one timestep, the LoRA policy's CFG forward with
  gradients and the reference's (adapters off) on both, backward, grad clip, AdamW: time and peak memory.
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402

from bench.bench_train import peak_memory  # noqa: E402
from bench.common import alternate, parse_args  # noqa: E402
from d_fusion.masks import PromptObjects, item_selection  # noqa: E402
from d_fusion.fusion import FusionBatch, FusionSettings  # noqa: E402
from d_fusion.injection import parse_injection  # noqa: E402
from d_fusion.sampling import SamplerSettings, sample_generators, sample_trajectories  # noqa: E402
from d_fusion.sd3 import StableDiffusion3, encode_sd3_prompts, load_sd3_models  # noqa: E402
from d_fusion.sd3_fusion import fused_flow_sampling  # noqa: E402
from d_fusion.trainer import Policy, add_model_lora  # noqa: E402
from d_fusion.tiny import SD3_SCHEDULER, build_tiny_sd3, build_tokenizer  # noqa: E402
from d_fusion.objectives import dpo_loss  # noqa: E402

PROMPT = "a dog driving a car"
OBJECTS = {PROMPT: PromptObjects((1, 4), (0.003, 0.003))}

# stabilityai/stable-diffusion-3.5-medium: transformer/, vae/, text_encoder/, text_encoder_2/ configs
SD35M_TRANSFORMER = dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35M_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)


def build_sd3(size, resolution, device, dtype):
    """The tiny SD 3.5 through the users' loading path, or SD 3.5 Medium's architecture at `resolution`."""
    device = torch.device(device)
    if size == "tiny":
        folder = os.path.join(tempfile.gettempdir(), "d-fusion-bench-tiny-sd3")
        if not os.path.isdir(folder):
            build_tiny_sd3(folder)
        models = load_sd3_models(folder, mixed_precision="no", dev_id=0)
        for part in (models.transformer, models.vae, models.text_encoder, models.text_encoder_2):
            part.to(device, dtype=dtype)
        models.device, models.dtype = device, dtype
        return models
    torch.manual_seed(0)
    clip = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407)
    with torch.device(device):
        transformer = SD3Transformer2DModel(sample_size=resolution // 8, **SD35M_TRANSFORMER).to(dtype)
        vae = AutoencoderKL(**SD35M_VAE).to(dtype)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**clip, **c)).to(dtype) for c in (CLIP_L, CLIP_G)]
    for part in (transformer, vae, *encoders):
        part.requires_grad_(False).eval()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(scratch)
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    return StableDiffusion3(
        transformer, vae, encoders[0], tokenizer, encoders[1], tokenizer, None, None, scheduler, device, dtype
    )


def flow_sampler(args, noise_level=0.7):
    return SamplerSettings(args.steps, 1.0, 5.0, True, noise_level)


def bench_sampling(models, args):
    pipeline, indices = models.pipeline(), range(args.batch)
    text, negative = encode_sd3_prompts(models, [PROMPT] * args.batch), encode_sd3_prompts(models, [""])

    def ours():
        return sample_trajectories(
            models, text, negative, sample_generators(42, 0, args.batch, indices), flow_sampler(args, 0.0), progress=False
        ).latents[:, -1]

    def diffusers_pipeline():
        return pipeline(
            [PROMPT] * args.batch, num_inference_steps=args.steps, guidance_scale=5.0,
            generator=sample_generators(42, 0, args.batch, indices), output_type="latent",
        ).images

    difference = (ours() - diffusers_pipeline().float()).abs().max().item()
    times = alternate({"ours": ours, "pipeline": diffusers_pipeline}, args.repeats, args.device)
    print(f"  sampling, batch {args.batch}, noise level 0: ours {times['ours']:.3f} s, pipeline "
          f"{times['pipeline']:.3f} s, ratio {times['ours'] / times['pipeline']:.3f} (goal <= 1.05); "
          f"final latents' max abs difference {difference:.2e}")


def bench_fusion(models, args):
    text, negative = encode_sd3_prompts(models, [PROMPT]), encode_sd3_prompts(models, [""])
    weights, thresholds = item_selection(models.tokenizer, [PROMPT], OBJECTS, text.embeds.shape[1])
    references, num_samples = args.targets // 2, 2 * args.targets
    base_indices = list(range(references, references + args.targets))

    def sample(reference_indices, base_pass):
        rows = len(reference_indices)
        steps = f"0-{args.steps - 2}"
        injection = parse_injection("T,T,T,T,T,F", ",".join([steps] * 5), ",,,,,")  # inject_l does not apply to SD 3
        settings = FusionSettings(injection, flow_sampler(args), base_pass=base_pass)
        batch = FusionBatch(
            text.expand(rows), sample_generators(0, 0, num_samples, reference_indices),
            sample_generators(0, 0, num_samples, base_indices), torch.arange(args.targets) // (args.targets // rows),
            weights.expand(rows, -1, -1), thresholds.expand(rows, -1),
        )
        return fused_flow_sampling(models, batch, negative, settings)

    distinct = list(range(references))
    ours = lambda: sample(distinct, base_pass=False)  # noqa: E731
    release = lambda: sample([r for r in distinct for _ in range(2)], base_pass=True)  # noqa: E731
    difference = (ours().targets.latents - release().targets.latents).abs().max().item()
    times = alternate({"ours": ours, "release": release}, args.repeats, args.device)
    print(f"  fusion, {args.targets} targets: ours (1.5 passes) {times['ours']:.3f} s, three passes "
          f"{times['release']:.3f} s, ratio {times['ours'] / times['release']:.3f} (goal <= 0.55); "
          f"targets' max abs difference {difference:.2e}")


def bench_dpo_step(models, args):
    params = add_model_lora(models, args.rank, 0)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    policy = Policy(models, encode_sd3_prompts(models, [""]), flow_sampler(args))
    policy.set_timesteps()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, args.steps + 1, *models.latent_shape, generator=generator)  # (w, l): values do not matter
    timesteps, text = models.scheduler.timesteps, encode_sd3_prompts(models, [PROMPT] * 2)
    cuda = torch.device(args.device).type == "cuda"

    def step():
        with torch.autocast("cuda", dtype=args.torch_dtype, enabled=cuda and args.dtype != "fp32"):
            log_prob, velocity = policy.transition(latents, timesteps, 1, text)
            ref_log_prob, ref_velocity = policy.reference_transition(latents, timesteps, 1, text)
            log_ratio = log_prob - ref_log_prob
            loss, _ = dpo_loss(log_ratio[:1], log_ratio[1:], velocity[:1], ref_velocity[:1], 1.0, 0.0, 0.1)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = alternate({"step": step}, args.repeats, args.device)["step"]
    unit = "GiB GPU peak" if cuda else "GiB process max RSS"
    print(f"  one DPO step, LoRA rank {args.rank} ({sum(p.numel() for p in params)} parameters): "
          f"{seconds:.3f} s, {peak_memory(step, args.device):.2f} {unit}")


def main():
    args = parse_args(
        __doc__, ("tiny", "sd35m"), resolution=(int, 1024, "image side (sd35m)"), batch=(int, 4, "images per sampling batch"),
        targets=(int, 8, "targets per fused batch (even)"), steps=(int, 20, "flow steps"), rank=(int, 4, "LoRA rank"),
    )
    models = build_sd3(args.size, args.resolution, args.device, args.torch_dtype)
    print(f"SD 3 size={args.size} {models.resolution} px device={args.device} dtype={args.dtype} steps={args.steps} "
          f"repeats={args.repeats}")
    bench_sampling(models, args)
    bench_fusion(models, args)
    bench_dpo_step(models, args)


if __name__ == "__main__":
    main()
