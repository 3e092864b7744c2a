"""The evaluate stage: the base, the trained and the merged model on the held-out rows.

- trained: the 4-bit base with the adapter applied on the fly, computing as the train stage computed
  (the model the training loss describes);
- merged: models/merged, the model that is shipped; beside the trained model it shows what merging cost.
For each: loss and perplexity on the answer tokens (the labels of the tokenized eval split: answer +
EOS); exact match of greedy generations against the reference answers, where the data has checkable
answers (rows with a `task` family), per family too; the generations themselves, beside the references.
Base and merged run in the same dtype (float32 on the CPU, bfloat16 on a GPU); the trained model's
4-bit layers compute in the quantize compute dtype. One model is in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qlora_pipeline.config import QuantizeParams
from qlora_pipeline.tokenization import IGNORE_INDEX, read_split


def inference_dtype(device: str):
    """bfloat16 on a GPU that has it, float32 otherwise: the dtype models are evaluated and tried in."""
    import torch

    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def use_inference_attention(device: str) -> None:
    """On a GPU, leave cuDNN's attention out of the kernels PyTorch's scaled_dot_product_attention picks from (flash
    and memory-efficient attention remain). cuDNN builds a plan for every new sequence length, which in training
    with per-batch padding cost more than the attention itself (bench/NOTES.md, train.sdpa_cudnn); generation
    makes a new length every token, and scoring one every batch."""
    if device.startswith("cuda"):
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)


def answer_loss(model, rows: Sequence[Mapping[str, list[int]]], pad_token_id: int, batch_size: int,
                device: str) -> dict[str, float]:
    """Mean cross-entropy over answer tokens (token-weighted) of tokenized rows (input_ids, labels), and its
    perplexity."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(row["input_ids"]) for row in batch)
            ids = torch.full((len(batch), width), pad_token_id)
            labels = torch.full_like(ids, IGNORE_INDEX)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
                labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
                mask[i, : len(row["input_ids"])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            shifted = labels[:, 1:].to(device)
            answer = shifted != IGNORE_INDEX
            # Only the answer positions' logits in float32 (and in cross_entropy's log-softmax): a whole batch's
            # would be 3.2 GB each for 16 rows of 1,024 tokens over a 49k vocabulary, beside an 8 B model's 15 GB.
            total += F.cross_entropy(logits[:, :-1][answer].float(), shifted[answer], reduction="sum").item()
            count += int(answer.sum())
            del logits
    loss = total / max(count, 1)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 4), "answer_tokens": count}


def generate_answers(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, device: str,
                     static: bool) -> list[str]:
    """Greedy answers, cut at EOS; prompts are left-padded so every answer starts at the same column. static: each
    token replayed from a CUDA graph over a static cache (decoding.decoding_method says where), else transformers'
    generate."""
    from qlora_pipeline.decoding import greedy_generate

    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        new_tokens = greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                                     tokenizer.eos_token_id, tokenizer.pad_token_id, static)
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
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


MODELS = ("base", "trained", "merged")


def score_model(model, tokenizer, tokenized_eval, formatted_eval: list[dict], batch_size: int, max_new_tokens: int,
                generate_rows: int, device: str) -> tuple[dict[str, Any], list[str]]:
    from qlora_pipeline.decoding import decoding_method

    metrics = answer_loss(model, tokenized_eval, tokenizer.pad_token_id, batch_size, device)
    rows = formatted_eval[:generate_rows]
    static, metrics["decoding"] = decoding_method(model, device)
    predictions = generate_answers(model, tokenizer, [r["prompt"] for r in rows], batch_size, max_new_tokens, device,
                                   static)
    if rows and all("task" in r for r in rows):
        metrics.update(accuracy(predictions, [r["completion"] for r in rows], [r["task"] for r in rows]))
    return metrics, predictions


def load_models(base_dir: Path, adapter_dir: Path, merged_dir: Path, quantize: QuantizeParams, device: str, dtype) -> dict:
    """For each of MODELS, a function that loads it (model, tokenizer) on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.merging import load_trained

    def plain(model_dir: Path):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True, device_map={"": device})
        return model.eval(), AutoTokenizer.from_pretrained(model_dir)

    return {
        "base": lambda: plain(base_dir),
        # On the CPU the 4-bit weights are dequantized once, as the train stage does there (generation would
        # otherwise dequantize every weight for every token); on a GPU bitsandbytes' kernels run them.
        "trained": lambda: (load_trained(base_dir, adapter_dir, quantize, device, dtype, dequantize_once=device == "cpu"),
                            AutoTokenizer.from_pretrained(adapter_dir)),
        "merged": lambda: plain(merged_dir),
    }


def evaluate(base_dir: Path, adapter_dir: Path, merged_dir: Path, tokenized_eval_dir: Path, formatted_eval: list[dict],
             quantize: QuantizeParams, batch_size: int, max_new_tokens: int, generate_rows: int, device: str) -> tuple[dict[str, Any], list[dict]]:
    """Metrics of the base, trained and merged model, and the sample rows (prompt, reference, each model's answer)."""
    from qlora_pipeline.merging import free_memory
    from qlora_pipeline.quantization import living_objects_left_out_of_collection, resolve_compute_dtype

    dtype = inference_dtype(device)
    use_inference_attention(device)
    tokenized = read_split(tokenized_eval_dir)
    results, answers = {}, {}
    with living_objects_left_out_of_collection():
        for label, load in load_models(base_dir, adapter_dir, merged_dir, quantize, device, dtype).items():
            model, tokenizer = load()
            results[label], answers[label] = score_model(
                model, tokenizer, tokenized, formatted_eval, batch_size, max_new_tokens, generate_rows, device
            )
            # Free this model before the next one loads: never two full-precision models at once.
            del model
            free_memory(device)
    samples = [
        {"task": row.get("task"), "prompt": row["prompt"], "reference": row["completion"],
         **{label: answers[label][i] for label in MODELS}}
        for i, row in enumerate(formatted_eval[: len(answers["base"])])
    ]
    base, trained, merged = (results[label] for label in MODELS)
    metrics: dict[str, Any] = {
        "eval_rows": len(tokenized), "generated_rows": len(samples), "dtype": str(dtype).removeprefix("torch."),
        "trained_in_4bit": quantize.load_in_4bit,
        "trained_compute_dtype": str(resolve_compute_dtype(quantize, device)).removeprefix("torch."),
        **results,
        # What the shipped (merged) model gained over the base.
        "loss_change": round(merged["loss"] - base["loss"], 6),
        # What merging cost: the merged model against the model that was trained.
        "merging": {
            "loss_change": round(merged["loss"] - trained["loss"], 6),
            "answers_changed": sum(t != m for t, m in zip(answers["trained"], answers["merged"])),
        },
    }
    if base.get("exact_match") is not None:
        metrics["exact_match_change"] = round(merged["exact_match"] - base["exact_match"], 4)
        metrics["merging"]["exact_match_change"] = round(merged["exact_match"] - trained["exact_match"], 4)
    return metrics, samples
