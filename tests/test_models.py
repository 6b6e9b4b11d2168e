"""Model loading: the tiny model loads through SD 2.1's path; bad paths get one clear message."""

import os

import pytest
import torch

from d_fusion.errors import UserError
from d_fusion.models import inference_dtype, load_models


def test_tiny_model_loads_frozen_on_cpu_in_fp32(tiny_sd):
    assert tiny_sd.device.type == "cpu" and tiny_sd.dtype == torch.float32
    assert tiny_sd.resolution == 128 and tiny_sd.latent_shape == (4, 16, 16)
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())
    assert tiny_sd.scheduler.__class__.__name__ == "DDIMScheduler"


def test_cpu_runs_in_fp32_whatever_the_mixed_precision():
    assert inference_dtype("fp16", torch.device("cpu")) == torch.float32
    assert inference_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(UserError, match="mixed_precision"):
        inference_dtype("fp8", torch.device("cuda", 0))


def test_missing_path_says_what_to_pass(tmp_path):
    with pytest.raises(UserError, match="no such folder.*pretrained.model|Pass the path"):
        load_models(str(tmp_path / "nowhere" / "sd21"))


def test_folder_without_model_parts_is_named(tmp_path):
    os.makedirs(tmp_path / "unet")
    with pytest.raises(UserError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        load_models(str(tmp_path))


def test_a_hub_id_without_network_fails_at_once_saying_to_download_it(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    looks = []

    def not_cached(model, **kwargs):
        raise LocalEntryNotFoundError("not in the cache")

    def no_network(model, revision=None, timeout=None):
        looks.append(timeout)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(UserError, match="is not downloaded and the Hugging Face hub cannot give it") as error:
        load_models("stabilityai/stable-diffusion-2-1-base")
    assert "hf download stabilityai/stable-diffusion-2-1-base" in str(error.value)
    assert "--config.pretrained.model" in str(error.value)
    assert len(looks) == 1 and looks[0] <= 30  # one look, with a timeout well under from_pretrained's retries
