"""The merge stage: fold the LoRA adapter into the full-precision base and save a plain model.

The merge is computed in float32 (W + scale * B @ A) and only then cast to `merge.dtype`, so the one
rounding is the final cast. Two figures say how faithful the result is:
- merged vs. unmerged: the saved merged model against the float32 base with the adapter applied on
  the fly. Their only difference is that final cast (float16 keeps 11 significant bits, a relative
  error of at most 2^-11 per weight), so logits differ by ~1e-3 to 1e-2 in absolute value.
- merged vs. 4-bit: against the model that was trained (the 4-bit base with the adapter). This is the
  quantization error of the base (NF4 keeps 4 bits a weight), not an error of merging, and is far larger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipeline.config import MergeParams, QuantizeParams
from qlora_pipeline.outputs import read_jsonl


def _max_logit_diff(model_a, model_b, batches) -> float:
    import torch

    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            a = model_a(**batch).logits.float()
            b = model_b(**batch).logits.float()
            mask = batch["attention_mask"].bool()
            worst = max(worst, (a - b).abs()[mask].max().item())
    return worst


def merge(
    model_dir: Path, adapter_dir: Path, formatted_eval: Path, out_dir: Path, params: MergeParams, quantize: QuantizeParams
) -> dict[str, Any]:
    """Merge, save as safetensors with tokenizer and model card, and compare logits; returns the metrics."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.quantization import load_model, resolve_compute_dtype

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    unmerged = PeftModel.from_pretrained(base, adapter_dir)
    rows = read_jsonl(formatted_eval)[: params.compare_prompts]
    batches = [tokenizer(row["prompt"] + row["completion"], return_tensors="pt") for row in rows]
    reference_logits = []
    with torch.no_grad():
        for batch in batches:
            reference_logits.append(unmerged(**batch).logits.float())

    merged = unmerged.merge_and_unload()
    merged = merged.to(getattr(torch, params.dtype))
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del merged, unmerged, base

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, use_safetensors=True)
    vs_unmerged = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, reference_logits):
            vs_unmerged = max(vs_unmerged, (reloaded(**batch).logits.float() - ref).abs().max().item())

    metrics: dict[str, Any] = {
        "dtype": params.dtype,
        "compare_prompts": len(batches),
        "max_abs_logit_diff_vs_unmerged": round(vs_unmerged, 6),
        "logit_abs_max": round(max(ref.abs().max().item() for ref in reference_logits), 3),
    }
    if quantize.load_in_4bit:
        trained = PeftModel.from_pretrained(load_model(model_dir, quantize, "cpu", torch.float32), adapter_dir)
        trained.eval()
        metrics["max_abs_logit_diff_vs_4bit_trained"] = round(_max_logit_diff(reloaded, trained, batches), 6)
        metrics["quantize_compute_dtype"] = str(resolve_compute_dtype(quantize, "cpu")).removeprefix("torch.")
    return metrics


def model_card(base_record: dict[str, Any], training_params: dict[str, Any], metrics: dict[str, Any]) -> str:
    """README.md of the merged model: where it comes from and how it was made."""
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [qlora, peft, dvc, qlora-pipeline]",
        "---",
        "",
        "# Merged QLoRA fine-tune",
        "",
        f"Base: {base_record.get('source')} `{base_record.get('name')}`"
        + (f" at commit `{base_record['resolved_commit']}`" if base_record.get("resolved_commit") else ""),
        "",
        "Made by qlora-pipeline: 4-bit NF4 base, LoRA adapter trained with trl's SFTTrainer, merged into the",
        f"full-precision base and saved in {metrics['dtype']} as safetensors.",
        "",
        "## Training params",
        "",
        "```json",
        json.dumps(training_params, indent=2),
        "```",
        "",
        "## Merge check",
        "",
        f"Largest absolute logit difference to the unmerged model: {metrics['max_abs_logit_diff_vs_unmerged']}"
        + (f"; to the 4-bit model that was trained: {metrics['max_abs_logit_diff_vs_4bit_trained']}"
           if "max_abs_logit_diff_vs_4bit_trained" in metrics else "")
        + ".",
        "",
    ])
