"""The loop's stages (docs/METHOD.md §1): what they read back from an experiment."""

from d_fusion.datadir import ExperimentDir
from d_fusion.stages import score_history


def test_score_history_is_read_back_from_the_epochs_samples_then_targets(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "x")
    for k, (sampled, injected) in enumerate([([1.0, 2.0], [3.0]), ([4.0, 5.0], [6.0]), ([9.0, 9.0], [9.0])]):
        epoch_dir = experiment.epoch(k)
        epoch_dir.sampled.publish(["a", "b"])
        epoch_dir.sampled.write_scores(sampled)
        epoch_dir.injected.publish(["b"])
        epoch_dir.injected.write_scores(injected)
    assert score_history(experiment, 2) == {"a": [1.0, 4.0], "b": [2.0, 3.0, 5.0, 6.0]}
