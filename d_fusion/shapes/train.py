"""Train the shapes model from scratch: `python -m d_fusion.shapes.train OUT [--seed 0]`.

A Stable Diffusion 2.1 in miniature, trained on drawings of the `pretrain` object pairs
(`world.pair_split`), written to OUT as a diffusers folder that loads with `from_pretrained`
exactly as SD 2.1 does (`assets/shapes/` is this script's output with the defaults):

- `AutoencoderKL`, 32x32 RGB <-> 16x16x4 latents (two blocks: a factor 2), trained first with an
  L1 + L2 reconstruction loss and a small KL term; `scaling_factor` = 1 / std of the latents,
  as SD's VAE was calibrated;
- `CLIPTextModel` (2 layers, width 64) with the real CLIP tokenizer, trained with the UNet;
- `UNet2DConditionModel` with SD 2.1's topology (three cross-attention down blocks and a plain one,
  a cross-attention mid block, mirrored up blocks, linear projections, SD 2.x's head counts), on
  latent grids 16, 8, 4, 2: the 8x8 layers (`down_blocks.1`, `up_blocks.2`) are the mask layers,
  as 16x16 is in SD 2.1 at 64x64 latents;
- `DDIMScheduler` with SD's schedule, epsilon prediction.

The UNet learns the usual epsilon objective (Ho et al. 2020, eq. 14) with min-SNR-5 loss weights
(Hang et al. 2023), captions dropped to "" 10% of the time for classifier-free guidance, and an
exponential moving average of its weights (and the text encoder's), which is what is saved.

Seeded and resumable: the state is saved to OUT.work/ every `--save-every` steps and a rerun
continues from it; the data are redrawn from the seed. About 45 minutes on 2 CPU cores.
"""

import argparse
import copy
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from d_fusion.shapes import world
from d_fusion.tiny import SD_SCHEDULER, build_tokenizer

TEXT_DIM = 64
LATENT_SIDE = world.IMAGE_SIZE // 2


def build_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
    )


def build_text_encoder(vocab_size):
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=TEXT_DIM,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet():
    return UNet2DConditionModel(
        sample_size=LATENT_SIDE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 96, 96),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 6, 6),  # SD 2.x's field: heads per block (head width 16)
        cross_attention_dim=TEXT_DIM,
        use_linear_projection=True,
        norm_num_groups=16,
    )


# --- data ------------------------------------------------------------------------------------------

def draw_dataset(num_images, seed):
    """(images (N, 3, 32, 32) uint8, captions): random drawings of random `pretrain` scenes."""
    rng = random.Random(seed)
    scenes = world.split_scenes("pretrain")
    images, captions = np.empty((num_images, 3, world.IMAGE_SIZE, world.IMAGE_SIZE), np.uint8), []
    for i in tqdm(range(num_images), desc="drawing", leave=False):
        scene = rng.choice(scenes)
        image, _ = world.render(scene, rng)
        images[i] = np.asarray(image).transpose(2, 0, 1)
        captions.append(world.caption(scene))
    return torch.from_numpy(images), captions


def to_pixels(images_uint8):
    return images_uint8.float() / 127.5 - 1.0  # SD's [-1, 1]


# --- resumable state ------------------------------------------------------------------------------

def save_state(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path):
    return torch.load(path, weights_only=False) if os.path.exists(path) else None


def cosine_lr(step, total, peak, warmup=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# --- stage 1: the autoencoder ---------------------------------------------------------------------

def train_vae(vae, images, work, args):
    path = os.path.join(work, "vae.pt")
    state = load_state(path)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    if state is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(args.seed)
    vae.train()
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae")
    while step < args.vae_steps:
        batch = to_pixels(images[torch.randint(len(images), (args.batch_size,))])  # (B, 3, 32, 32)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (reconstruction - batch).abs().mean() + F.mse_loss(reconstruction, batch) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.save_every == 0 or step == args.vae_steps:
            save_state(path, dict(vae=vae.state_dict(), optimizer=optimizer.state_dict(), step=step, rng=torch.get_rng_state()))
    bar.close()
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, images, batch_size=500):
    """Posterior mean and std of every image's latent: (N, 4, 16, 16) each."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding", leave=False):
        posterior = vae.encode(to_pixels(images[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# --- stage 2: text encoder and UNet ---------------------------------------------------------------

def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_denoiser(text_encoder, unet, tokenizer, latents, captions, work, args):
    """Returns the EMA copies of the text encoder and the UNet."""
    path = os.path.join(work, "denoiser.pt")
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    alphas = scheduler.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    loss_weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction

    vocabulary = sorted(set(captions)) + [""]
    ids = tokenizer(vocabulary, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])  # (N,)
    empty = len(vocabulary) - 1
    mean, std = latents

    parameters = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=1e-2)
    ema_text, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    step = 0
    state = load_state(path)
    if state is not None:
        for module, key in ((text_encoder, "text"), (unet, "unet"), (ema_text, "ema_text"), (ema_unet, "ema_unet")):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(args.seed + 1)
    text_encoder.train()
    unet.train()
    bar = tqdm(total=args.steps, initial=step, desc="unet")
    while step < args.steps:
        rows = torch.randint(len(captions), (args.batch_size,))
        x0 = (mean[rows] + std[rows] * torch.randn_like(std[rows])) * args.scaling_factor  # (B, 4, 16, 16)
        tokens = caption_index[rows].masked_fill(torch.rand(args.batch_size) < 0.1, empty)
        timesteps = torch.randint(0, 1000, (args.batch_size,))
        noise = torch.randn_like(x0)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        embeds = text_encoder(ids[tokens])[0]  # (B, 77, 64)
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        loss = (loss_weight[timesteps] * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save_state(path, dict(
                text=text_encoder.state_dict(), unet=unet.state_dict(), ema_text=ema_text.state_dict(),
                ema_unet=ema_unet.state_dict(), optimizer=optimizer.state_dict(), step=step, rng=torch.get_rng_state(),
            ))
    bar.close()
    return ema_text, ema_unet


def save_model(out, vae, text_encoder, tokenizer, unet, scaling_factor):
    """The diffusers folder, written beside `out` and renamed into place; weights in fp16 (half the size)."""
    vae.register_to_config(scaling_factor=scaling_factor)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(torch.float16)
    scratch = out.rstrip("/") + ".saving"
    shutil.rmtree(scratch, ignore_errors=True)
    pipeline.save_pretrained(scratch, safe_serialization=True)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.rename(scratch, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the diffusers folder to write (e.g. assets/shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=60000, help="drawings in the training set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=5000, help="UNet and text encoder steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.out.rstrip("/") + ".work"
    os.makedirs(work, exist_ok=True)
    started = time.time()

    images, captions = draw_dataset(args.images, args.seed)
    with tempfile_dir(work) as scratch:
        tokenizer = build_tokenizer(scratch)
    torch.manual_seed(args.seed)
    vae, text_encoder, unet = build_vae(), build_text_encoder(len(tokenizer)), build_unet()
    train_vae(vae, images, work, args)
    mean, std = encode_dataset(vae, images)
    args.scaling_factor = float(1.0 / mean.std())
    ema_text, ema_unet = train_denoiser(text_encoder, unet, tokenizer, (mean, std), captions, work, args)
    save_model(args.out, vae, ema_text, tokenizer, ema_unet, args.scaling_factor)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(dict(vars(args), minutes=round((time.time() - started) / 60, 1)), f, indent=1)
    print(f"wrote {args.out} in {(time.time() - started) / 60:.1f} min")


def tempfile_dir(parent):
    import tempfile

    return tempfile.TemporaryDirectory(dir=parent)


if __name__ == "__main__":
    main()
