"""The sampler and the scorer as two real processes on the tiny models: hand-over, kills, restarts."""

import os
import signal
import subprocess
import sys
import time

import pytest

from d_fusion.datadir import ExperimentDir
from d_fusion.stages import score_pending
from d_fusion.scoring import load_scorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 12  # tiny config: 3 prompts x 4 samples


class Process:
    def __init__(self, script, options, log_dir, name):
        self.log_file = os.path.join(log_dir, name + ".log")
        with open(self.log_file, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, script, "--config", "config/config.py:tiny", *options],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, HF_HUB_OFFLINE="1"),
            )

    def log(self):
        with open(self.log_file) as f:
            return f.read()

    def wait_until(self, condition, timeout=240):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited early:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def stop(self, sig):
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def wait(self, timeout=600):
        rc = self.process.wait(timeout=timeout)
        assert rc == 0, self.log()[-3000:]


def count(read):
    try:
        return len(read())
    except Exception:  # a file being written is never half-read (atomic renames), but be safe
        return -1


@pytest.fixture
def start(tmp_path):
    """start(script, options, name) -> Process; whatever still runs at the end of the test is killed."""
    started = []
    yield lambda script, options, name: started.append(Process(script, options, str(tmp_path), name)) or started[-1]
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def test_sampler_and_scorer_processes_hand_over_survive_kills_and_reuse_work(tiny_dir, tmp_path, start):
    save_path = str(tmp_path / "data")
    common = [
        "--config.exp_name", "handover",
        "--config.save_path", save_path,
        "--config.pretrained.model", os.path.join(tiny_dir, "sd"),
        "--config.eval.model", os.path.join(tiny_dir, "clip"),
        "--config.eval.poll_interval", "0.2",
    ]  # fmt: skip
    sampler_options = common + ["--config.eval.inline=False", "--config.eval.no_scorer_timeout", "1"]
    sampler_options += ["--config.train.num_epochs", "1", "--config.use_lora=False"]  # no training: not tested here
    sampled = ExperimentDir(save_path, "handover").epoch(0).sampled

    # 1. a slow scorer (one image, then a 2 s pause) is killed in the middle of the epoch, after the
    #    sampler has published every image; the sampler waits, says how to start a scorer, and is killed
    sampler = start("run_sample.py", sampler_options, "sampler1")
    slow = ["--config.eval.batch_size", "1", "--config.eval.debug_batch_delay", "2"]
    scorer = start("run_eval.py", common + slow, "scorer1")
    scorer.wait_until(lambda: count(sampled.published_prompts) == NUM_IMAGES and count(sampled.read_scores) >= 1)
    scorer.stop(signal.SIGKILL)
    killed_at = len(sampled.read_scores())
    assert 1 <= killed_at < NUM_IMAGES
    sampler.wait_until(lambda: "--config.eval.inline=True" in sampler.log())
    assert "run_eval.py --config config/config.py:tiny --config.exp_name handover" in sampler.log()  # its --config too
    sampler.stop(signal.SIGKILL)
    published = {path: os.stat(path).st_mtime_ns for path in map(sampled.image_path, range(NUM_IMAGES))}

    # 2. both restarted: the sampler reuses its samples, the scorer goes on from its last saved batch
    scorer = start("run_eval.py", common + ["--config.eval.batch_size", "2"], "scorer2")
    sampler = start("run_sample.py", sampler_options, "sampler2")
    sampler.wait()
    assert f"reusing {NUM_IMAGES} published samples" in sampler.log()
    assert {path: os.stat(path).st_mtime_ns for path in published} == published
    assert os.path.exists(ExperimentDir(save_path, "handover").finished_file)
    assert scorer.stop(signal.SIGINT) == 0  # Ctrl-C: a clean exit
    assert "Traceback" not in scorer.log()
    # it goes on from the chunk of 2 (its batch size) that holds the first image without a score
    resumed_at = killed_at // 2 * 2
    assert f"epoch 0 images: scored {resumed_at}-" in scorer.log()
    assert resumed_at == 0 or "epoch 0 images: scored 0-" not in scorer.log()
    injected = ExperimentDir(save_path, "handover").epoch(0).injected  # the targets were handed over too
    assert 0 < len(injected.read_scores()) == len(injected.published_prompts())

    # the scores equal an uninterrupted in-process scoring of the same images
    scores = sampled.read_scores()
    uninterrupted = ExperimentDir(save_path, "handover")
    os.rename(sampled.scores_file, sampled.scores_file + ".done")
    score_pending(load_scorer(os.path.join(tiny_dir, "clip")), uninterrupted, batch_size=NUM_IMAGES)
    assert scores == pytest.approx(sampled.read_scores(), abs=1e-5)
