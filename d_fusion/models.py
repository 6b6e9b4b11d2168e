"""Loading Stable Diffusion's parts from a diffusers folder or hub id: SD 1.x / 2.x, SDXL, SD 3 / 3.5, or a
tiny model.

The family (d_fusion/families.py) comes from the folder's model_index.json and loads its parts
(SD 3's: `sd3.load_sd3_models`); for the UNet families DDIM is built from the folder's scheduler
config whatever scheduler the pipeline ships (SDXL's is Euler).
"""

import logging
import os
from dataclasses import dataclass

import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from d_fusion import distributed
from d_fusion.errors import UserError
from d_fusion.families import FAMILIES

log = logging.getLogger(__name__)

PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")  # every family's, with its unet/ or transformer/
TEXT_ENCODERS = dict(text_encoder=CLIPTextModel, text_encoder_2=CLIPTextModelWithProjection)


class LatentModel:
    """What every family's parts share: sizes from the denoiser's config, the family's pipeline on them."""

    @property
    def denoiser(self):
        """The UNet, or SD 3's transformer."""
        return getattr(self, self.family.denoiser)

    @property
    def latent_shape(self):
        """(C, H, W) of one latent."""
        size = self.denoiser.config.sample_size
        return (self.denoiser.config.in_channels, size, size)

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self):
        return self.denoiser.config.sample_size * self.vae_scale_factor

    def pipeline(self):
        """The family's diffusers pipeline on these very parts (with its own scheduler: DDIM, or SD 3's flow
        matching one)."""
        pipeline = self.family.pipeline_class(
            vae=self.vae,
            scheduler=type(self.scheduler).from_config(self.scheduler.config),
            **{self.family.denoiser: self.denoiser},
            **self.family.pipeline_parts(self),
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


@dataclass
class StableDiffusion(LatentModel):
    family: type  # a family of d_fusion/families.py
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype  # inference dtype of the frozen parts
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: the unconditional conditioning is zeros


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


def check_parts(folder, parts, what):
    """A UserError naming the subfolders `parts` that the model folder lacks, and what to pass (`what`)."""
    missing = [p for p in parts if not os.path.isdir(os.path.join(folder, p))]
    if missing:
        raise UserError(
            f"config.pretrained.model = {folder!r} is a folder but lacks {', '.join(p + '/' for p in missing)}: "
            f"pass {what}"
        )


def check_model_path(name):
    """Fail early, with what to pass, when `name` is neither a diffusers folder nor a hub id."""
    if os.path.isdir(name):
        what = "a diffusers Stable Diffusion folder (unet/ or transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
        check_parts(name, PARTS, what)
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


def model_family(model, revision="main"):
    """(family, pipeline config) from the model's model_index.json."""
    kwargs = {} if os.path.isdir(model) else {"revision": revision}
    try:
        index = DiffusionPipeline.load_config(model, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"config.pretrained.model = {model!r} has no readable model_index.json ({error})") from None
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise UserError(
            f"config.pretrained.model = {model!r} is a {name}; D-Fusion here runs {', '.join(FAMILIES)} models"
        )
    return FAMILIES[name], index


def load_models(model, revision="main", mixed_precision="fp16", dev_id=0):
    """Every part of the model's family, frozen, on the device, in the inference dtype."""
    check_model_path(model)
    if not os.path.isdir(model):
        check_hub_reachable(model, revision)
    family, index = model_family(model, revision)
    return family.load(model, revision, mixed_precision, dev_id, index)


def freeze(parts, device):
    """Each part (None: one left out) without gradients, in eval mode, on the device."""
    for part in parts:
        if part is not None:
            part.requires_grad_(False)
            part.eval()
            part.to(device)


def loading_error(what, model, error):
    """The UserError of a model whose parts do not load."""
    return UserError(
        f"could not load {what} from config.pretrained.model = {model!r} ({error}). "
        "Pass a local diffusers folder, or a hub id on a machine that can download it"
    )


def load_unet_models(family, model, revision, mixed_precision, dev_id, index):
    """A UNet family's parts (`StableDiffusion`), DDIM's scheduler from the folder's config."""
    device = resolve_device(dev_id)
    dtype = inference_dtype(mixed_precision, device)
    kwargs = {} if os.path.isdir(model) else {"revision": revision}
    try:
        text = {}
        for part in family.text_parts:
            if part.startswith("tokenizer"):
                text[part] = CLIPTokenizer.from_pretrained(model, subfolder=part, **kwargs)
            else:
                text[part] = TEXT_ENCODERS[part].from_pretrained(model, subfolder=part, dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs)
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **kwargs)
    except OSError as error:
        raise loading_error("Stable Diffusion", model, error) from None
    freeze([vae, unet] + [p for name, p in text.items() if name.startswith("text_encoder")], device)
    models = StableDiffusion(
        family, unet, vae, scheduler=scheduler, device=device, dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)), **text,
    )
    log.info("loaded %s (%s) on %s in %s (%d px)", model, family.name, device, dtype, models.resolution)
    return models


def load_models_from_config(config):
    if config.pretrained.tiny:
        from d_fusion.tiny import build_missing

        build_missing(config.pretrained.model, config.tiny_cache)
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.allow_tf32
    dev_id = distributed.device_id(config.dev_id)
    return load_models(config.pretrained.model, config.pretrained.revision, config.mixed_precision, dev_id)
