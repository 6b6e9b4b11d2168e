"""The release's fusion strings, parsed once at start-up into typed values (docs/METHOD.md §6.4).

`inject_component` has six flags (self-attention Q, K, V, then cross-attention Q, K, V);
`inject_t` and `inject_l` give, per component, a step range and a block range as "lo-hi"
(an empty entry: never). Steps: `lo <= num_steps - 1 - i < hi` for step index i (0 is the
noisiest). Blocks: `lo <= block <= hi`, numbering the UNet's cross-attention blocks in
forward order (down, mid, up).

What the flags do is what they do in the release (docs/METHOD.md §6.4): the self-attention Q flag,
with its own ranges, is the fusion switch (the target keeps its own query); where it is on, the
self K and V flags, each with its own ranges, say which of K and V come from the reference.
The cross-attention flags are parsed and checked but do not act.
"""

from dataclasses import dataclass

from d_fusion.errors import UserError

COMPONENTS = ("self_q", "self_k", "self_v", "cross_q", "cross_k", "cross_v")


@dataclass(frozen=True)
class ComponentInjection:
    enabled: bool
    t_range: tuple | None  # (lo, hi), half-open, on num_steps - 1 - i
    l_range: tuple | None  # (lo, hi), inclusive, on the block number

    def at_step(self, step_index, num_steps):
        if not self.enabled or self.t_range is None:
            return False
        lo, hi = self.t_range
        return lo <= num_steps - 1 - step_index < hi

    def at_block(self, block):
        if not self.enabled or self.l_range is None:
            return False
        lo, hi = self.l_range
        return lo <= block <= hi

    def fuses(self, step_index, num_steps, block):
        return self.at_step(step_index, num_steps) and self.at_block(block)


@dataclass(frozen=True)
class Injection:
    self_q: ComponentInjection
    self_k: ComponentInjection
    self_v: ComponentInjection
    cross_q: ComponentInjection
    cross_k: ComponentInjection
    cross_v: ComponentInjection

    def blends_k(self, step_index, num_steps, block):
        """Whether the target's self-attention in `block` at step `step_index` takes K from the reference."""
        return self.self_q.fuses(step_index, num_steps, block) and self.self_k.fuses(step_index, num_steps, block)

    def blends_v(self, step_index, num_steps, block):
        """Whether the target's self-attention in `block` at step `step_index` takes V from the reference."""
        return self.self_q.fuses(step_index, num_steps, block) and self.self_v.fuses(step_index, num_steps, block)


def _split(text, field):
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == len(COMPONENTS) - 1:  # a missing trailing entry means "never"
        parts.append("")
    if len(parts) != len(COMPONENTS):
        raise UserError(
            f"config.{field} = {text!r}: expected {len(COMPONENTS)} comma-separated entries "
            f"(self-attention Q, K, V, cross-attention Q, K, V), got {len(parts)}"
        )
    return parts


def _flag(text, field):
    if text.upper() in ("T", "TRUE", "1"):
        return True
    if text.upper() in ("F", "FALSE", "0", ""):
        return False
    raise UserError(f"config.{field}: {text!r} is not a flag; use T or F")


def _range(text, field):
    if text == "":
        return None
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"config.{field}: {text!r} is not a range; write it as lo-hi, e.g. 0-18") from None
    if lo < 0 or hi < lo:
        raise UserError(f"config.{field}: range {text!r} must satisfy 0 <= lo <= hi")
    return lo, hi


def parse_injection(inject_component, inject_t, inject_l):
    flags = [_flag(p, "inject_component") for p in _split(inject_component, "inject_component")]
    t_ranges = [_range(p, "inject_t") for p in _split(inject_t, "inject_t")]
    l_ranges = [_range(p, "inject_l") for p in _split(inject_l, "inject_l")]
    return Injection(*(ComponentInjection(f, t, l) for f, t, l in zip(flags, t_ranges, l_ranges)))


def injection_from_config(config):
    return parse_injection(config.inject_component, config.inject_t, config.inject_l)
