"""Settings: domains checked at start-up; an experiment's settings recorded and compared on reruns."""

import os
import subprocess

import pytest

from config.config import RERUN_MAY_CHANGE, get_config
from d_fusion.datadir import ExperimentDir, read_json, write_json
from d_fusion.errors import UserError
from d_fusion.settings import (
    DOMAINS,
    changed_settings,
    check_settings,
    compare_scoring,
    flatten,
    may_change,
    record_or_compare,
)


def test_every_domain_is_a_setting_and_the_defaults_are_inside():
    assert [field for field in DOMAINS if field not in flatten(get_config().to_dict())] == []
    check_settings(get_config())
    config = get_config()
    config.train.adam_beta2 = 1.0
    with pytest.raises(UserError, match=r"config.train.adam_beta2 = 1.0: it must be a number in \[0, 1\)"):
        check_settings(config)
    config = get_config()
    config.train.timestep_fraction = 0.0
    with pytest.raises(UserError, match=r"config.train.timestep_fraction = 0.0: it must be a number in \(0, 1\]"):
        check_settings(config)


def test_every_setting_that_may_change_is_a_setting():
    fields = flatten(get_config().to_dict())
    blocks = {name.rpartition(".")[0] for name in fields}
    assert [n for n in RERUN_MAY_CHANGE if n not in fields and n.removesuffix(".*") not in blocks] == []


def test_the_readme_documents_every_setting_that_may_change():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    assert [name for name in RERUN_MAY_CHANGE if f"`{name}`" not in readme] == []


def test_may_change_covers_whole_blocks_and_nothing_else():
    assert may_change("report.thumbnail") and may_change("train.num_epochs") and may_change("heldout.batch_size")
    assert not may_change("train.learning_rate") and not may_change("seed") and not may_change("reporting")
    assert not may_change("eval.reward") and not may_change("train.preferred")


def test_the_first_start_records_config_versions_and_git_commit(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "x")
    record_or_compare(get_config(), experiment)
    record = read_json(experiment.config_file)
    assert record["config"]["sample"]["guidance_scale"] == 5.0 and record["config"]["item_idx"] == [1, 3]
    assert record["versions"]["torch"] and record["versions"]["diffusers"] and record["versions"]["python"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == (head or None)


def test_a_rerun_lists_every_changed_setting_that_shapes_results(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "x")
    record_or_compare(get_config(), experiment)
    config = get_config()
    config.sample.eta, config.eval.reward, config.train.preferred = 0.5, "shapes", "reference"
    config.train.num_epochs, config.report.thumbnail, config.eval.inline = 40, 64, True  # these may change
    with pytest.raises(UserError) as error:
        record_or_compare(config, experiment)
    listed = str(error.value)
    expected = "eval.reward: 'clip' -> 'shapes'; sample.eta: 1.0 -> 0.5; train.preferred: 'target' -> 'reference'."
    assert expected in listed
    assert "num_epochs" not in listed and "thumbnail" not in listed and "inline" not in listed


def test_the_scorer_is_held_to_the_recorded_reward_and_its_models(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "x")
    compare_scoring(get_config(), experiment)  # nothing recorded yet: nothing to compare
    record_or_compare(get_config(), experiment)
    config = get_config()
    config.sample.eta, config.eval.batch_size = 0.5, 2  # not the scorer's business / may change
    compare_scoring(config, experiment)
    config.eval.reward, config.eval.pickscore_model = "clip:1,pickscore:1", "my/PickScore"
    with pytest.raises(UserError) as error:
        compare_scoring(config, experiment)
    listed = str(error.value)
    assert "eval.pickscore_model: 'yuvalkirstain/PickScore_v1' -> 'my/PickScore'; eval.reward: 'clip' -> " in listed
    assert "eta" not in listed


def test_fields_the_record_lacks_are_not_compared_and_a_damaged_record_is_named(tmp_path):
    recorded = get_config().to_dict()
    del recorded["fusion"]["base_masks"]  # a field added to the project after the experiment started
    current = get_config().to_dict()
    current["fusion"]["base_masks"] = True
    assert changed_settings(recorded, current) == []

    experiment = ExperimentDir(str(tmp_path), "x")
    write_json(experiment.config_file, ["not", "a", "record"])
    with pytest.raises(UserError, match="config.json is damaged"):
        record_or_compare(get_config(), experiment)
