"""Prompts: prompt files, and prompts longer than the text encoder reads."""

import logging

from d_fusion.prompts import warn_long_prompts

LONG = "a cat playing chess" + " and a big dog" * 20 + " under a red sky"


def test_a_prompt_over_77_tokens_is_named_with_where_it_is_cut(tiny_sd, caplog):
    with caplog.at_level(logging.WARNING, logger="d_fusion.prompts"):
        warn_long_prompts(tiny_sd.tokenizer, ["a cat playing chess", LONG, LONG])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per prompt, none for the short one
    assert repr(LONG) in warnings[0] and "more than the 75 the text encoder reads" in warnings[0]
    kept = tiny_sd.tokenizer(LONG, truncation=True).input_ids[1:-1]  # what the text encoder gets
    assert f"it is cut after {tiny_sd.tokenizer.decode(kept)!r}" in warnings[0]
    assert warnings[0].endswith("under a red sky' is ignored)")
