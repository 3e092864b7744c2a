"""The evaluate stage: the base and the fine-tuned (merged) model on the held-out rows.

- loss and perplexity on the answer tokens (the labels of the tokenized eval split: answer + EOS);
- exact match of greedy generations against the reference answers, where the data has checkable
  answers (rows with a `task` family); per family too;
- the generations themselves, beside the references.
Both models run in the same dtype (float32 on the CPU, bfloat16 on a GPU), unquantized.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qlora_pipeline.tokenization import IGNORE_INDEX


def inference_dtype(device: str):
    """bfloat16 on a GPU that has it, float32 otherwise: the dtype models are evaluated and tried in."""
    import torch

    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def answer_loss(model, tokenized, pad_token_id: int, batch_size: int, device: str) -> dict[str, float]:
    """Mean cross-entropy over answer tokens (token-weighted), and its perplexity."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokenized), batch_size):
            rows = tokenized[start : start + batch_size]
            width = max(len(ids) for ids in rows["input_ids"])
            ids = torch.full((len(rows["input_ids"]), width), pad_token_id)
            labels = torch.full_like(ids, IGNORE_INDEX)
            mask = torch.zeros_like(ids)
            for i, (row_ids, row_labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
                mask[i, : len(row_ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            total += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((shifted != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 4), "answer_tokens": count}


def generate_answers(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, device: str) -> list[str]:
    """Greedy answers, cut at EOS; prompts are left-padded so every answer starts at the same column."""
    import torch

    tokenizer.padding_side = "left"
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def normalize_answer(text: str) -> str:
    """Compare answers as written, ignoring only surrounding white space."""
    return text.strip()


def accuracy(predictions: list[str], references: list[str], tasks: list[str | None]) -> dict[str, Any]:
    hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    per_task: dict[str, list[bool]] = {}
    for task, hit in zip(tasks, hits):
        per_task.setdefault(task or "all", []).append(hit)
    return {
        "exact_match": round(sum(hits) / len(hits), 4) if hits else None,
        "exact_match_per_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(per_task.items())},
    }


def evaluate_model(model_dir: Path, tokenized_eval, formatted_eval: list[dict], batch_size: int, max_new_tokens: int,
                   generate_rows: int, device: str, dtype) -> tuple[dict[str, Any], list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True).to(device).eval()
    metrics = answer_loss(model, tokenized_eval, tokenizer.pad_token_id, batch_size, device)
    rows = formatted_eval[:generate_rows]
    predictions = generate_answers(model, tokenizer, [r["prompt"] for r in rows], batch_size, max_new_tokens, device)
    if rows and all("task" in r for r in rows):
        metrics.update(accuracy(predictions, [r["completion"] for r in rows], [r["task"] for r in rows]))
    return metrics, predictions


def evaluate(base_dir: Path, tuned_dir: Path, tokenized_eval_dir: Path, formatted_eval: list[dict], batch_size: int,
             max_new_tokens: int, generate_rows: int, device: str) -> tuple[dict[str, Any], list[dict]]:
    """Metrics of both models and the sample rows (prompt, reference, both answers)."""
    import datasets

    dtype = inference_dtype(device)
    tokenized = datasets.load_from_disk(str(tokenized_eval_dir))
    results, answers = {}, {}
    for label, model_dir in (("base", base_dir), ("tuned", tuned_dir)):
        results[label], answers[label] = evaluate_model(
            model_dir, tokenized, formatted_eval, batch_size, max_new_tokens, generate_rows, device, dtype
        )
    samples = [
        {"task": row.get("task"), "prompt": row["prompt"], "reference": row["completion"],
         "base": base_answer, "tuned": tuned_answer}
        for row, base_answer, tuned_answer in zip(formatted_eval, answers["base"], answers["tuned"])
    ]
    metrics: dict[str, Any] = {"eval_rows": len(tokenized), "generated_rows": len(samples), "dtype": str(dtype).removeprefix("torch."), **results}
    metrics["loss_change"] = round(results["tuned"]["loss"] - results["base"]["loss"], 6)
    if results["base"].get("exact_match") is not None:
        metrics["exact_match_change"] = round(results["tuned"]["exact_match"] - results["base"]["exact_match"], 4)
    return metrics, samples
