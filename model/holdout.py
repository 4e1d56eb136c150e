"""Held-out compositions: named sets of colour-shape(-direction) combinations kept out of training.

A set holds pairs ``(colour, shape)`` (never seen in any frame or direction, so
t2i and t2v can both be scored on them) and triples ``(colour, shape,
direction)`` (videos only: the pair is seen, just never moving that way). A
run trains without them by naming the set in its config
(``NuwaConfig.holdout``, e.g. ``train --holdout combos-v1``): the procedural
data then redraws every sample or edit pair that holds one (model/data.py,
``DataConfig.exclude``), in all three stages. ``evaluate`` scores the
checkpoint's set beside the in-distribution streams (which then exclude it)
for the caption tasks: t2i/t2v samples whose first object is one
(``DataConfig.only``), ti2i/tv2v edits whose target holds one.

Each pair and direction of a set is still seen in other combinations: every
colour with the other shapes, every shape in the other colours, so a
held-out figure measures composition, not a missing word.
"""
from __future__ import annotations

from typing import Dict, Tuple

Combo = Tuple[str, ...]

HOLDOUT_SETS: Dict[str, Tuple[Combo, ...]] = {
    "": (),
    # 3 of the 18 colour-shape pairs (each colour and shape at most once) and 5 of
    # the 90 colour-shape-direction triples (none with "still", which images share).
    "combos-v1": (("red", "triangle"), ("green", "square"), ("cyan", "circle"),
                  ("blue", "circle", "left"), ("yellow", "square", "up"), ("magenta", "triangle", "down"),
                  ("blue", "square", "right"), ("yellow", "triangle", "left")),
}


def holdout_combos(name: str) -> Tuple[Combo, ...]:
    if not isinstance(name, str) or name not in HOLDOUT_SETS:
        raise ValueError(f"unknown held-out set {name!r}; known: {[n for n in HOLDOUT_SETS if n]} ('' = none)")
    return HOLDOUT_SETS[name]


def matches(obj, combo: Combo, video: bool) -> bool:
    """Whether ``obj`` (a ShapeParams) is the combination; triples only match videos."""
    if len(combo) == 3 and not video:
        return False
    return obj.color == combo[0] and obj.shape == combo[1] and (len(combo) == 2 or obj.direction == combo[2])


def any_match(objects, combos, video: bool) -> bool:
    return any(matches(o, c, video) for o in objects for c in combos)
