"""The tokenize stage: prompt + answer + EOS, no padding stored, labels masking what is not trained on.

The prompt and the answer are tokenized separately and concatenated, so the boundary between them is
exact. EOS is appended to every answer and is a real label: the model learns where an answer ends,
whatever the pad token is (padding is added per batch later, and masked out of the loss by position).
"""

from __future__ import annotations

import statistics
from typing import Any

from qlora_pipeline.errors import PipelineError

IGNORE_INDEX = -100  # label value that the loss skips


def tokenize_row(tokenizer, prompt: str, completion: str, max_length: int, train_on: str) -> dict[str, Any]:
    """One row as input_ids / labels, truncated to `max_length` tokens (the answer is cut first)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    if train_on == "completion":
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    else:
        labels = list(input_ids)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_length": min(len(prompt_ids), max_length),
        "full_length": len(prompt_ids) + len(answer_ids),
    }


def tokenize_split(tokenizer, rows: list[dict], max_length: int, train_on: str) -> tuple[list[dict], dict[str, Any]]:
    """Tokenize a split; rows left with no trained token are dropped. Returns the rows and their statistics."""
    kept, dropped = [], 0
    for row in rows:
        item = tokenize_row(tokenizer, row["prompt"], row["completion"], max_length, train_on)
        if all(label == IGNORE_INDEX for label in item["labels"]):
            dropped += 1
            continue
        if "task" in row:
            item["task"] = row["task"]
        kept.append(item)
    if not kept:
        raise PipelineError(
            f"params key 'tokenize.max_length': all {dropped} prompts are {max_length} tokens or longer; nothing left to train on"
        )
    lengths = [len(r["input_ids"]) for r in kept]
    stats = {
        "rows": len(kept),
        "rows_truncated": sum(r["full_length"] > max_length for r in kept),
        "rows_dropped_prompt_too_long": dropped,
        "tokens": sum(lengths),
        "trained_tokens": sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in kept),
        "length_mean": round(statistics.fmean(lengths), 2),
        "length_median": statistics.median(lengths),
        "length_max": max(lengths),
    }
    return kept, stats
