"""The subset stage: a seeded shuffle cut into disjoint train and eval splits."""

from __future__ import annotations

import random

from qlora_pipeline.errors import PipelineError


def make_subset(rows: list[dict], train_size: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle row indices with `seed`; the first `train_size` train, the next `eval_size` evaluate."""
    if train_size + eval_size > len(rows):
        raise PipelineError(
            f"params key 'subset.train_size': train_size + eval_size = {train_size + eval_size} "
            f"exceeds the {len(rows)} rows of the data"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    train = [rows[i] for i in order[:train_size]]
    held_out = [rows[i] for i in order[train_size : train_size + eval_size]]
    return train, held_out
