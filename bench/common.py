"""Models for the benchmarks: the tiny model (built like the tests build it), or SD 2.1 base's or SDXL
base's real architecture with random weights (no download needed; for the GPU check)."""

import argparse
import os
import statistics
import tempfile
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from d_fusion.families import StableDiffusionFamily, StableDiffusionXLFamily
from d_fusion.models import StableDiffusion, load_models
from d_fusion.tiny import SD_SCHEDULER, build_tiny_models, build_tokenizer

# SD 2.1 base's configs (unet/, vae/, text_encoder/ of stabilityai/stable-diffusion-2-1-base)
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)


# SDXL base's configs (unet/, vae/, text_encoder/, text_encoder_2/ of stabilityai/stable-diffusion-xl-base-1.0)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = SD21_VAE | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = SD21_TEXT | dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768, hidden_act="quick_gelu")
SDXL_TEXT_2 = SD21_TEXT | dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               projection_dim=1280)

# --size: (family, UNet, VAE, text encoder configs)
ARCHITECTURES = dict(
    sd21=(StableDiffusionFamily, SD21_UNET, SD21_VAE, (SD21_TEXT,)),
    sdxl=(StableDiffusionXLFamily, SDXL_UNET, SDXL_VAE, (SDXL_TEXT, SDXL_TEXT_2)),
)


def parse_args(description, sizes=("tiny", "sd21", "sdxl"), **extra):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sizes, default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    for name, (kind, default, text) in extra.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    args.torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    return args


def build_models(size, device, dtype):
    """A frozen StableDiffusion: the tiny model through the users' loading path, or a real architecture
    (`ARCHITECTURES`) with random weights."""
    device = torch.device(device)
    if size == "tiny":
        cache = os.path.join(tempfile.gettempdir(), "d-fusion-bench-tiny")
        models = load_models(os.path.join(build_tiny_models(cache), "sd"), mixed_precision="no", dev_id=0)
        for part in (models.unet, models.vae, models.text_encoder):
            part.to(device, dtype=dtype)
        models.device, models.dtype = device, dtype
        return models
    family, unet_config, vae_config, text_configs = ARCHITECTURES[size]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype)
        vae = AutoencoderKL(**vae_config).to(dtype)
        encoders = [CLIPTextModel(CLIPTextConfig(**text_configs[0])).to(dtype)]
        encoders += [CLIPTextModelWithProjection(CLIPTextConfig(**c)).to(dtype) for c in text_configs[1:]]
    for part in (unet, vae, *encoders):
        part.requires_grad_(False).eval()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(scratch)
    second = dict(text_encoder_2=encoders[1], tokenizer_2=tokenizer, force_zeros_for_empty_prompt=True) if encoders[1:] else {}
    return StableDiffusion(
        family, unet, vae, encoders[0], tokenizer, DDIMScheduler(**SD_SCHEDULER), device, dtype, **second
    )


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(runs, repeats, device):
    """Time each named function `repeats` times, interleaved (a, b, a, b, ...) after one warm-up each;
    returns {name: median seconds}."""
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
