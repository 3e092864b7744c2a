"""Prompt templates: a row (instruction, input) becomes the prompt; the answer follows it.

`alpaca` is the tutorial's single template (the input section always present, possibly empty);
`alpaca-official` is Stanford Alpaca's pair: one template for rows with an input, one for rows without.
"""

from __future__ import annotations

_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)

def build_prompt(template: str, instruction: str, input_text: str) -> str:
    """The text the model sees before its answer; ends with the response header and a newline."""
    if template == "alpaca":
        return f"{_HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    if template == "alpaca-official":
        if input_text.strip():
            return f"{_HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
        return f"{_HEADER_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n"
    raise ValueError(f"unknown template {template!r}")


def format_rows(rows: list[dict[str, str]], template: str) -> list[dict[str, str]]:
    """Rows as prompt / completion pairs (the `task` family kept where present)."""
    out = []
    for row in rows:
        item = {"prompt": build_prompt(template, row["instruction"], row["input"]), "completion": row["output"]}
        if "task" in row:
            item["task"] = row["task"]
        out.append(item)
    return out
