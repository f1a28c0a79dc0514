"""Pass A, layout: the storage order of each layer's experts.

Experts of one format sit together (the kernel reads one contiguous slab per format), slabs in a fixed format order
(widest first). Inside a slab the hottest expert comes first and each next one is the unplaced expert most often chosen
together with the last one placed (same-layer co-selection), so experts a token uses together are neighbours.
The result is a permutation per layer and block that the checkpoint writer and the kernels follow.
"""

from __future__ import annotations

import numpy as np

from exq.formats import FORMATS


def _chain(members: np.ndarray, frequency: np.ndarray, cosel: np.ndarray) -> list[int]:
    left = [int(e) for e in members]
    # hottest first; ties by lower id
    cur = min(left, key=lambda e: (-frequency[e], e))
    order = [cur]
    left.remove(cur)
    while left:
        cur = min(left, key=lambda e: (-cosel[cur, e], -frequency[e], e))
        order.append(cur)
        left.remove(cur)
    return order


def layer_layout(formats: list[str], frequency: np.ndarray, cosel: np.ndarray) -> dict:
    """formats[e] -> {"order": experts in storage order, "slabs": [[format, start, count], ...]}."""
    rank = {name: i for i, name in enumerate(FORMATS)}
    order: list[int] = []
    slabs: list[list] = []
    for name in sorted(set(formats), key=lambda f: rank[f]):
        members = np.array([e for e, f in enumerate(formats) if f == name])
        slabs.append([name, len(order), len(members)])
        order.extend(_chain(members, frequency, cosel))
    return {"order": order, "slabs": slabs}


def check_layout(layout: dict, formats: list[str]) -> str | None:
    """Why a layout does not fit a layer's formats, or None if it does."""
    order, slabs = layout.get("order"), layout.get("slabs")
    if not isinstance(order, list) or sorted(order) != list(range(len(formats))):
        return "order is not a permutation of the layer's experts"
    pos = 0
    for slab in slabs:
        name, start, count = slab
        if start != pos or any(formats[e] != name for e in order[start : start + count]):
            return f"slab {slab} does not hold exactly the {name} experts in order"
        pos += count
    return None if pos == len(formats) else "slabs do not cover every expert"
