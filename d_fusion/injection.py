"""The release's fusion strings, parsed once at start-up into typed values (docs/METHOD.md §6.4).

`inject_component` has six flags (self-attention Q, K, V, then cross-attention Q, K, V);
`inject_t` and `inject_l` give, per component, a step range and a block range as "lo-hi"
(an empty entry: never). Steps: `lo <= num_steps - 1 - i < hi` for step index i (0 is the
noisiest). Blocks: `lo <= block <= hi`, numbering the UNet's blocks that have attentions in
forward order (down, mid, up; docs/METHOD.md §6.1). A block range may name the UNet's parts
instead of numbers: "mid-up" is the mid block and every up block with attentions, whatever
the family (SD 2.1's 3-6, SDXL's 2-4; the default, as the release's "3-6" means for SD 2.1),
"down-mid", "up" or "down" alone. Names are resolved against the loaded UNet (`on_blocks`),
where a numbered range beyond its blocks is an error.

What the flags do is what they do in the release (docs/METHOD.md §6.4): the self-attention Q flag,
with its own ranges, is the fusion switch (the target keeps its own query); where it is on, the
self K and V flags, each with its own ranges, say which of K and V come from the reference.
The cross-attention flags are parsed and checked but do not act.
"""

from dataclasses import dataclass

from d_fusion.errors import UserError

COMPONENTS = ("self_q", "self_k", "self_v", "cross_q", "cross_k", "cross_v")
BLOCK_PARTS = ("down", "mid", "up")  # a UNet's parts, in forward order


@dataclass(frozen=True)
class ComponentInjection:
    enabled: bool
    t_range: tuple | None  # (lo, hi), half-open, on num_steps - 1 - i
    l_range: tuple | None  # (lo, hi), inclusive, on the block number; an end may be a part name until `on_blocks`

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

    def on_blocks(self, parts, num_blocks, field):
        """This component with its block range in numbers: parts {name: (first, last) block}."""
        if self.l_range is None:
            return self
        lo, hi = self.l_range
        lo = parts[lo][0] if isinstance(lo, str) else lo
        hi = parts[hi][1] if isinstance(hi, str) else hi
        if hi >= num_blocks:
            layout = ", ".join(f"{name} {a}-{b}" if a != b else f"{name} {a}" for name, (a, b) in parts.items())
            raise UserError(
                f"config.{field}: block range {lo}-{hi} goes beyond this UNet's blocks 0-{num_blocks - 1} "
                f"({layout}); name its parts instead, e.g. mid-up"
            )
        return ComponentInjection(self.enabled, self.t_range, (lo, hi))


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

    def on_blocks(self, parts, num_blocks):
        """Every block range in numbers, for a UNet of `num_blocks` blocks whose parts are
        {"down": (first, last), "mid": (b, b), "up": (first, last)} (`attention.block_parts`)."""
        return Injection(*(getattr(self, c).on_blocks(parts, num_blocks, "inject_l") for c in COMPONENTS))


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


def _end(text, names):
    """A range's end: a number, or one of `names`."""
    return text if text in names else int(text)


def _range(text, field, names=()):
    """(lo, hi) of "lo-hi" (or a lone name of `names`: that part alone); None for ""."""
    if text == "":
        return None
    try:
        lo, hi = (_end(v, names) for v in (text.split("-") if text not in names else (text, text)))
    except ValueError:
        example = "0-18" if not names else "3-6 or mid-up"
        raise UserError(f"config.{field}: {text!r} is not a range; write it as lo-hi, e.g. {example}") from None
    if isinstance(lo, str) or isinstance(hi, str):
        lo_index, hi_index = (BLOCK_PARTS.index(v) if isinstance(v, str) else None for v in (lo, hi))
        if lo_index is None or hi_index is None or hi_index < lo_index:
            raise UserError(f"config.{field}: range {text!r}: name both ends, in forward order (down, mid, up)")
    elif lo < 0 or hi < lo:
        raise UserError(f"config.{field}: range {text!r} must satisfy 0 <= lo <= hi")
    return lo, hi


def parse_injection(inject_component, inject_t, inject_l):
    flags = [_flag(p, "inject_component") for p in _split(inject_component, "inject_component")]
    t_ranges = [_range(p, "inject_t") for p in _split(inject_t, "inject_t")]
    l_ranges = [_range(p, "inject_l", BLOCK_PARTS) for p in _split(inject_l, "inject_l")]
    return Injection(*(ComponentInjection(f, t, l) for f, t, l in zip(flags, t_ranges, l_ranges)))


def injection_from_config(config):
    return parse_injection(config.inject_component, config.inject_t, config.inject_l)
