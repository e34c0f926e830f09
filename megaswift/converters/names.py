"""Parameter names: the placeholders mappings are written with, and the canonical-name step.

Placeholders (the syntax is documented with the declarations, in `family.py`): `*` stands for
the global decoder layer index and `{E}` for the global expert index; a name may hold both.

The canonical-name step runs on every MCore parameter name before it is matched, so a module
wrapped by a tuner keeps its base name: a peft-style wrapper holds the original module as
`base_layer` (`linear_qkv.base_layer.weight` is `linear_qkv.weight`), and the parameters the
adapter adds (`linear_qkv.lora_A.weight`) are reported as adapter parameters of the base weight
they belong to, which the base converter skips and an adapter converter picks up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYER = "*"
EXPERT = "{E}"

# (rule, replacement) applied in order: wrapper modules that keep the wrapped one as a child.
WRAPPERS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\.base_layer\."), "."),  # peft-style LoRA: self.base_layer = base_layer
)
# A parameter an adapter adds beside a wrapped module: `<module>.<adapter part>`.
ADAPTER_PARAM = re.compile(r"^(?P<module>.+?)\.(?P<adapter>lora_(?:embedding_)?[AB]\..+)$")


@dataclass(frozen=True)
class Canonical:
    """A parameter's name as the family's mappings know it."""
    name: str                   # the base parameter's name, wrappers removed
    adapter: str | None = None  # for an adapter's own parameter: its part ("lora_A.weight"),
    #                             and `name` is then the weight of the module it adapts


def canonical(name: str) -> Canonical:
    """The canonical form of the MCore parameter name `name` (see the module docstring)."""
    for rule, replacement in WRAPPERS:
        name = rule.sub(replacement, name)
    m = ADAPTER_PARAM.match(name)
    if m:
        return Canonical(f"{m['module']}.weight", adapter=m["adapter"])
    return Canonical(name)


def fill(pattern: str, layer: int | None = None, expert: int | None = None) -> str:
    """`pattern` with its placeholders replaced by the global `layer` and `expert` indices."""
    for placeholder, index in ((LAYER, layer), (EXPERT, expert)):
        if placeholder in pattern:
            if index is None:
                raise ValueError(f"{pattern} needs an index for {placeholder}")
            pattern = pattern.replace(placeholder, str(index))
    return pattern


def compile_pattern(pattern: str) -> re.Pattern:
    """A regex that matches the concrete names of `pattern`, capturing `layer` and `expert`."""
    rx = re.escape(pattern)
    rx = rx.replace(re.escape(LAYER), r"(?P<layer>\d+)").replace(re.escape(EXPERT), r"(?P<expert>\d+)")
    return re.compile(f"^{rx}$")
