"""Models for the benchmarks: the tiny model (built like the tests build it) or SD 2.1 base's real
architecture with random weights (no download needed; for the GPU check)."""

import argparse
import os
import statistics
import tempfile
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

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


def parse_args(description, sizes=("tiny", "sd21"), **extra):
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
    """A frozen StableDiffusion: the tiny model through the users' loading path, or SD 2.1's architecture."""
    device = torch.device(device)
    if size == "tiny":
        cache = os.path.join(tempfile.gettempdir(), "d-fusion-bench-tiny")
        models = load_models(os.path.join(build_tiny_models(cache), "sd"), mixed_precision="no", dev_id=0)
        for part in (models.unet, models.vae, models.text_encoder):
            part.to(device, dtype=dtype)
        models.device, models.dtype = device, dtype
        return models
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_UNET).to(dtype)
        vae = AutoencoderKL(**SD21_VAE).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT)).to(dtype)
    for part in (unet, vae, text_encoder):
        part.requires_grad_(False).eval()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(scratch)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, DDIMScheduler(**SD_SCHEDULER), device, dtype)


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
