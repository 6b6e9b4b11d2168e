"""The experiment's data directory: the one place that knows every path and file format.

    data/<exp_name>/
        run.log                       the sampler's log
        epoch<k>/
            images/00000.png ...      first sampling pass, index = position in the epoch
            prompt.json               prompts of the published images, in index order
            trajectories/00000.safetensors   latents (T+1, C, H, W), log_probs (T,), timesteps (T,)

Every file another process reads is written to a temporary name and renamed into place, so a
reader sees the whole file or none of it.
"""

import json
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from d_fusion.errors import UserError


def _atomic(path, write):
    """Call write(tmp_path), then rename tmp_path to path."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    _atomic(path, write)


def read_json(path, what="file"):
    """JSON from `path`; a truncated or corrupt file is a UserError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {path} is corrupt or half-written ({error}); move it aside and rerun") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None


def write_image(path, image):
    """uint8 (H, W, 3) array -> PNG."""
    _atomic(path, lambda tmp: Image.fromarray(np.asarray(image)).save(tmp, format="PNG"))


def write_tensors(path, tensors):
    _atomic(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp))


def read_tensors(path):
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise UserError(f"tensor file {path} is unreadable ({error}); move it aside and rerun") from None


def image_name(index):
    return f"{index:05d}.png"


class EpochDir:
    def __init__(self, root):
        self.root = root

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    @property
    def images(self):
        return self.path("images")

    @property
    def prompts_file(self):
        return self.path("prompt.json")

    @property
    def trajectories(self):
        return self.path("trajectories")

    def image_path(self, index):
        return os.path.join(self.images, image_name(index))

    def trajectory_path(self, index):
        return os.path.join(self.trajectories, f"{index:05d}.safetensors")

    def published_prompts(self):
        """Prompts of the images published so far (index order); [] before the first batch."""
        if not os.path.exists(self.prompts_file):
            return []
        return read_json(self.prompts_file, "prompt list")

    def publish_samples(self, prompts):
        """Declare images 0..len(prompts)-1 complete: their PNGs and trajectories are on disk."""
        write_json(self.prompts_file, list(prompts))

    def save_trajectory(self, index, latents, log_probs, timesteps):
        write_tensors(self.trajectory_path(index), dict(latents=latents, log_probs=log_probs, timesteps=timesteps))

    def load_trajectory(self, index):
        return read_tensors(self.trajectory_path(index))


class ExperimentDir:
    def __init__(self, save_path, exp_name):
        if not exp_name:
            raise UserError("config.exp_name is empty: name the experiment, e.g. --config.exp_name test")
        self.root = os.path.join(save_path, exp_name)

    @property
    def log_file(self):
        return os.path.join(self.root, "run.log")

    def epoch(self, k):
        return EpochDir(os.path.join(self.root, f"epoch{k}"))
