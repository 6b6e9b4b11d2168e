"""The release's fusion strings, parsed at start-up: ranges as docs/METHOD.md §6.4 defines them."""

import pytest

from config.config import get_config
from d_fusion.errors import UserError
from d_fusion.injection import injection_from_config, parse_injection


SD21_PARTS = {"down": (0, 2), "mid": (3, 3), "up": (4, 6)}  # SD 2.1's blocks with attentions
SDXL_PARTS = {"down": (0, 1), "mid": (2, 2), "up": (3, 4)}


def test_defaults_fuse_self_k_v_at_steps_2_to_19_in_blocks_3_to_6():
    injection = injection_from_config(get_config()).on_blocks(SD21_PARTS, 7)
    fused_steps = [i for i in range(20) if injection.self_k.at_step(i, 20)]
    assert fused_steps == list(range(2, 20))
    assert [b for b in range(7) if injection.self_v.at_block(b)] == [3, 4, 5, 6]
    assert injection.self_q.enabled and not injection.cross_v.enabled
    assert not injection.cross_v.fuses(5, 20, 4)


def test_self_q_is_the_switch_and_k_v_say_what_is_blended():
    steps, blocks = range(20), range(7)

    def blended(injection):
        k = {(i, b) for i in steps for b in blocks if injection.blends_k(i, 20, b)}
        v = {(i, b) for i in steps for b in blocks if injection.blends_v(i, 20, b)}
        return k, v

    ranges = "0-18,0-18,0-18,,,", "3-6,3-6,3-6,,,"
    both = {(i, b) for i in range(2, 20) for b in range(3, 7)}
    assert blended(parse_injection("T,T,T,F,F,F", *ranges)) == (both, both)
    assert blended(parse_injection("F,T,T,T,T,F", *ranges)) == (set(), set())  # the release does not fuse
    assert blended(parse_injection("T,T,F,F,F,F", *ranges)) == (both, set())
    q_late = parse_injection("T,T,T,F,F,F", "0-5,0-18,0-18,,,", "3-6,3-6,3-6,,,")
    assert blended(q_late)[0] == {(i, b) for i in range(15, 20) for b in range(3, 7)}


def test_named_block_ranges_keep_their_meaning_per_family_and_numbers_are_checked():
    named = parse_injection("T,T,T,F,F,F", "0-18,0-18,0-18,,,", "mid-up,down-mid,up,,,")
    on_sdxl = named.on_blocks(SDXL_PARTS, 5)
    assert [b for b in range(5) if on_sdxl.self_q.at_block(b)] == [2, 3, 4]
    assert [b for b in range(5) if on_sdxl.self_k.at_block(b)] == [0, 1, 2]
    assert [b for b in range(5) if on_sdxl.self_v.at_block(b)] == [3, 4]
    assert [b for b in range(7) if named.on_blocks(SD21_PARTS, 7).self_q.at_block(b)] == [3, 4, 5, 6]
    numbered = parse_injection("T,T,T,F,F,F", "0-18,0-18,0-18,,,", "3-6,3-6,3-6,,,")
    assert numbered.on_blocks(SD21_PARTS, 7) == numbered
    with pytest.raises(UserError, match=r"inject_l: block range 3-6 goes beyond this UNet's blocks 0-4 .*mid 2"):
        numbered.on_blocks(SDXL_PARTS, 5)
    for bad in ("up-mid", "mid-9x", "middle"):
        with pytest.raises(UserError, match="inject_l"):
            parse_injection("T,T,T,F,F,F", "0-18,0-18,0-18,,,", f"{bad},3-6,3-6,,,")


def test_empty_entries_never_fuse():
    injection = parse_injection("T,T,T,T,T,T", ",,,,,", "0-6,0-6,0-6,0-6,0-6,0-6")
    assert not any(injection.self_k.at_step(i, 20) for i in range(20))


@pytest.mark.parametrize(
    "component, t, l, field",
    [
        ("T,T,T", "0-18,0-18,0-18,0-18,0-18,", "3-6,3-6,3-6,3-6,3-6,", "inject_component"),
        ("T,T,T,T,T,X", "0-18,0-18,0-18,0-18,0-18,", "3-6,3-6,3-6,3-6,3-6,", "inject_component"),
        ("T,T,T,T,T,F", "0-18,0-18,018,0-18,0-18,", "3-6,3-6,3-6,3-6,3-6,", "inject_t"),
        ("T,T,T,T,T,F", "0-18,0-18,0-18,0-18,0-18,", "6-3,3-6,3-6,3-6,3-6,", "inject_l"),
    ],
)
def test_malformed_strings_name_the_field(component, t, l, field):
    with pytest.raises(UserError, match=field):
        parse_injection(component, t, l)
