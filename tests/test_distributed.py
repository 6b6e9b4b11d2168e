"""`accelerate launch` runs: two CPU processes (gloo, started by torchrun as accelerate launch does) vs one.

The two-process run splits sampling, scoring, fusion and training; its epoch must hold the same
images, trajectories, scores and pairs as a one-process run, and after training both processes
must hold the same LoRA weights (their gradients are summed before each step).
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from d_fusion.datadir import CheckpointDir, ExperimentDir, copy_file, read_tensors
from d_fusion.experiment import run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 3 prompts x 4 samples (the first batch published by an earlier run, the other two sampled in one
# round), 3 scoring batches (a round with an idle process), 2 fusion chunks of 4 targets, 6 pairs
# trained in one optimizer step
SETTINGS = {
    "sample.num_steps": 4,
    "train.num_epochs": 1,
    "train.timestep_fraction": 0.5,
    "eval.batch_size": 4,
    "fusion.mask_images": "last",
}
PAIRS_PER_STEP = 6  # train.batch_size is per process
LAUNCH_TIMEOUT = 300  # seconds; the run takes about 30 s on 2 cores, a hang fails the test instead of the suite


def launch_two_processes(config, exp_name, log_file):
    options = {
        "tiny_cache": config.tiny_cache,
        "pretrained.model": config.pretrained.model,
        "eval.model": config.eval.model,
        "save_path": config.save_path,
        "exp_name": exp_name,
        "train.batch_size": PAIRS_PER_STEP // 2,
        **SETTINGS,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["tests/distributed_run.py", "--config", "config/config.py:tiny"]
    command += [f"--config.{name}={value}" for name, value in options.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    with open(log_file, "w") as log:
        launcher = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        returncode = launcher.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:  # a process waiting at a barrier forever: stop the launcher and its workers
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        returncode = "timed out"
    with open(log_file) as log:
        assert returncode == 0, f"{returncode}:\n{log.read()[-4000:]}"


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.fixture
def one_process_run(tiny_config):
    for name, value in SETTINGS.items():
        section, field = name.split(".")
        tiny_config[section][field] = value
    tiny_config.train.batch_size = PAIRS_PER_STEP
    tiny_config.exp_name = "one"
    run_experiment(tiny_config)
    return tiny_config


def publish_first_batch(source, destination, batch_size=4):
    """What a run that crashed after its first batch leaves: that batch's files and manifest."""
    for index in range(batch_size):
        copy_file(source.sampled.image_path(index), destination.sampled.image_path(index))
        copy_file(source.sampled.trajectory_path(index), destination.sampled.trajectory_path(index))
    destination.sampled.publish(source.sampled.published_prompts()[:batch_size])


@pytest.mark.distributed
def test_two_processes_make_the_same_epoch_and_weights(one_process_run, tmp_path):
    config = one_process_run
    one, two = ExperimentDir(config.save_path, "one"), ExperimentDir(config.save_path, "two")
    epoch_one, epoch_two = one.epoch(0), two.epoch(0)
    publish_first_batch(epoch_one, epoch_two)  # the two processes sample the other two batches in one round
    launch_two_processes(config, "two", tmp_path / "two.log")
    assert "epoch 0: reusing 4 published samples" in (tmp_path / "two.log").read_text()

    # sampling and fusion: the same files, bit for bit, published whole
    for set_one, set_two in zip(epoch_one.image_sets, epoch_two.image_sets):
        prompts = set_two.published_prompts()
        assert prompts == set_one.published_prompts() and len(prompts) in (12, 6)
        for index in range(len(prompts)):
            assert np.array_equal(pixels(set_one.image_path(index)), pixels(set_two.image_path(index))), index
        assert set_two.read_scores() == set_one.read_scores()
    for index in range(12):
        assert torch.equal(epoch_one.sampled.load_trajectories([index]).latents[0], epoch_two.sampled.load_trajectories([index]).latents[0])
    for target in range(6):
        latents = [epoch.injected.load_trajectories([target]).latents[0] for epoch in (epoch_one, epoch_two)]
        assert torch.equal(*latents)
    assert epoch_two.read_injected_map() == epoch_one.read_injected_map()

    # training: both processes hold the same LoRA weights, the main process's checkpoint has them, and
    # the step equals the one-process step over the same pairs (up to the order of the gradient sums)
    lora = [read_tensors(os.path.join(two.root, f"lora_process{r}", CheckpointDir.LORA_WEIGHTS)) for r in (0, 1)]
    checkpoint_one, checkpoint_two = (read_tensors(run.checkpoint(0).lora_weights) for run in (one, two))
    assert lora[0].keys() == lora[1].keys() == checkpoint_two.keys() == checkpoint_one.keys()
    assert all(value.abs().max() > 0 for name, value in checkpoint_one.items() if "lora.up" in name)  # B = 0 at first
    for name in lora[0]:
        assert torch.equal(lora[0][name], lora[1][name]), name
        assert torch.equal(lora[0][name], checkpoint_two[name]), name
        torch.testing.assert_close(checkpoint_two[name], checkpoint_one[name], rtol=1e-4, atol=1e-6)
    assert [m["epoch"] for m in two.read_metrics()] == [0] and two.is_finished()
    metrics_one, metrics_two = one.read_metrics()[0], two.read_metrics()[0]
    assert metrics_two["loss"] == pytest.approx(metrics_one["loss"], rel=1e-5)
