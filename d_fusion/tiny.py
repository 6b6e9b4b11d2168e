"""Tiny random-weight models with the real architectures, for tests and the offline demo.

`python -m d_fusion.tiny OUT_DIR` writes `OUT_DIR/sd` (and `OUT_DIR/sd3`, below): a Stable Diffusion in the standard
diffusers folder format, with SD 2.1 base's topology scaled down (three cross-attention down
blocks and a plain one, a cross-attention mid block, mirrored up blocks, linear projections,
several heads, epsilon prediction, SD's DDIM scheduler config) and a real CLIP BPE tokenizer
built offline from the vocabulary open_clip ships. It loads through `from_pretrained` exactly
as SD 2.1 does.

It also writes `OUT_DIR/clip`: a CLIP scorer with ViT-H-14's design scaled down (a small ViT
image tower, a transformer text tower with CLIP's BPE vocabulary), random weights, in open_clip's
local folder format (`open_clip_config.json` + `open_clip_model.safetensors`). The scorer loads
it as `local-dir:OUT_DIR/clip`, exactly as it loads a downloaded open_clip checkpoint folder.

`build_tiny_sd3(FOLDER)` (`OUT_DIR/sd3`) writes a tiny Stable Diffusion 3.5 (docs/METHOD.md §10): SD 3.5 Medium's
transformer scaled down (joint blocks, the first two with SD 3.5's extra image-only attention),
the two CLIP text encoders with projection and the real CLIP tokenizer, a 16-channel VAE, SD 3.5's
flow-matching scheduler config; T5 is left out, as `StableDiffusion3Pipeline` allows (`t5=True`:
a one-layer T5 encoder with a small SentencePiece-unigram T5 tokenizer).

And the other rewards' models (d_fusion/rewards.py), each in the format its users download:
- `OUT_DIR/pickscore`: a transformers `CLIPModel` + `CLIPProcessor` folder, as PickScore_v1 ships;
- `OUT_DIR/hpsv2`: an open_clip model config (`tiny-hps.json`, the architecture) and an HPS-style
  checkpoint `HPS_v2.1_compressed.pt` (`{"state_dict": ...}`, a torch pickle);
- `OUT_DIR/aesthetic`: the improved LAION aesthetic predictor's MLP head (`layers.<i>` Linear layers,
  dropouts between), widths scaled down, on the tiny CLIP's image embeddings, as a `.pth` state dict.
"""

import gzip
import json
import os
import string
import sys
import tempfile

import open_clip
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from d_fusion.datadir import atomic_folder

TEXT_DIM = 32
SAMPLE_SIZE = 16  # latent side; images are 8x larger

# SD 2.1 base's scheduler config (scheduler/scheduler_config.json of the release model)
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    num_train_timesteps=1000,
)


def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocabulary():
    """CLIP's vocabulary and merges, as open_clip's tokenizer builds them from its BPE file."""
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def build_tokenizer(folder):
    os.makedirs(folder, exist_ok=True)
    vocab, merges = clip_vocabulary()
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(vocab, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(vocab_file, merges_file, pad_token="<|endoftext|>", model_max_length=77)


def clip_text_config(vocab_size, width=TEXT_DIM, heads=2):
    """A 2-layer CLIP text transformer with CLIP's special tokens (width and heads scaled down)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def build_text_encoder(vocab_size, width=TEXT_DIM, heads=2):
    return CLIPTextModel(clip_text_config(vocab_size, width, heads))


def build_unet(sample_size=SAMPLE_SIZE, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True):
    """SD 2.x's UNet scaled down (SD 1.x: one head count for all blocks, convolutional projections)."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=attention_head_dim,  # SD 1.x/2.x's field: the number of heads (per block)
        cross_attention_dim=TEXT_DIM,
        use_linear_projection=use_linear_projection,
        norm_num_groups=8,
    )


def build_sdxl_unet(sample_size=SAMPLE_SIZE, text_width=TEXT_DIM):
    """SDXL's UNet scaled down: a plain first down block, two with attentions (the last with 2 transformer
    layers, as SDXL's have several), the text_time embedding of pooled text and 6 size conditions."""
    time_dim = 8
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=2 * text_width,  # both text encoders' hidden states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_width,  # time ids and the pooled projection
        norm_num_groups=8,
    )


def build_vae(latent_channels=4, sample_size=SAMPLE_SIZE * 8, scaling_factor=0.18215, **extra):
    """SD's VAE scaled down: images are 8x the latent (`extra`: more config fields, SD 3's)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def _write_pipeline(folder, seed, make_pipeline):
    """Seed torch, make the pipeline with a real CLIP tokenizer (`make_pipeline(tokenizer)`), save it."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        make_pipeline(build_tokenizer(scratch)).save_pretrained(folder, safe_serialization=True)


def _write_sd(folder, seed, make_unet=build_unet, make_vae=build_vae, **scheduler):
    """A tiny SD 1.x / 2.x pipeline: `make_unet()`, `make_vae()`, SD's DDIM config updated by `scheduler`."""
    _write_pipeline(folder, seed, lambda tokenizer: StableDiffusionPipeline(
        vae=make_vae(),
        text_encoder=build_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=make_unet(),
        scheduler=DDIMScheduler(**(SD_SCHEDULER | scheduler)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ))


def build_tiny_sd(folder, seed=0):
    """Write the tiny Stable Diffusion (SD 2.1 base's topology) to `folder` (diffusers format)."""
    _write_sd(folder, seed)


def build_tiny_sd15(folder, seed=0):
    """The tiny SD 1.5: SD 1.x's UNet (one head count, convolutional projections)."""
    _write_sd(folder, seed, make_unet=lambda: build_unet(attention_head_dim=2, use_linear_projection=False))


def build_tiny_sd21v(folder, seed=0):
    """The tiny SD 2.1 at 768 px: v-prediction (the scheduler's prediction_type) on a 1.5x larger latent."""
    _write_sd(
        folder, seed, make_unet=lambda: build_unet(SAMPLE_SIZE * 3 // 2),
        make_vae=lambda: build_vae(sample_size=SAMPLE_SIZE * 12), prediction_type="v_prediction",
    )


def build_tiny_sdxl(folder, seed=0):
    """The tiny SDXL: two text encoders (the second with a projection), the text_time UNet, zeros for the
    empty prompt (force_zeros_for_empty_prompt, as SDXL base), SDXL's VAE scaling, DDIM."""
    _write_pipeline(folder, seed, lambda tokenizer: StableDiffusionXLPipeline(
        vae=build_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=build_text_encoder(len(tokenizer)),
        text_encoder_2=build_clip_with_projection(len(tokenizer), TEXT_DIM),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=build_sdxl_unet(),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    ))


# --- a tiny Stable Diffusion 3.5 (docs/METHOD.md §10) ---

SD3_SAMPLE_SIZE = 16  # latent side: an 8x8 grid of image tokens (patch 2)
SD3_TEXT_DIMS = (32, 48)  # the two CLIP text encoders' widths (SD 3.5: 768 and 1280)
SD3_JOINT_DIM = 96  # T5's width in SD 3.5 (4096): the CLIP features are zero-padded to it
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD 3.5's scheduler/scheduler_config.json


def build_clip_with_projection(vocab_size, width):
    """A 2-layer `CLIPTextModelWithProjection` (SD 3's text encoders) with CLIP's special tokens."""
    return CLIPTextModelWithProjection(clip_text_config(vocab_size, width))


def build_sd3_transformer(sample_size=SD3_SAMPLE_SIZE, num_layers=4, dual_attention_layers=(0, 1)):
    """SD 3.5 Medium's transformer scaled down: joint blocks whose first ones are dual-attention
    blocks (an extra image-only attention, `attn2`), RMS q/k norms, a last block that drops the text."""
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=SD3_JOINT_DIM,
        caption_projection_dim=16,  # = heads * head dim, as in SD 3.5
        pooled_projection_dim=sum(SD3_TEXT_DIMS),
        pos_embed_max_size=sample_size,
        dual_attention_layers=dual_attention_layers,
        qk_norm="rms_norm",
    )


def build_sd3_vae():
    """SD 3's 16-channel VAE (no quant convs, a shift factor) scaled down."""
    return build_vae(16, SD3_SAMPLE_SIZE * 8, 1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def build_t5_tokenizer():
    """A T5 tokenizer (SentencePiece unigram, T5's special tokens) over lowercase letters, digits and
    a few words: T5's own 32k vocabulary cannot be had offline."""
    letters, start = string.ascii_lowercase, "\u2581"  # SentencePiece's word start
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (start, -2.0)]
    vocab += [(start + c, -3.0) for c in letters] + [(c, -4.0) for c in letters + string.digits]
    vocab += [(start + w, -1.0) for w in "a an the and of on cat dog car red blue circle square".split()]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build_t5(vocab_size):
    """A one-layer T5 encoder whose width is the transformer's joint width (SD 3.5: T5-XXL's 4096)."""
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=SD3_JOINT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2))


def build_tiny_sd3(folder, seed=0, t5=False):
    """Write the tiny SD 3.5 to `folder` (diffusers format); T5 is left out, as SD 3 allows, unless `t5`."""
    t5_tokenizer = build_t5_tokenizer() if t5 else None
    _write_pipeline(folder, seed, lambda tokenizer: StableDiffusion3Pipeline(
        transformer=build_sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=build_sd3_vae(),
        text_encoder=build_clip_with_projection(len(tokenizer), SD3_TEXT_DIMS[0]),
        tokenizer=tokenizer,
        text_encoder_2=build_clip_with_projection(len(tokenizer), SD3_TEXT_DIMS[1]),
        tokenizer_2=tokenizer,
        text_encoder_3=build_t5(len(t5_tokenizer)) if t5 else None,
        tokenizer_3=t5_tokenizer,
    ))


# open_clip model config of the tiny scorer (the fields of open_clip's ViT-H-14.json, scaled down)
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)


def build_tiny_clip(folder, seed=0):
    """Write the tiny open_clip scorer to `folder` (open_clip's local folder format)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    os.makedirs(folder, exist_ok=True)
    save_file(model.state_dict(), os.path.join(folder, "open_clip_model.safetensors"))
    preprocess = dict(size=TINY_CLIP["vision_cfg"]["image_size"])
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(dict(model_cfg=TINY_CLIP, preprocess_cfg=preprocess), f, indent=1)


def build_tiny_pickscore(folder, seed=0):
    """Write a tiny PickScore (transformers CLIPModel + CLIPProcessor folder, PickScore_v1's format)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=clip_text_config(49408).to_dict(),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with tempfile.TemporaryDirectory() as scratch:
        CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer(scratch)).save_pretrained(folder)


TINY_HPS_ARCHITECTURE = "tiny-hps.json"  # an open_clip model config: its name is the file's stem
TINY_HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"


def build_tiny_hps(folder, seed=1):
    """Write a tiny HPS: an open_clip architecture (ViT-H-14's design scaled down) and an HPS-format
    checkpoint of it (`torch.save({"state_dict": ...})`, as HPS_v2.1_compressed.pt is)."""
    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, TINY_HPS_ARCHITECTURE), "w") as f:
        json.dump(TINY_CLIP, f, indent=1)
    torch.save(dict(state_dict=open_clip.CLIP(**TINY_CLIP).state_dict()), os.path.join(folder, TINY_HPS_CHECKPOINT))


TINY_AESTHETIC = "sac+logos+ava1-l14-linearMSE.pth"  # the improved aesthetic predictor's file name
AESTHETIC_WIDTHS = (64, 16, 8, 4)  # the published head's 1024, 128, 64, 16, scaled down


def build_tiny_aesthetic(folder, seed=0):
    """Write a tiny aesthetic head: the improved predictor's layers (Linear, Dropout, Linear, Dropout,
    Linear, Dropout, Linear, Linear) on the tiny CLIP's embed_dim, as a state dict `.pth`."""
    torch.manual_seed(seed)
    widths = (TINY_CLIP["embed_dim"], *AESTHETIC_WIDTHS, 1)
    linear = [torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    dropout = torch.nn.Dropout
    layers = torch.nn.Sequential(
        linear[0], dropout(0.2), linear[1], dropout(0.2), linear[2], dropout(0.1), linear[3], linear[4]
    )
    os.makedirs(folder, exist_ok=True)
    state = {f"layers.{key}": value for key, value in layers.state_dict().items()}
    torch.save(state, os.path.join(folder, TINY_AESTHETIC))


def _build_atomically(build, folder):
    """Build `folder` unless it exists, whole or not at all: a reader never sees half a model."""
    if not os.path.isdir(folder):
        with atomic_folder(folder, replace=False) as scratch:
            build(scratch)
    return folder


def build_tiny_models(out_dir):
    """Build every tiny model into `out_dir` (each only if missing); returns `out_dir`."""
    for name, build in TINY_MODELS.items():
        _build_atomically(build, os.path.join(out_dir, name))
    return out_dir


# the folders build_tiny_models writes
TINY_MODELS = dict(
    sd=build_tiny_sd,
    sd15=build_tiny_sd15,
    sd21v=build_tiny_sd21v,
    sdxl=build_tiny_sdxl,
    sd3=build_tiny_sd3,
    clip=build_tiny_clip,
    pickscore=build_tiny_pickscore,
    hpsv2=build_tiny_hps,
    aesthetic=build_tiny_aesthetic,
)


def build_missing(path, tiny_cache):
    """Build the tiny models into `tiny_cache` when `path` is one of them or a file in one
    (`tiny_cache/sd`, `tiny_cache/hpsv2/HPS_v2.1_compressed.pt`, ...) and that model's folder does not
    exist. Any other path is left alone: a mistyped model path fails to load instead of getting a
    random model, and nothing is written outside `tiny_cache`."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(tiny_cache))
    name = relative.split(os.sep)[0]
    if name in TINY_MODELS and not os.path.isdir(os.path.join(tiny_cache, name)):
        build_tiny_models(tiny_cache)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m d_fusion.tiny OUT_DIR")
    print(build_tiny_models(sys.argv[1]))
