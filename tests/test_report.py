"""The report: every image it links exists, its numbers are the score files', it redraws only what changed."""

import os
import shutil
import subprocess
import time
from html.parser import HTMLParser

import numpy as np
import pytest

from d_fusion.datadir import ExperimentDir, read_image, write_image
from d_fusion.errors import UserError
from d_fusion.experiment import run_experiment
from d_fusion.heldout import comparison_table
from d_fusion.pairing import pair_samples
from d_fusion.report import build_report

PROMPTS = ["a cat playing chess", "a dog eating a sandwich"]
PER_PROMPT = 4
SIDE = 64
CHROMIUM = "/usr/bin/chromium"


def picture(rng):
    """A smooth random colour picture (SIDE, SIDE, 3) uint8."""
    ramp = np.linspace(0, 1, SIDE)
    colours = rng.uniform(0, 255, size=(2, 3))
    return (ramp[:, None, None] * colours[0] + ramp[None, :, None] * (255 - colours[1])).clip(0, 255).astype(np.uint8)


def square_mask(low, high):
    mask = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    mask[low:high, low:high] = 255
    return mask


def sample(epoch_dir, rng, scored):
    """Every sample of the epoch published, the first `scored` scored; returns (prompts, scores)."""
    prompts = [p for p in PROMPTS for _ in range(PER_PROMPT)]
    for i in range(len(prompts)):
        write_image(epoch_dir.sampled.image_path(i), picture(rng))
    epoch_dir.sampled.publish(prompts)
    scores = [float(s) for s in rng.uniform(0.2, 0.35, size=len(prompts))]
    epoch_dir.sampled.write_scores(scores[:scored])
    return prompts, scores


def fuse(epoch_dir, rng, prompts, scores, published, scored):
    """The pairs' map and masks (items 0 and 1, steps 0-1), the first `published` targets, `scored` scored."""
    pairs = pair_samples(prompts, scores, PER_PROMPT)
    epoch_dir.write_injected_map([(p.base, p.reference) for p in pairs])
    for p in pairs:
        for step in range(2):
            write_image(epoch_dir.mask_path(p.reference, 0, step), square_mask(8, 24 + 8 * step))
            write_image(epoch_dir.mask_path(p.reference, 1, step), square_mask(40, 56))
    for p in pairs[:published]:
        write_image(epoch_dir.injected.image_path(p.target), picture(rng))
    epoch_dir.injected.publish([prompts[p.base] for p in pairs[:published]])
    target_scores = [float(s) for s in rng.uniform(0.2, 0.35, size=len(pairs))]
    epoch_dir.injected.write_scores(target_scores[:scored])
    return pairs


def evaluate_heldout(experiment, rng):
    results = experiment.heldout("template1_test")
    samples = [p for p in PROMPTS for _ in range(2)]
    scores = {}
    for name in ("base", "checkpoint_0"):
        model = results.model(name)
        for i in range(len(samples)):
            write_image(model.images.image_path(i), picture(rng))
        model.images.publish(samples)
        scores[name] = [float(s) for s in rng.uniform(0.2, 0.35, size=len(samples))]
        model.scored("clip").write_scores(scores[name], "clip")
        model.write_settings(dict(sampling=dict(seed=42), scores=dict(clip=["clip", None, "tiny", ""])))
    diversities = {name: {p: 0.1 for p in PROMPTS} for name in scores}
    results.write_table(comparison_table(samples, dict(clip=scores), diversities), ["clip"])


@pytest.fixture
def run(tmp_path):
    """A format-true run in progress: epoch 0 done and trained, epoch 1 being fused, epoch 2 being sampled."""
    rng = np.random.default_rng(0)
    experiment = ExperimentDir(str(tmp_path / "data"), "test")
    prompts, scores = sample(experiment.epoch(0), rng, scored=8)
    fuse(experiment.epoch(0), rng, prompts, scores, published=4, scored=4)
    experiment.record_metrics(dict(epoch=0, loss=0.69, accuracy=0.5, lr=1e-4))
    prompts, scores = sample(experiment.epoch(1), rng, scored=8)
    fuse(experiment.epoch(1), rng, prompts, scores, published=2, scored=1)
    sample(experiment.epoch(2), rng, scored=3)
    evaluate_heldout(experiment, rng)
    return experiment


class Page(HTMLParser):
    """The page's linked files and its score spans."""

    def __init__(self, text):
        super().__init__()
        self.links, self.scores = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" or (tag == "a" and not attrs["href"].startswith("#")):
            self.links.append((attrs.get("src") or attrs["href"]).split("?")[0])
        if tag == "span" and "data-kind" in attrs:
            self.scores.append(attrs)


def page_of(experiment):
    with open(build_report(experiment)) as f:
        return Page(f.read())


def report_pictures(experiment):
    root = experiment.report.root
    return {
        os.path.relpath(os.path.join(folder, name), root): os.path.getmtime(os.path.join(folder, name))
        for folder, _, names in os.walk(root)
        for name in names
        if name.endswith(".png")
    }


def check_links_and_scores(experiment, page):
    """Every linked file exists and every shown score is the score files'; returns {(epoch, kind): indices}."""
    root = experiment.report.root
    assert page.links and all(os.path.isfile(os.path.join(root, link)) for link in page.links)
    shown = {}
    for span in page.scores:
        epoch_dir = experiment.epoch(int(span["data-epoch"]))
        index, kind = int(span["data-index"]), span["data-kind"]
        if kind == "delta":
            base, _ = epoch_dir.read_injected_map()[index]
            targets = epoch_dir.injected.read_scores()
            truth = targets[index] - epoch_dir.sampled.read_scores()[base] if index < len(targets) else None
        else:
            scores = (epoch_dir.sampled if kind == "images" else epoch_dir.injected).read_scores()
            truth = scores[index] if index < len(scores) else None
        assert (float(span["data-score"]) if "data-score" in span else None) == truth, span
        shown.setdefault((int(span["data-epoch"]), kind), set()).add(index)
    return shown


def test_every_link_exists_and_every_number_is_the_score_files(run):
    page = page_of(run)
    shown = check_links_and_scores(run, page)
    for name in ("epoch0/images/00000.png", "epoch2/images/00007.png", "report/curves_clip.png"):
        assert os.path.relpath(os.path.join(run.root, name), run.report.root) in page.links
    assert shown[(0, "injected_images")] == set(range(4)) and shown[(1, "delta")] == set(range(4))
    assert shown[(2, "images")] == set(range(8))  # before fusion: every published sample

    report = run.report
    assert os.path.isfile(report.epoch_grid(0)) and os.path.isfile(report.epoch_grid(1))
    assert not os.path.exists(report.epoch_grid(2))
    assert all(os.path.isfile(report.curves(name)) for name in ("clip", "training", "heldout"))

    # the overlay is the target tinted red exactly inside the union of the reference's last-step masks
    reference = run.epoch(0).read_injected_map()[0][1]
    target = np.asarray(read_image(run.epoch(0).injected.image_path(0))).astype(int)
    overlay = np.asarray(read_image(report.overlay(0, 0))).astype(int)
    inside = np.zeros((SIDE, SIDE), dtype=bool)
    inside[8:32, 8:32] = inside[40:56, 40:56] = True  # step 1 of item 0, and item 1
    assert len(run.epoch(0).saved_masks(reference)) == 2
    assert np.array_equal(overlay[~inside], target[~inside])
    assert (overlay[inside][:, 0] >= target[inside][:, 0]).all() and (overlay[inside] != target[inside]).any()


def test_rerun_redraws_only_what_changed(run):
    page_of(run)
    before = report_pictures(run)
    page_of(run)
    assert report_pictures(run) == before

    # epoch 1's third target (no masks: no overlay): its PNG was on disk before the last drawing,
    # its publication comes after
    epoch_dir = run.epoch(1)
    _, reference = epoch_dir.read_injected_map()[2]
    for steps in epoch_dir.saved_masks(reference).values():
        for path in steps.values():
            os.remove(path)
    write_image(epoch_dir.injected.image_path(2), picture(np.random.default_rng(2)))
    epoch_dir.injected.write_scores(epoch_dir.injected.read_scores())  # the grid is redrawn after the PNG
    page_of(run)
    drawn = report_pictures(run)["epoch1/grid.png"]
    time.sleep(0.01)
    epoch_dir.injected.publish(epoch_dir.injected.published_prompts() + [epoch_dir.sampled.published_prompts()[4]])
    page_of(run)
    assert report_pictures(run)["epoch1/grid.png"] > drawn > before["epoch1/grid.png"]

    # epoch 1's fusion and scoring go on; epoch 0 and the training curve stay as they were
    prompts, scores = epoch_dir.sampled.published_prompts(), epoch_dir.sampled.read_scores()
    fuse(epoch_dir, np.random.default_rng(1), prompts, scores, published=4, scored=4)
    page = page_of(run)
    after = report_pictures(run)
    assert after["epoch1/grid.png"] > before["epoch1/grid.png"] and after["curves_clip.png"] > before["curves_clip.png"]
    for name in ("epoch0/grid.png", "epoch0/overlay_00000.png", "curves_training.png", "curves_heldout.png"):
        assert after[name] == before[name]
    assert "epoch1/overlay_00003.png" in after
    assert sum(s["data-kind"] == "injected_images" and "data-score" in s for s in page.scores) == 8


def test_a_new_run_and_a_missing_folder(tmp_path):
    experiment = ExperimentDir(str(tmp_path), "new")
    with pytest.raises(UserError, match="exp_name"):
        build_report(experiment)
    os.makedirs(experiment.epoch(0).root)  # the sampler has just started
    text = open(build_report(experiment)).read()
    assert "No scores yet" in text and "No training metrics yet" in text and "Epoch 0" in text


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_report(run, tmp_path):
    index = build_report(run)
    screenshot = tmp_path / "page.png"
    flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
    flags += " --disable-component-update --disable-sync --hide-scrollbars --window-size=1200,900"
    command = [CHROMIUM, *flags.split(), f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}"]
    subprocess.run([*command, "file://" + os.path.abspath(index)], capture_output=True, timeout=120, check=False)
    assert screenshot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(read_image(str(screenshot)), dtype=float)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 20  # text, curves and pictures, not a blank page
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_the_sampler_updates_the_report_of_a_tiny_run(tiny_config):
    config = tiny_config
    config.prompt_file = config.item_idx_file = config.mask_thr_file = ""
    config.prompt, config.item_idx, config.mask_thr = "a cat eating a sandwich", [1, 4], 0.02
    config.sample.num_steps, config.inject_t = 3, "0-2,0-2,0-2,0-2,0-2,"
    config.train.num_epochs = 1
    config.report.each_epoch, config.report.thumbnail = True, 64
    run_experiment(config)

    experiment = ExperimentDir(config.save_path, config.exp_name)
    with open(experiment.report.index_html) as f:
        text = f.read()
    assert "Run finished" in text
    shown = check_links_and_scores(experiment, Page(text))
    pairs = experiment.epoch(0).read_injected_map()
    assert shown[(0, "injected_images")] == {0, 1} and shown[(0, "images")] == {i for pair in pairs for i in pair}
    assert os.path.isfile(experiment.report.epoch_grid(0)) and os.path.isfile(experiment.report.curves("training"))


def test_curves_have_plain_tick_labels_and_do_not_magnify_noise():
    from d_fusion.report import heldout_curve, training_curve

    metrics = [dict(epoch=0, loss=0.6931471, accuracy=0.5), dict(epoch=1, loss=0.6931472, accuracy=0.5)]
    means = {"template1_test": {"base": 0.3001, "checkpoint_1": 0.3003}}
    figures = [training_curve(metrics), heldout_curve(means, "clip")]
    axes = [axis for figure in figures for axis in figure.axes]
    for figure in figures:
        figure.canvas.draw()
    assert [axis.yaxis.get_major_formatter().get_offset() for axis in axes] == ["", "", ""]  # no 1e-7+6.93147e-1
    loss, accuracy, heldout = (axis.get_ylim() for axis in axes)
    assert loss[1] - loss[0] >= 0.05 and heldout[1] - heldout[0] >= 0.05
    assert accuracy == (-0.05, 1.05)


def test_heldout_tables_show_each_reward_and_diversity_and_the_curve_reads_the_score_files(run):
    with open(build_report(run)) as f:
        text = f.read()
    for column in ("clip: base", "clip: checkpoint_0 - base", "clip: checkpoint_0 wins", "diversity: checkpoint_0"):
        assert f"<th>{column}</th>" in text
    from d_fusion.report import heldout_means, heldout_tables

    means, reward = heldout_means(heldout_tables(run))
    results = run.heldout("template1_test")
    expected = {name: np.mean(results.model(name).scored("clip").read_scores()) for name in ("base", "checkpoint_0")}
    assert reward == "clip" and means["template1_test"] == pytest.approx(expected)
