import os

import pytest
import torch

from d_fusion import fusion
from d_fusion.datadir import ExperimentDir
from d_fusion.errors import UserError
from d_fusion.fusion import FusionBatch, FusionSettings, fused_sampling
from d_fusion.stages import Run, check_fusion_inputs, fuse_epoch, sample_epoch
from d_fusion.injection import parse_injection
from d_fusion.masks import PromptObjects, item_selection
from d_fusion.sampling import SamplerSettings, encode_prompts, sample_generators, sample_trajectories
from tests.test_sampling import assert_equal_to_fp32_precision

PROMPT = "a dog driving a car"
SEED, EPOCH, N = 42, 0, 8  # sample j's generator: seed + epoch * N + j


def settings(num_steps=4, inject_component="T,T,T,T,T,F", inject_t=None, inject_l="3-6,3-6,3-6,3-6,3-6,", **kwargs):
    inject_t = inject_t if inject_t is not None else f"0-{num_steps - 2}," * 5
    return FusionSettings(
        parse_injection(inject_component, inject_t, inject_l), SamplerSettings(num_steps, 1.0, 5.0, True), **kwargs
    )


def generators(indices):
    return sample_generators(SEED, EPOCH, N, indices)


def fuse(sd, fusion_settings, references=(0,), bases=(5, 6), guide=(0, 0), thresholds=(0.03, 0.01)):
    """Targets of `bases`, guided by `references` (rows given by `guide`), objects: words 1 and 4."""
    prompts = [PROMPT] * len(references)
    objects = {PROMPT: PromptObjects((1, 4), thresholds)}
    weights, item_thresholds = item_selection(sd.tokenizer, prompts, objects, 77)
    batch = FusionBatch(
        encode_prompts(sd, prompts), generators(references), generators(bases), torch.tensor(guide), weights,
        item_thresholds,
    )
    return fused_sampling(sd.unet, sd.scheduler, batch, encode_prompts(sd, [""]), fusion_settings)


def stored(sd, indices, num_steps=4):
    """Trajectories of `indices` as sampling makes them, in one batch of those samples."""
    embeds = encode_prompts(sd, [PROMPT] * len(indices))
    negative = encode_prompts(sd, [""]).expand(len(indices))
    return sample_trajectories(sd, embeds, negative, generators(indices), SamplerSettings(num_steps, 1.0, 5.0), progress=False)


@pytest.mark.parametrize("one_call", [False, True])
def test_regenerated_reference_and_base_equal_their_stored_trajectories(tiny_sd, one_call):
    result = fuse(tiny_sd, settings(base_pass=True, one_call=one_call))
    reference, bases = stored(tiny_sd, [0]), stored(tiny_sd, [5, 6])
    # in its own UNet call a reference is the stored one bit for bit; in a call with the targets, to fp32 precision
    for actual, expected in ((result.references, reference), (result.bases, bases)):
        for name in ("latents", "log_probs"):
            if one_call:
                assert_equal_to_fp32_precision(getattr(actual, name), getattr(expected, name))
            else:
                assert torch.equal(getattr(actual, name), getattr(expected, name))
    # the target starts from its base's noise and is changed by the fusion
    assert torch.equal(result.targets.latents[:, 0], bases.latents[:, 0])
    assert (result.targets.latents[:, -1] - bases.latents[:, -1]).abs().max() > 1e-3
    assert result.reference_masks.shape == (1, 4, 2, 4, 4) and result.base_masks.shape == (2, 4, 2, 4, 4)


@pytest.mark.parametrize(
    "fusion_settings, thresholds",
    [
        (settings(inject_t=",,,,,", base_pass=True), (0.03, 0.01)),  # no step fuses
        (settings(base_pass=True), (1.5, 1.5)),  # every object's mask is empty
    ],
)
def test_target_equals_base_without_fusion(tiny_sd, fusion_settings, thresholds):
    result = fuse(tiny_sd, fusion_settings, thresholds=thresholds)
    assert torch.equal(result.targets.latents, result.bases.latents)
    assert torch.equal(result.targets.log_probs, result.bases.log_probs)


def test_references_batched_together_guide_their_own_targets(tiny_sd):
    # two references in one pass, each guiding two targets (r0, r0, r1, r1), with partial masks:
    # every target equals the one made with its reference alone
    thresholds = (0.014, 0.014)
    together = fuse(tiny_sd, settings(), references=(0, 1), bases=(4, 5, 6, 7), guide=(0, 0, 1, 1), thresholds=thresholds)
    masks = together.reference_masks.any(dim=2).flatten(2).float().mean(-1)  # fraction fused per reference, step
    assert ((masks > 0) & (masks < 1)).any(), "the test needs masks that are neither empty nor full"
    for reference, bases in ((0, (4, 5)), (1, (6, 7))):
        alone = fuse(tiny_sd, settings(), references=(reference,), bases=bases, guide=(0, 0), thresholds=thresholds)
        rows = [4, 5, 6, 7].index(bases[0])
        assert torch.equal(alone.reference_masks[0], together.reference_masks[reference])
        torch.testing.assert_close(alone.targets.latents, together.targets.latents[rows : rows + 2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_mask", [True, False])
def test_one_call_per_step_makes_the_targets_of_two_calls(tiny_sd, use_mask):
    # the references' step i + 1 in the targets' call of step i: two references, partial masks, bases too
    made = {
        one_call: fuse(
            tiny_sd, settings(base_pass=use_mask, use_mask=use_mask, one_call=one_call), references=(0, 1),
            bases=(4, 5, 6, 7), guide=(0, 0, 1, 1), thresholds=(0.014, 0.014),
        )
        for one_call in (False, True)
    }
    two, one = made[False], made[True]
    assert_equal_to_fp32_precision(one.targets.latents, two.targets.latents)
    assert_equal_to_fp32_precision(one.targets.log_probs, two.targets.log_probs)
    assert_equal_to_fp32_precision(one.references.latents, two.references.latents)
    assert one.fused == two.fused and len(two.fused) > 0
    assert (two.targets.latents[:, -1] - stored(tiny_sd, [4, 5, 6, 7]).latents[:, -1]).abs().max() > 1e-3
    if use_mask:
        assert torch.equal(one.reference_masks, two.reference_masks) and torch.equal(one.base_masks, two.base_masks)
        fraction = two.reference_masks.any(dim=2).float().mean()
        assert 0 < fraction < 1, "the test needs masks that are neither empty nor full"


def test_fusion_happens_exactly_at_the_specs_steps_and_blocks(tiny_sd):
    # the release's defaults with 20 steps: steps 2..19, blocks 3..6
    result = fuse(tiny_sd, settings(20, inject_t="0-18,0-18,0-18,0-18,0-18,", use_mask=False), bases=(5,), guide=(0,))
    assert set(result.fused) == {(i, b) for i in range(2, 20) for b in range(3, 7)}
    # the self Q flag is the switch: with its own ranges narrower than K's and V's, fusion follows Q's
    q_narrow = settings(20, inject_t="5-10,0-18,0-18,,,", inject_l="4-5,3-6,3-6,,,", use_mask=False)
    result = fuse(tiny_sd, q_narrow, bases=(5,), guide=(0,))
    assert set(result.fused) == {(i, b) for i in range(10, 15) for b in (4, 5)}
    # keys off; values at lo <= 19 - i < hi = 10..14 and blocks 4..5, inside Q's ranges
    values_only = settings(20, "T,F,T,F,F,F", inject_t="0-18,,5-10,,,", inject_l="3-6,,4-5,,,", use_mask=False)
    result = fuse(tiny_sd, values_only, bases=(5,), guide=(0,))
    assert set(result.fused) == {(i, b) for i in range(10, 15) for b in (4, 5)}


def test_self_q_off_does_not_fuse_as_in_the_release(tiny_sd):
    result = fuse(tiny_sd, settings(inject_component="F,T,T,T,T,F", base_pass=True))
    assert result.fused == []
    assert torch.equal(result.targets.latents, result.bases.latents)


@pytest.fixture
def one_prompt_config(tiny_config):
    tiny_config.prompt_file = ""
    tiny_config.prompt = PROMPT
    tiny_config.item_idx = [1, 4]
    tiny_config.mask_thr_file = ""
    tiny_config.mask_thr = 0.02
    tiny_config.item_idx_file = ""
    tiny_config.sample.num_steps = 3
    tiny_config.inject_t = "0-2,0-2,0-2,0-2,0-2,"
    return tiny_config


def test_fuse_epoch_writes_targets_survives_a_crash_and_reuses_them(tiny_sd, one_prompt_config, monkeypatch, crash_on_call):
    import shutil

    from d_fusion.datadir import read_json

    config = one_prompt_config
    config.sample.batch_size = 2
    config.sample.num_batches_per_epoch = 4
    config.fusion.batch_size = 3  # fusion in two batches of two targets (one reference each)
    objects = check_fusion_inputs(config, [PROMPT])
    run = Run.build(config, tiny_sd, ExperimentDir(config.save_path, config.exp_name), [PROMPT], objects)
    whole_run = Run.build(config, tiny_sd, ExperimentDir(config.save_path, "whole"), [PROMPT], objects)
    epoch_dir = run.experiment.epoch(0)
    sample_epoch(run, 0)
    whole = whole_run.experiment.epoch(0)
    shutil.copytree(epoch_dir.root, whole.root)
    scores = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.4, 0.7]  # references 1, 4; bases 6, 3, 5, 0

    # a crash in the second batch keeps the first; the rerun makes only the second
    calls = crash_on_call(fusion, "fused_sampling", 2)
    with pytest.raises(KeyboardInterrupt):
        fuse_epoch(run, 0, scores)
    assert epoch_dir.injected.published_prompts() == [PROMPT] * 2
    pairs = fuse_epoch(run, 0, scores)
    assert len(calls) == 3
    monkeypatch.undo()
    whole.injected.write_scores([0.5] * 4)  # left from targets moved aside: not the new targets' scores
    fuse_epoch(whole_run, 0, scores)
    assert whole.injected.read_scores() == []

    assert [(p.reference, p.base) for p in pairs] == [(1, 6), (1, 3), (4, 5), (4, 0)]
    assert epoch_dir.read_injected_map() == [(6, 1), (3, 1), (5, 4), (0, 4)]
    assert read_json(epoch_dir.injected.prompts_file) == [PROMPT] * 4
    for pair in pairs:
        target = epoch_dir.injected.load_trajectories([pair.target])[0]
        base = epoch_dir.sampled.load_trajectories([pair.base])[0]
        assert target.latents.shape == base.latents.shape and target.log_probs.shape == (3,)
        assert torch.equal(target.latents[0], base.latents[0])  # the base's x_T
        assert torch.equal(target.latents, whole.injected.load_trajectories([pair.target]).latents[0])
        assert os.path.isfile(epoch_dir.injected.image_path(pair.target))
        with open(epoch_dir.reference_image_path(pair.target), "rb") as f, open(epoch_dir.sampled.image_path(pair.reference), "rb") as g:
            assert f.read() == g.read()
        with open(epoch_dir.base_image_path(pair.target), "rb") as f, open(epoch_dir.sampled.image_path(pair.base), "rb") as g:
            assert f.read() == g.read()
    masks = sorted(os.listdir(os.path.dirname(epoch_dir.mask_path(0, 0, 0))))
    assert masks == [f"{r:05d}_item{k}_t{s:02d}.png" for r in (1, 4) for k in (0, 1) for s in range(3)]

    def no_sampling(*args, **kwargs):
        raise AssertionError("published targets are made again")

    monkeypatch.setattr(fusion, "fused_sampling", no_sampling)
    fuse_epoch(run, 0, scores)
    with pytest.raises(UserError, match="scores changed"):
        fuse_epoch(run, 0, scores[::-1])


def test_start_up_checks(one_prompt_config):
    config = one_prompt_config
    config.sample.batch_size = 3
    with pytest.raises(UserError, match="multiple of 4"):
        check_fusion_inputs(config, [PROMPT])
    config.sample.batch_size = 4
    config.fusion.mask_images = "some"
    with pytest.raises(UserError, match="mask_images"):
        check_fusion_inputs(config, [PROMPT])
    config.fusion.mask_images = "last"
    config.sample.batch_size, config.sample.num_batches_per_epoch = 4, 0
    with pytest.raises(UserError, match=">= 1"):
        check_fusion_inputs(config, [PROMPT])
    config.sample.num_batches_per_epoch = 1
    config.item_idx = [1, 7]
    with pytest.raises(UserError, match="word positions"):
        check_fusion_inputs(config, [PROMPT])


def test_a_published_target_with_a_missing_or_damaged_file_is_fused_again(tiny_sd, one_prompt_config, caplog):

    config = one_prompt_config
    config.sample.batch_size, config.sample.num_batches_per_epoch, config.fusion.batch_size = 2, 4, 2
    scores = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.4, 0.7]
    objects = check_fusion_inputs(config, [PROMPT])
    run = Run.build(config, tiny_sd, ExperimentDir(config.save_path, config.exp_name), [PROMPT], objects)
    epoch_dir = run.experiment.epoch(0)
    sample_epoch(run, 0)
    fuse_epoch(run, 0, scores)
    made = [epoch_dir.injected.load_trajectories([t]).latents[0].clone() for t in range(4)]
    untouched = {path: os.path.getmtime(path) for path in epoch_dir.target_files(0) + epoch_dir.target_files(1)}

    os.remove(epoch_dir.injected.trajectory_path(2))  # chunk [2, 3]: a missing trajectory,
    with open(epoch_dir.base_image_path(3), "wb") as f:  # a damaged copy of a base
        f.write(b"\x89PNG half")
    with caplog.at_level("WARNING", logger="d_fusion.stages"):
        fuse_epoch(run, 0, scores)
    warnings = [r.getMessage() for r in caplog.records if r.name == "d_fusion.stages" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("epoch 0: fusing targets 2-3 again: ")
    for target in range(4):
        remade = epoch_dir.injected.load_trajectories([target]).latents[0]
        torch.testing.assert_close(remade, made[target], atol=1e-5, rtol=0)
    with open(epoch_dir.base_image_path(3), "rb") as f, open(epoch_dir.sampled.image_path(0), "rb") as g:  # target 3's base
        assert f.read() == g.read()
    assert {path: os.path.getmtime(path) for path in untouched} == untouched  # chunk [0, 1] is not made again
    assert epoch_dir.injected.published_prompts() == [PROMPT] * 4
