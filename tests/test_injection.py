"""The release's fusion strings, parsed at start-up: ranges as SPEC section 6 defines them."""

import pytest

from config.config import get_config
from d_fusion.errors import UserError
from d_fusion.injection import injection_from_config, parse_injection


def test_defaults_fuse_self_k_v_at_steps_2_to_19_in_blocks_3_to_6():
    injection = injection_from_config(get_config())
    fused_steps = [i for i in range(20) if injection.self_k.at_step(i, 20)]
    assert fused_steps == list(range(2, 20))
    assert [b for b in range(7) if injection.self_v.at_block(b)] == [3, 4, 5, 6]
    assert injection.self_q.enabled and not injection.cross_v.enabled
    assert not injection.cross_v.fuses(5, 20, 4)


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
