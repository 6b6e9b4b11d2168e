import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from d_fusion import evaluator, stages
from d_fusion.datadir import ExperimentDir, read_image, read_json, write_image
from d_fusion.errors import UserError
from d_fusion.evaluator import run_scorer
from d_fusion.scoring import load_scorer
from d_fusion.stages import ScoreCollector, score_pending

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a cat playing chess"] * 4 + ["a dog driving a car"] * 4  # 8 images, two prompts


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return load_scorer(os.path.join(tiny_dir, "clip"))


class CountingScorer:
    """The real scorer, counting how often each image index is scored; optionally dies after `fail_after` batches."""

    def __init__(self, scorer, fail_after=None):
        self.scorer, self.fail_after, self.batches, self.scored = scorer, fail_after, 0, []
        self.name = scorer.name

    def score(self, images, prompts):
        if self.batches == self.fail_after:
            raise RuntimeError("killed")
        self.batches += 1
        self.scored.append(len(images))
        return self.scorer.score(images, prompts)


def draw_images(image_set, count, seed=0):
    rng = np.random.default_rng(seed)
    for index in range(count):
        write_image(image_set.image_path(index), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture
def experiment(tmp_path):
    """Epoch 0 with 8 images drawn and published."""
    experiment = ExperimentDir(str(tmp_path), "test")
    sampled = experiment.epoch(0).sampled
    draw_images(sampled, len(PROMPTS))
    sampled.publish(PROMPTS)
    return experiment


def test_scores_only_listed_images_in_order_and_each_once(experiment, scorer):
    sampled = experiment.epoch(0).sampled
    expected = scorer.score([read_image(sampled.image_path(i)) for i in range(8)], PROMPTS)
    sampled.publish(PROMPTS[:3])  # the manifest lists 3 images; the other PNGs are not published yet
    with open(sampled.image_path(5), "wb") as f:
        f.write(b"\x89PNG half-written")
    counting = CountingScorer(scorer)
    assert score_pending(counting, experiment, batch_size=2) == 3
    assert sampled.read_scores() == pytest.approx(expected[:3], abs=1e-5)

    draw_images(sampled, len(PROMPTS))  # the sampler finishes its batch and publishes it
    sampled.publish(PROMPTS)
    assert score_pending(counting, experiment, batch_size=2) == 5
    assert score_pending(counting, experiment, batch_size=2) == 0
    assert counting.scored == [2, 1, 2, 2, 2]  # every image once, but the chunk [2, 3], scored again whole
    saved = read_json(sampled.scores_file)
    assert saved["count"] == 8 and saved["scores"] == pytest.approx(expected, abs=1e-5)
    assert saved["mean"] == pytest.approx(np.mean(expected))


def test_scores_do_not_depend_on_when_images_were_published(tmp_path, experiment, scorer):
    at_once = ExperimentDir(str(tmp_path), "at_once").epoch(0).sampled
    draw_images(at_once, len(PROMPTS))
    at_once.publish(PROMPTS)
    score_pending(scorer, ExperimentDir(str(tmp_path), "at_once"), batch_size=4)

    sampled = experiment.epoch(0).sampled
    for listed in (1, 3, 6, 8):  # the scorer polls while the sampler publishes
        sampled.publish(PROMPTS[:listed])
        score_pending(scorer, experiment, batch_size=4)
    assert sampled.read_scores() == at_once.read_scores()  # bit for bit: the same images met in each batch


def test_killed_scorer_resumes_where_its_last_saved_batch_ended(experiment, scorer):
    sampled = experiment.epoch(0).sampled
    dying = CountingScorer(scorer, fail_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        score_pending(dying, experiment, batch_size=3)
    assert len(sampled.read_scores()) == 6

    restarted = CountingScorer(scorer)
    score_pending(restarted, experiment, batch_size=3)
    assert restarted.scored == [2]  # only the two images the dead scorer had not saved

    uninterrupted = ExperimentDir(os.path.dirname(experiment.root), "copy")
    draw_images(uninterrupted.epoch(0).sampled, len(PROMPTS))
    uninterrupted.epoch(0).sampled.publish(PROMPTS)
    score_pending(scorer, uninterrupted, batch_size=3)
    assert sampled.read_scores() == pytest.approx(uninterrupted.epoch(0).sampled.read_scores(), abs=1e-6)


@pytest.mark.parametrize("which", ["scores", "manifest", "too many scores"])
def test_corrupt_files_are_user_errors_naming_the_file_and_nothing_is_overwritten(experiment, scorer, which):
    sampled = experiment.epoch(0).sampled
    score_pending(scorer, experiment, batch_size=8)
    path = {"scores": sampled.scores_file, "manifest": sampled.prompts_file, "too many scores": sampled.prompts_file}
    path = path[which]
    if which == "too many scores":  # the images were redrawn by a run with fewer samples
        sampled.publish(PROMPTS[:4])
    else:
        with open(path, "r+") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = {p: open(p, "rb").read() for p in (sampled.scores_file, sampled.prompts_file)}
    with pytest.raises(UserError, match=os.path.basename(path)):
        score_pending(scorer, experiment, batch_size=8)
    with pytest.raises(UserError, match=os.path.basename(path)):
        ScoreCollector(experiment_config(inline=True), experiment).collect(0, sampled)
    assert before == {p: open(p, "rb").read() for p in before}


def test_prompt_history_runs_over_the_epochs(experiment, scorer):
    score_pending(scorer, experiment, batch_size=8)
    epoch1 = experiment.epoch(1)
    draw_images(epoch1.sampled, len(PROMPTS), seed=1)
    epoch1.sampled.publish(PROMPTS)
    score_pending(scorer, experiment, batch_size=8)

    history = read_json(epoch1.prompt_history_file)
    scores0, scores1 = experiment.epoch(0).sampled.read_scores(), epoch1.sampled.read_scores()
    assert sorted(history) == sorted(set(PROMPTS))
    dog = history["a dog driving a car"]
    assert [entry["epoch"] for entry in dog] == [0, 1]
    assert dog[0]["scores"] == scores0[4:] and dog[1]["scores"] == scores1[4:]
    assert dog[1]["mean"] == pytest.approx(np.mean(scores1[4:]))
    assert [entry["epoch"] for entry in read_json(experiment.epoch(0).prompt_history_file)["a cat playing chess"]] == [0]


def experiment_config(inline, **eval_fields):
    from config.config import get_config

    config = get_config("tiny")
    config.exp_name = "test"
    config.eval.inline = inline
    config.eval.poll_interval = 0.02
    config.eval.update(eval_fields)
    return config


def test_inline_collect_scores_missing_images_and_reuses_saved_ones(experiment, scorer, monkeypatch):
    loads = []
    monkeypatch.setattr(stages, "load_scorer_from_config", lambda config: loads.append(1) or scorer)
    sampled = experiment.epoch(0).sampled
    score_new_half = CountingScorer(scorer, fail_after=1)
    with pytest.raises(RuntimeError):
        score_pending(score_new_half, experiment, batch_size=4)  # an earlier run scored 4 of 8

    scores = ScoreCollector(experiment_config(inline=True), experiment).collect(0, sampled)
    assert len(scores) == 8 and scores == sampled.read_scores() and loads == [1]
    # a restarted sampler finds every score saved: it does not even load the scorer
    assert ScoreCollector(experiment_config(inline=True), experiment).collect(0, sampled) == scores
    assert loads == [1]


def test_scores_files_record_their_reward_and_another_reward_does_not_continue_them(experiment, scorer):
    sampled = experiment.epoch(0).sampled
    with pytest.raises(RuntimeError):
        score_pending(CountingScorer(scorer, fail_after=1), experiment, batch_size=4)  # 4 of 8 scored by clip
    assert read_json(sampled.scores_file)["reward"] == "clip" == sampled.scored_by()
    other = CountingScorer(scorer)
    other.name = "clip:1,pickscore:0.5"
    with pytest.raises(UserError, match="scores of the reward 'clip', but this run scores with 'clip:1,pickscore:0.5'"):
        score_pending(other, experiment, batch_size=4)
    assert other.scored == [] and len(sampled.read_scores()) == 4
    config = experiment_config(inline=True)
    config.eval.reward = "pickscore"  # a sampler with another reward refuses the scores too
    with pytest.raises(UserError, match="scores of the reward 'clip', but this run scores with 'pickscore'"):
        ScoreCollector(config, experiment).collect(0, sampled)


def test_waiting_sampler_says_once_how_to_start_the_scorer(experiment, scorer, caplog):
    sampled = experiment.epoch(0).sampled
    late_scorer = threading.Timer(0.5, lambda: score_pending(scorer, experiment, batch_size=8))
    late_scorer.start()
    with caplog.at_level(logging.INFO, logger="d_fusion.stages"):
        scores = ScoreCollector(experiment_config(inline=False, no_scorer_timeout=0.1), experiment).collect(0, sampled)
    late_scorer.join()
    assert len(scores) == 8 and scores == sampled.read_scores()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "run_eval.py --config config/config.py --config.exp_name test" in warnings[0]
    assert "--config.eval.inline=True" in warnings[0]


def test_run_eval_waits_for_the_experiment_and_exits_when_it_is_finished(tmp_path, scorer, monkeypatch):
    monkeypatch.setattr(evaluator, "load_scorer_from_config", lambda config: scorer)
    config = experiment_config(inline=False, exit_when_finished=True)
    config.save_path = str(tmp_path)
    watcher = threading.Thread(target=run_scorer, args=(config,))
    watcher.start()  # before data/test/ exists

    experiment = ExperimentDir(str(tmp_path), "test")
    for epoch in (0, 1):
        sampled = experiment.epoch(epoch).sampled
        draw_images(sampled, len(PROMPTS), seed=epoch)
        sampled.publish(PROMPTS)
    assert watcher.is_alive()
    experiment.mark_finished(2)
    watcher.join(timeout=60)
    assert not watcher.is_alive()
    assert [len(experiment.epoch(k).sampled.read_scores()) for k in (0, 1)] == [8, 8]
    with open(experiment.eval_log_file) as f:  # run_eval.py's own log
        log_text = f.read()
    assert "watching" in log_text and "epoch 1 images: scored 0-7" in log_text


def test_a_second_scorer_is_refused_at_once(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(evaluator, "load_scorer_from_config", lambda config: loads.append(1))
    config = experiment_config(inline=False)
    config.save_path = str(tmp_path)
    with ExperimentDir(str(tmp_path), "test").hold("scorer"):
        with pytest.raises(UserError, match=f"process {os.getpid()} already runs as the scorer \\(run_eval.py\\)"):
            run_scorer(config)
    assert loads == []


def test_the_scorer_clears_scratch_under_eval_when_no_sampler_runs(tmp_path, scorer, monkeypatch):
    monkeypatch.setattr(evaluator, "load_scorer_from_config", lambda config: scorer)
    config = experiment_config(inline=False, exit_when_finished=True)
    config.save_path = str(tmp_path)
    experiment = ExperimentDir(str(tmp_path), "test")
    left = experiment.epoch(0).path("eval", ".tmp-scores.json")
    os.makedirs(os.path.dirname(left))
    open(left, "w").close()
    experiment.mark_finished(1)
    run_scorer(config)
    assert not os.path.exists(left)


def test_a_scorer_on_a_finished_experiment_says_so(tmp_path, scorer, monkeypatch):
    monkeypatch.setattr(evaluator, "load_scorer_from_config", lambda config: scorer)
    config = experiment_config(inline=False)
    config.save_path = str(tmp_path)
    experiment = ExperimentDir(str(tmp_path), "test")
    draw_images(experiment.epoch(0).sampled, len(PROMPTS))
    experiment.epoch(0).sampled.publish(PROMPTS)
    experiment.mark_finished(1)

    def ctrl_c(seconds):  # at the scorer's first wait for new images (not the 0 s pause after a batch)
        if seconds:
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluator.time, "sleep", ctrl_c)
    run_scorer(config)
    with open(experiment.eval_log_file) as f:
        log_text = f.read()
    assert "epoch 0 images: scored 0-7" in log_text
    assert f"{experiment.root} is finished (finished.json) and every image is scored: nothing to do" in log_text


def test_run_eval_logs_to_stdout_and_eval_log_and_a_second_one_stops_at_once(tiny_dir, tmp_path):
    command = [
        sys.executable, "run_eval.py", "--config", "config/config.py:tiny", "--config.exp_name", "x",
        "--config.save_path", str(tmp_path), "--config.eval.model", os.path.join(tiny_dir, "clip"),
    ]  # fmt: skip
    eval_log = ExperimentDir(str(tmp_path), "x").eval_log_file
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (os.path.exists(eval_log) and "watching" in open(eval_log).read()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"process {first.pid} already runs as the scorer (run_eval.py)" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    assert "watching" in out and "watching" not in err  # log lines on stdout, as README's `> log` expects
