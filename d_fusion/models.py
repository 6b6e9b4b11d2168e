"""Loading Stable Diffusion's parts from a diffusers folder or hub id (SD 2.1 base, or the tiny model)."""

import logging
import os
from dataclasses import dataclass

import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import CLIPTextModel, CLIPTokenizer

from d_fusion import distributed
from d_fusion.errors import UserError

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusion:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype  # inference dtype of the frozen parts

    @property
    def latent_shape(self):
        """(C, H, W) of one latent."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self):
        return self.unet.config.sample_size * self.vae_scale_factor

    def pipeline(self):
        """diffusers' StableDiffusionPipeline on these very parts (with its own DDIM scheduler)."""
        pipeline = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


def resolve_device(dev_id):
    """CUDA device `dev_id` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        if not 0 <= int(dev_id) < torch.cuda.device_count():
            raise UserError(f"config.dev_id = {dev_id}, but this machine has {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", int(dev_id))
    return torch.device("cpu")


def inference_dtype(mixed_precision, device):
    """The dtype of the frozen parts: fp16/bf16 on a GPU as asked, fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
    if mixed_precision not in dtypes:
        raise UserError(f"config.mixed_precision = {mixed_precision!r}; use one of {sorted(dtypes)}")
    return dtypes[mixed_precision]


def _looks_like_hub_id(name):
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def check_model_path(name):
    """Fail early, with what to pass, when `name` is neither a diffusers folder nor a hub id."""
    if os.path.isdir(name):
        missing = [p for p in PARTS if not os.path.isdir(os.path.join(name, p))]
        if missing:
            raise UserError(
                f"config.pretrained.model = {name!r} is a folder but lacks {', '.join(p + '/' for p in missing)}: "
                "pass a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return
    if not _looks_like_hub_id(name):
        raise UserError(
            f"config.pretrained.model = {name!r}: no such folder. Pass the path of a diffusers Stable Diffusion "
            "folder (e.g. a download of stabilityai/stable-diffusion-2-1-base), a hub id, or use "
            "--config config/config.py:tiny for the offline tiny model"
        )


HUB_TIMEOUT = 20  # seconds to reach the hub before a hub id that is not downloaded yet fails


def check_hub_reachable(model, revision, field="pretrained.model", folder="sd21"):
    """A hub id that is not in the local cache must be downloadable: one look at the hub, at most
    HUB_TIMEOUT seconds, instead of from_pretrained's minutes of retries without a network.
    `field`: the setting that names it; `folder`: the download folder the message suggests."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return  # from_pretrained reads the cache only, and fails at once without it
    try:
        huggingface_hub.snapshot_download(model, revision=revision, local_files_only=True)
        return  # downloaded before
    except LocalEntryNotFoundError:
        pass
    try:
        huggingface_hub.model_info(model, revision=revision, timeout=HUB_TIMEOUT)
    except Exception as error:  # no network, a timeout, an unknown id: the hub's and httpx's error types
        raise UserError(
            f"config.{field} = {model!r} is not downloaded and the Hugging Face hub cannot give it "
            f"({type(error).__name__}: {error}). Download it on a machine with a network (e.g. hf "
            f"download {model} --local-dir {folder}) and pass its folder: --config.{field} {folder}"
        ) from None


def load_models(model, revision="main", mixed_precision="fp16", dev_id=0):
    """Every part of Stable Diffusion, frozen, on the device, in the inference dtype."""
    check_model_path(model)
    if not os.path.isdir(model):
        check_hub_reachable(model, revision)
    device = resolve_device(dev_id)
    dtype = inference_dtype(mixed_precision, device)
    kwargs = {} if os.path.isdir(model) else {"revision": revision}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs)
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **kwargs)
    except OSError as error:
        raise UserError(
            f"could not load Stable Diffusion from config.pretrained.model = {model!r} ({error}). "
            "Pass a local diffusers folder, or a hub id on a machine that can download it"
        ) from None
    for part in (text_encoder, vae, unet):
        part.requires_grad_(False)
        part.eval()
        part.to(device)
    log.info("loaded %s on %s in %s (%d px)", model, device, dtype, unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1))
    return StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler, device, dtype)


def load_models_from_config(config):
    if config.pretrained.tiny:
        from d_fusion.tiny import build_missing

        build_missing(config.pretrained.model, config.tiny_cache)
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.allow_tf32
    dev_id = distributed.device_id(config.dev_id)
    return load_models(config.pretrained.model, config.pretrained.revision, config.mixed_precision, dev_id)
