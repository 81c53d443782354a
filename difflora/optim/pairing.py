"""Name-based pairing of LoRA factors.

The released Riemannian-LoRA code pairs ``A`` and ``B`` by their position in a parameter group,
so one extra trainable tensor (a token embedding, a DoRA magnitude) shifts every pair and a lone
parameter is silently never updated. Here factors are paired by NAME only: two parameters pair
when their names are identical except for the factor token.

Recognised conventions (``A`` = down projection, ``r x in``; ``B`` = up projection, ``out x r``):

* peft: ``...lora_A.<adapter>.weight`` / ``...lora_B.<adapter>.weight``;
* peft embeddings: ``...lora_embedding_A.<adapter>`` / ``...lora_embedding_B.<adapter>``. peft adds
  ``(B @ A).T`` to the embedding table, so the same ``r x r`` preconditioner applies and they are
  paired like the others;
* kohya and Mix-of-Show: ``...lora_down.weight`` / ``...lora_up.weight``;
* diffusers' older processors: ``...to_q_lora.down.weight`` / ``...to_q_lora.up.weight`` and
  ``...lora_layer.down.weight`` / ``...lora_layer.up.weight``.

Anything else (token embeddings, DoRA magnitudes -- peft's ``lora_magnitude_vector`` --, biases) is a
plain parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# (token of A, token of B) matched as whole dot-separated segments.
_SEGMENT_TOKENS: tuple[tuple[str, str], ...] = (
    ("lora_A", "lora_B"),
    ("lora_embedding_A", "lora_embedding_B"),
    ("lora_down", "lora_up"),
)
# diffusers' older LoRA layers: a "down"/"up" segment right after a segment ending in these.
_OLD_DIFFUSERS_PARENTS: tuple[str, ...] = ("lora", "lora_layer")


def factor_role(name: str) -> tuple[str, str] | None:
    """Return ``("A" | "B", key)`` for a LoRA factor name, or ``None`` for a plain parameter.

    ``key`` is the name with the factor token replaced by a marker, so the two factors of one
    LoRA share it. The last matching segment wins (a module named ``lora_A`` inside a LoRA
    would be unusual, but the factor itself is always the innermost one).
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        seg = parts[i]
        for token_a, token_b in _SEGMENT_TOKENS:
            if seg in (token_a, token_b):
                role = "A" if seg == token_a else "B"
                return role, ".".join([*parts[:i], f"<{token_a}|{token_b}>", *parts[i + 1:]])
        if seg in ("down", "up") and i > 0 and parts[i - 1].endswith(_OLD_DIFFUSERS_PARENTS):
            role = "A" if seg == "down" else "B"
            return role, ".".join([*parts[:i], "<down|up>", *parts[i + 1:]])
    return None


def partner_name(name: str) -> str | None:
    """The name the partner factor of ``name`` must have, or ``None`` for a plain parameter."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        seg = parts[i]
        for token_a, token_b in _SEGMENT_TOKENS:
            if seg in (token_a, token_b):
                other = token_b if seg == token_a else token_a
                return ".".join([*parts[:i], other, *parts[i + 1:]])
        if seg in ("down", "up") and i > 0 and parts[i - 1].endswith(_OLD_DIFFUSERS_PARENTS):
            return ".".join([*parts[:i], "up" if seg == "down" else "down", *parts[i + 1:]])
    return None


@dataclass(frozen=True)
class FactorPair:
    """One LoRA pair: where ``A`` and ``B`` live as ``(group index, index in group)``."""

    name_a: str
    name_b: str
    a: tuple[int, int]
    b: tuple[int, int]


def check_pair_shapes(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``A`` is ``(r, ...)`` and ``B`` is ``(out, r)`` or ``(out, r, 1, ...)``."""
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"LoRA factors {name_a!r} {tuple(a.shape)} and {name_b!r} {tuple(b.shape)} must be "
                         "at least 2-D; train them as plain parameters with torch's optimizer instead")
    r = a.shape[0]
    if b.shape[1] != r or any(s != 1 for s in b.shape[2:]):
        raise ValueError(f"LoRA factors {name_a!r} {tuple(a.shape)} and {name_b!r} {tuple(b.shape)} do not "
                         f"form a rank-{r} pair (B must be (out, {r}) or (out, {r}, 1, 1)); check the names")


def pair_factors(names: Sequence[Sequence[str]], params: Sequence[Sequence[torch.Tensor]]) -> list[FactorPair]:
    """Pair the LoRA factors of all groups by name (a pair may span two groups).

    ``names[g][i]`` names ``params[g][i]``. Raises ``ValueError`` with a one-line message for a
    factor without its partner, a duplicated name, or factor shapes that cannot pair.
    """
    found: dict[str, dict[str, tuple[str, tuple[int, int]]]] = {}
    seen: set[str] = set()
    for g, group_names in enumerate(names):
        for i, name in enumerate(group_names):
            if name in seen:
                raise ValueError(f"parameter name {name!r} appears twice in the optimizer's groups; "
                                 "pass each parameter once")
            seen.add(name)
            role = factor_role(name)
            if role is None:
                continue
            found.setdefault(role[1], {})[role[0]] = (name, (g, i))
    pairs = []
    for entry in found.values():
        if len(entry) != 2:
            (name, _), = entry.values()
            raise ValueError(f"LoRA factor {name!r} has no trainable partner {partner_name(name)!r} in the "
                             "optimizer; pass both factors (requires_grad=True) or use plain adamw/sgd")
        (name_a, loc_a), (name_b, loc_b) = entry["A"], entry["B"]
        check_pair_shapes(name_a, params[loc_a[0]][loc_a[1]], name_b, params[loc_b[0]][loc_b[1]])
        pairs.append(FactorPair(name_a, name_b, loc_a, loc_b))
    return pairs
