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

Trained so for `--steps`, a small model draws well but attends almost uniformly over the 77
tokens (each ~1/77 everywhere), so no object mask can be read from its cross-attention. The last
`--ground-steps` add token-level grounding losses in the manner of TokenCompose (Wang et al.,
CVPR 2024), from the drawings' own object masks m_k: at the 16x16 and 8x8 cross-attention layers,
with A_k the head-averaged attention probability of object k's shape noun over the query grid,

    L_token = 1 - sum_q A_k(q) m_k(q) / sum_q A_k(q)     (the token's attention falls on its object)
    L_pixel = BCE(A_k(q), [m_k(q) > 1/2])                 (and dominates the object's pixels)

weighted by `--ground-weight` and added to the epsilon loss. This is what SD's web-scale training
gives for free: cross-attention maps that cover their objects (docs/METHOD.md §6.2 reads its masks from
them).

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

from d_fusion.shapes import world
from d_fusion import tiny
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
    return tiny.build_text_encoder(vocab_size, width=TEXT_DIM, heads=4)


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
    """Random drawings of random `pretrain` scenes: (images (N, 3, 32, 32) uint8, captions,
    object masks (N, 2, 32, 32) uint8 (each object's coverage x 255, first and second thing))."""
    rng = random.Random(seed)
    scenes = world.split_scenes("pretrain")
    side = world.IMAGE_SIZE
    images = np.empty((num_images, 3, side, side), np.uint8)
    masks, captions = np.empty((num_images, 2, side, side), np.uint8), []
    for i in tqdm(range(num_images), desc="drawing", leave=False):
        scene = rng.choice(scenes)
        image, placed = world.render(scene, rng)
        images[i] = np.asarray(image).transpose(2, 0, 1)
        for k, p in enumerate(placed):
            masks[i, k] = np.round(255 * world.coverage(p.thing.shape, p.cx, p.cy, p.side))
        captions.append(world.caption(scene))
    return torch.from_numpy(images), captions, torch.from_numpy(masks)


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
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # the grounding steps stay at the floor
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


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
            state = dict(vae=vae.state_dict(), optimizer=optimizer.state_dict(), step=step, rng=torch.get_rng_state())
            save_state(path, state)
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


class GroundedCrossAttention:
    """Plain cross-attention, softmax(Q K^T / sqrt(d)) V, that keeps its head-averaged probabilities."""

    def __init__(self, maps):
        self.maps = maps  # the training step's list of (B, Q, 77) maps, in call order

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B * heads, Q, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B * heads, 77, d)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B * heads, Q, 77)
        self.maps.append(probs.unflatten(0, (-1, attn.heads)).mean(dim=1))  # (B, Q, 77)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, Q, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


GROUND_GRIDS = (16, 8)  # the query grids whose cross-attention is grounded (8: the mask layers)


def grounding_loss(maps, object_masks, object_tokens, rows):
    """TokenCompose-style L_token + L_pixel, averaged over the grounded layers, objects and `rows`.

    maps: the step's (B, Q, 77) cross-attention maps; object_masks: (B, 2, 32, 32) coverage in
    [0, 1]; object_tokens: (B, 2) token positions of the shape nouns; rows: (B,) bool, captioned.
    """
    losses = []
    for probs in maps:
        grid = int(round(probs.shape[1] ** 0.5))
        if grid not in GROUND_GRIDS:
            continue
        m = F.adaptive_avg_pool2d(object_masks, grid).flatten(2)  # (B, 2, Q)
        a = torch.gather(probs.transpose(1, 2), 1, object_tokens[..., None].expand(-1, -1, probs.shape[1]))  # (B, 2, Q)
        token = 1 - (a * m).sum(-1) / a.sum(-1).clamp_min(1e-8)  # (B, 2)
        pixel = F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), (m > 0.5).float(), reduction="none").mean(-1)
        losses.append((token + pixel)[rows].mean())
    return torch.stack(losses).mean()


def set_grounding(unet, maps):
    """GroundedCrossAttention on every cross-attention layer, diffusers' default elsewhere."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor({
        name: GroundedCrossAttention(maps) if name.endswith("attn2.processor") else AttnProcessor2_0()
        for name in unet.attn_processors
    })


def train_denoiser(text_encoder, unet, tokenizer, latents, captions, object_masks, work, args):
    """Returns the EMA copies of the text encoder and the UNet (with diffusers' default processors)."""
    path = os.path.join(work, "denoiser.pt")
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    alphas = scheduler.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    loss_weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction

    vocabulary = sorted(set(captions)) + [""]
    ids = tokenizer(vocabulary, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])  # (N,)
    nouns = torch.tensor([[p + 1 for p in world.item_positions(c)] for c in captions])  # (N, 2) token positions
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
    maps = []
    total = args.steps + args.ground_steps
    bar = tqdm(total=total, initial=step, desc="unet")
    while step < total:
        grounding = step >= args.steps
        if grounding and not maps:
            set_grounding(unet, maps)
        maps.clear()
        rows = torch.randint(len(captions), (args.batch_size,))
        x0 = (mean[rows] + std[rows] * torch.randn_like(std[rows])) * args.scaling_factor  # (B, 4, 16, 16)
        dropped = torch.rand(args.batch_size) < 0.1
        tokens = caption_index[rows].masked_fill(dropped, empty)
        timesteps = torch.randint(0, 1000, (args.batch_size,))
        noise = torch.randn_like(x0)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        embeds = text_encoder(ids[tokens])[0]  # (B, 77, 64)
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        loss = (loss_weight[timesteps] * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        shown = dict(loss=f"{loss.item():.4f}")
        if grounding:
            ground = grounding_loss(maps, object_masks[rows].float() / 255, nouns[rows], ~dropped)
            loss = loss + args.ground_weight * ground
            shown["ground"] = f"{ground.item():.3f}"
        for group in optimizer.param_groups:
            group["lr"] = args.ground_lr if grounding else cosine_lr(step, args.steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = args.ground_ema if grounding else min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        step += 1
        bar.update(1)
        bar.set_postfix(shown)
        if step % args.save_every == 0 or step == total:
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
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=3000, help="UNet and text encoder steps before grounding")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ground-steps", type=int, default=800, help="last steps, with the grounding losses")
    parser.add_argument("--ground-weight", type=float, default=0.1)
    parser.add_argument("--ground-lr", type=float, default=3e-4)
    parser.add_argument("--ground-ema", type=float, default=0.995, help="EMA decay in the grounding steps")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.out.rstrip("/") + ".work"
    os.makedirs(work, exist_ok=True)
    started = time.time()

    images, captions, object_masks = draw_dataset(args.images, args.seed)
    with tempfile_dir(work) as scratch:
        tokenizer = build_tokenizer(scratch)
    torch.manual_seed(args.seed)
    vae, text_encoder, unet = build_vae(), build_text_encoder(len(tokenizer)), build_unet()
    train_vae(vae, images, work, args)
    mean, std = encode_dataset(vae, images)
    args.scaling_factor = float(1.0 / mean.std())
    ema_text, ema_unet = train_denoiser(text_encoder, unet, tokenizer, (mean, std), captions, object_masks, work, args)
    save_model(args.out, vae, ema_text, tokenizer, ema_unet, args.scaling_factor)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(dict(vars(args), minutes=round((time.time() - started) / 60, 1)), f, indent=1)
    print(f"wrote {args.out} in {(time.time() - started) / 60:.1f} min")


def tempfile_dir(parent):
    import tempfile

    return tempfile.TemporaryDirectory(dir=parent)


if __name__ == "__main__":
    main()
