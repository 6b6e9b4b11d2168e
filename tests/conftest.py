"""Shared fixtures: tiny real-architecture models, built once per test session."""

import os

# one thread per process, for the tests and the entry scripts they start: on 2 loaded cores,
# torch with 2 threads can run many times slower than with 1
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A folder with the tiny models (`sd/`, ...) written by `python -m d_fusion.tiny`'s code."""
    from d_fusion.tiny import build_tiny_models

    return build_tiny_models(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_sd(tiny_dir):
    """The tiny Stable Diffusion, loaded through the same path as SD 2.1 (fp32, CPU)."""
    from d_fusion.models import load_models

    return load_models(os.path.join(tiny_dir, "sd"), mixed_precision="no")


@pytest.fixture
def fresh_tiny_sd(tiny_dir):
    """A private copy of the tiny Stable Diffusion, for tests that change the UNet (LoRA, training)."""
    from d_fusion.models import load_models

    return load_models(os.path.join(tiny_dir, "sd"), mixed_precision="no")


def tiny_variant(variant, model, tiny_dir, tmp_path):
    """The config variant `variant`, pointed at the session's tiny models (`model`: its diffusion model's
    folder) and a fresh data folder."""
    from config.config import get_config

    config = get_config(variant)
    config.tiny_cache = tiny_dir
    config.pretrained.model = os.path.join(tiny_dir, model)
    config.eval.model = os.path.join(tiny_dir, "clip")
    config.save_path = str(tmp_path / "data")
    config.exp_name = "test"
    return config


@pytest.fixture
def tiny_config(tiny_dir, tmp_path):
    """The `tiny` config variant on the session's tiny models."""
    return tiny_variant("tiny", "sd", tiny_dir, tmp_path)


@pytest.fixture
def tiny_sd3_config(tiny_dir, tmp_path):
    """The `tiny_sd3` config variant on the session's tiny models."""
    return tiny_variant("tiny_sd3", "sd3", tiny_dir, tmp_path)


@pytest.fixture
def crash_on_call(monkeypatch):
    """crash_on_call(module, name, n): `module.name` raises KeyboardInterrupt (a kill) on its n-th call.

    Returns the list of calls so far (one entry per call); `monkeypatch.undo()` restores the function.
    """

    def patch(module, name, n):
        original, calls = getattr(module, name), []

        def crashing(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, crashing)
        return calls

    return patch


@pytest.fixture(scope="session")
def tiny_sd3_dir(tiny_dir):
    """The tiny SD 3.5 (diffusers format, no T5) that `tiny.build_tiny_models` writes (`tiny.build_tiny_sd3`)."""
    return os.path.join(tiny_dir, "sd3")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_dir):
    """The tiny SD 3.5, loaded through the same path as SD 3.5 (fp32, CPU)."""
    from d_fusion.sd3 import load_sd3_models

    return load_sd3_models(tiny_sd3_dir, mixed_precision="no")
