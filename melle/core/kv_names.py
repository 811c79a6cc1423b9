"""Names of the KV-cache tensors of every graph, engine and backend (DESIGN.md "Contracts": KV cache).

Per layer ``i`` a pair: ``past_key_{i}`` / ``past_value_{i}`` into the decoder step (the
cache so far), ``present_key_{i}`` / ``present_value_{i}`` out of the prefill and the step
(the new positions only). Graph order is key_0, value_0, key_1, ... This module imports no torch.
"""

from __future__ import annotations

PAST, PRESENT = "past_", "present_"


def past_names(n_layer: int) -> list[str]:
    """``past_key_0, past_value_0, past_key_1, ...``: the step's cache inputs in graph order."""
    return [f"{PAST}{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """``present_key_0, present_value_0, ...``: the new K/V outputs in graph order."""
    return [present_of(name) for name in past_names(n_layer)]


def is_past(name: str) -> bool:
    """Whether a graph input is a cache tensor."""
    return name.startswith(PAST)


def present_of(past_name: str) -> str:
    """The output that carries the new slice of the cache input ``past_name``."""
    return PRESENT + past_name.removeprefix(PAST)
