"""The data directory's file formats: atomic writes, and corrupt files named, never overwritten."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from d_fusion.datadir import ExperimentDir, atomic_folder, read_json, read_tensors, write_json, write_tensors
from d_fusion.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_writes_leave_only_the_finished_file(tmp_path):
    write_json(str(tmp_path / "a.json"), {"x": 1})
    write_tensors(str(tmp_path / "t.safetensors"), {"x": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "t.safetensors"]
    assert read_json(str(tmp_path / "a.json")) == {"x": 1}
    assert torch.equal(read_tensors(str(tmp_path / "t.safetensors"))["x"], torch.ones(2))


def test_half_written_files_are_named(tmp_path):
    (tmp_path / "half.json").write_text('{"scores": [0.1, 0.')
    with pytest.raises(UserError, match="half.json is corrupt"):
        read_json(str(tmp_path / "half.json"), "scores")
    (tmp_path / "half.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(UserError, match="half.safetensors is unreadable"):
        read_tensors(str(tmp_path / "half.safetensors"))


def test_scores_must_be_finite_numbers(tmp_path):
    scored = ExperimentDir(str(tmp_path), "x").epoch(0).injected
    for bad in ([0.1, float("nan")], [0.1, True]):
        write_json(scored.scores_file, {"count": 2, "mean": 0.1, "scores": bad})
        with pytest.raises(UserError, match="malformed"):
            scored.read_scores()


def test_a_corrupt_metrics_file_stops_training_records_without_losing_it(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "x")
    experiment.record_metrics({"epoch": 0, "loss": 0.7})
    experiment.record_metrics({"epoch": 1, "loss": 0.6})
    experiment.record_metrics({"epoch": 1, "loss": 0.5})  # a rerun of epoch 1 replaces its line
    assert [m["loss"] for m in experiment.read_metrics()] == [0.7, 0.5]

    with open(experiment.metrics_file, "a") as f:
        f.write('{"epoch": 2, "lo')
    before = open(experiment.metrics_file).read()
    with pytest.raises(UserError, match="metrics.jsonl is corrupt"):
        experiment.record_metrics({"epoch": 3, "loss": 0.4})
    assert open(experiment.metrics_file).read() == before


def test_binary_garbage_is_the_same_damaged_file_error_as_truncated_json(tmp_path):
    (tmp_path / "prompt.json").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(UserError, match="prompt.json is corrupt or half-written"):
        read_json(str(tmp_path / "prompt.json"), "prompt list")
    experiment = ExperimentDir(str(tmp_path), "x")
    os.makedirs(experiment.root)
    with open(experiment.metrics_file, "wb") as f:
        f.write(b'{"epoch": 0}\n\xff\xfe\x81\n')
    with pytest.raises(UserError, match="metrics.jsonl is corrupt"):
        experiment.read_metrics()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_published_files_and_folders_follow_the_umask(tmp_path, umask_022):
    write_json(str(tmp_path / "a.json"), {"x": 1})
    write_tensors(str(tmp_path / "t.safetensors"), {"x": torch.ones(2)})
    with atomic_folder(str(tmp_path / "checkpoint_0")) as scratch:
        write_json(os.path.join(scratch, "state.json"), {})
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in os.listdir(tmp_path)}
    assert modes == {"a.json": 0o644, "t.safetensors": 0o644, "checkpoint_0": 0o755}
    os.umask(0o077)
    write_json(str(tmp_path / "private.json"), {})
    assert stat.S_IMODE(os.stat(tmp_path / "private.json").st_mode) == 0o600


def test_a_second_holder_of_a_role_is_refused_with_the_first_ones_pid(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "x")
    with experiment.hold("sampler"):
        assert experiment.in_use("sampler") and not experiment.in_use("scorer")
        with pytest.raises(UserError, match=f"process {os.getpid()} already runs as the sampler \\(run_sample.py\\)"):
            with experiment.hold("sampler"):
                pass
        with experiment.hold("scorer"):  # the other role is free
            assert experiment.in_use("scorer")
    assert not experiment.in_use("sampler")
    with experiment.hold("sampler"):  # released at the end of the block
        pass


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SAMPLER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        experiment = ExperimentDir(str(tmp_path), "x")
        with pytest.raises(UserError, match=f"process {holder.pid} already runs as the sampler"):
            with experiment.hold("sampler"):
                pass
    finally:
        holder.kill()  # kill -9: no clean-up runs in the holder
        holder.wait()
    with experiment.hold("sampler"):
        assert experiment.in_use("sampler")


HOLD_SAMPLER = """
import sys, time
from d_fusion.datadir import ExperimentDir
with ExperimentDir(sys.argv[1], "x").hold("sampler"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", ".", ".."])
def test_exp_names_that_leave_save_path_are_refused(tmp_path, name):
    with pytest.raises(UserError, match="is not a folder name"):
        ExperimentDir(str(tmp_path), name)


def test_scratch_left_by_a_kill_is_cleared_where_no_other_process_writes(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "x")
    epoch = experiment.epoch(0)
    image_scratch, eval_scratch = epoch.path("images", ".tmp-a.png"), epoch.path("eval", ".tmp-b.json")
    metrics_scratch = os.path.join(experiment.root, ".tmp-c.jsonl")
    report_scratch = os.path.join(experiment.root, "report", ".tmp-d.png")
    for path in (image_scratch, eval_scratch, metrics_scratch, report_scratch):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    checkpoint_scratch = os.path.join(experiment.checkpoints, ".tmp-e")
    os.makedirs(os.path.join(checkpoint_scratch, "inside"))
    replaced = os.path.join(experiment.checkpoints, ".old-f", "folder")  # maybe the only copy of a checkpoint
    os.makedirs(replaced)
    write_json(epoch.path("images", "kept.json"), {})

    with experiment.hold("scorer"):  # a running scorer's scratch under eval/ is left alone
        removed = experiment.clear_sampler_scratch()
    assert sorted(removed) == sorted([image_scratch, metrics_scratch, checkpoint_scratch])
    assert all(map(os.path.exists, (eval_scratch, report_scratch, epoch.path("images", "kept.json"), replaced)))
    with experiment.hold("sampler"):  # and the sampler's, by the scorer
        assert experiment.clear_scorer_scratch() == []
    assert experiment.clear_scorer_scratch() == [eval_scratch]
