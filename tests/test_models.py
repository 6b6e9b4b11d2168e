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
