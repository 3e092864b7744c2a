"""The merge stage: fold the LoRA adapter into the base and save a plain model.

`merge.base` chooses the weights the adapter is folded into:
- dequantized: the weights the adapter was trained against. Each 4-bit weight is dequantized
  (bitsandbytes' dequantize_4bit of the layer quantized as the train stage quantizes it: quant_type,
  double_quant, from the weights in the compute dtype); every other parameter is taken as the train
  stage loads it. The merged model computes what was trained, up to the final cast to `merge.dtype`.
- original: the original full-precision weights, as the QLoRA tutorials merge: models/base in the dtype the
  source stored them in (a hub or local checkpoint is copied as it is, often bfloat16), read into float32
  exactly. The adapter learned to correct the quantized weights, not these: the merged model differs from
  the trained one by the quantization error of every 4-bit layer, which no training step ever saw.
Without 4-bit quantization the two differ only where training loaded the base in a narrower compute
dtype (bfloat16 on a GPU).

The merge is computed in float32 (W + scale * B @ A), on the GPU if there is one and its free memory holds
the float32 models (else those on the CPU: full_precision_device), and only then cast to `merge.dtype`.
Two figures say how faithful the saved model is:
- vs. trained: against the model that was trained (the 4-bit base with the adapter applied on the fly,
  computing as the train stage computed);
- vs. unmerged: against the chosen base in float32 with the adapter applied on the fly: the cost of the
  merge arithmetic and the final cast alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipeline.config import MergeParams, QuantizeParams
from qlora_pipeline.outputs import read_jsonl


def load_base_as_trained(model_dir: Path, quantize: QuantizeParams, device: str, dtype, dequantize_once: bool = False):
    """The base as the train stage loads it: its linear layers in 4 bit (if `quantize.load_in_4bit`),
    quantized from weights in the compute dtype, and computing as in training; its other parameters in
    `dtype` (training upcasts them to float32, train.upcast_non_quantized).

    dequantize_once: also keep each 4-bit weight dequantized, as the train stage does on the CPU: the same
    arithmetic without dequantizing every weight at every call (5x faster generation on the CPU, measured),
    for a full-precision copy of the linear weights in memory."""
    from qlora_pipeline.quantization import load_model, resolve_compute_dtype
    from qlora_pipeline.speedups import cache_dequantized_weights, keep_4bit_layers_trainable

    compute_dtype = resolve_compute_dtype(quantize, device)
    model = load_model(model_dir, quantize, device, compute_dtype)
    for param in model.parameters():
        if param.dtype.is_floating_point:
            # On the CPU a copy even in the same dtype: a parameter loaded as a view into the checkpoint's memory
            # map keeps the whole file mapped, every weight page read while quantizing counted in the process's
            # memory (3.6 GiB more for a 1 B float32 checkpoint, measured).
            param.data = param.data.to(dtype, copy=param.device.type == "cpu")
    # On a CPU with AVX512-BF16, bitsandbytes runs a 4-bit layer that is not training in a bfloat16 kernel (input
    # and scales in bfloat16) whatever the compute dtype: not the arithmetic the adapter was trained with
    # (dequantize to the compute dtype, then a plain matmul). The train stage turns that kernel off, so here too.
    keep_4bit_layers_trainable(model)
    if dequantize_once:
        cache_dequantized_weights(model, compute_dtype, float("inf"))
    return model.eval()


def load_trained(model_dir: Path, adapter_dir: Path, quantize: QuantizeParams, device: str, dtype,
                 dequantize_once: bool = False):
    """The model that was trained: the base as trained with the adapter applied on the fly."""
    from peft import PeftModel

    base = load_base_as_trained(model_dir, quantize, device, dtype, dequantize_once)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def _linear_4bit_layers(model) -> list[tuple[str, Any]]:
    import bitsandbytes as bnb

    return [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def fold_trained_weights(as_trained, full) -> int:
    """Give `full` (the same architecture, in float32) the weights of `as_trained`: each 4-bit weight
    dequantized, every other parameter as loaded for training. Returns how many 4-bit weights it replaced."""
    import bitsandbytes as bnb
    import torch
    from transformers.pytorch_utils import Conv1D

    quantized = _linear_4bit_layers(as_trained)
    packed = {f"{name}.weight" for name, _ in quantized}
    with torch.no_grad():
        for name, layer in quantized:
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            target = full.get_submodule(name)
            # transformers quantizes GPT-2's Conv1D (weight: in x out) as a Linear4bit (out x in).
            target.weight.copy_(weight.t() if isinstance(target, Conv1D) else weight)
        for name, param in as_trained.named_parameters():
            if name not in packed:
                full.get_parameter(name).copy_(param)
    return len(quantized)


def _logits(model, batches) -> list:
    """Float32 logits of each batch (moved to the model's device), kept on the CPU (a second model may need the
    device's memory)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu() for batch in batches]


def _max_abs_diff(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def full_precision_device(model_dir: Path, device: str, load_in_4bit: bool) -> str:
    """Where the merge keeps its float32 models: `device`, unless they do not fit in the memory free there, then
    the CPU. The merge holds the float32 base (4 bytes a parameter) beside the model as trained (in 4 bit at most
    ~1 more: 4-bit linear weights, float32 embeddings; else float32, 4 more); an 8 B model needs ~37 GB, more
    than a 24 GB card, whose 4-bit copy (~6 GB) still runs on it. Only the float32 copies move: the merged
    weights are the same. On the CPU they need 4 bytes a parameter of host memory (one model at a time)."""
    from qlora_pipeline.quantization import memory_budget, shapes_only_model

    parameters = shapes_only_model(model_dir).num_parameters()
    if device.startswith("cuda"):
        needed = (4 + (1 if load_in_4bit else 4)) * parameters + 2**30  # + logits of the compared prompts
        if needed <= memory_budget("auto"):
            return device
    _require_host_memory(4 * parameters)
    return "cpu"


def _require_host_memory(needed: float) -> None:
    """Stop with one line, before loading anything, where the float32 model cannot fit the memory available."""
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.quantization import host_memory_available

    available = host_memory_available()
    if needed > available:
        raise PipelineError(f"merge needs {needed / 2**30:.1f} GiB of memory for the float32 model on the CPU, "
                            f"{available / 2**30:.1f} GiB are available: free some, or merge on a machine with more")


def free_memory(device: str) -> None:
    """Return what freed models held: to the process (gc), to the system (the C heap) and, on a GPU, to the device."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    # glibc keeps freed heap memory for reuse, but a model's smaller tensors leave it in pieces that the next
    # model's large tensors (allocated with mmap) do not reuse: 1.2 GiB after a 1 B model on the CPU, measured.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def merge(model_dir: Path, adapter_dir: Path, formatted_eval: Path, out_dir: Path, params: MergeParams,
          quantize: QuantizeParams, device: str) -> dict[str, Any]:
    """Merge on `device`, save as safetensors with the tokenizer, and compare logits; returns the metrics.
    Holds the full-precision base and the 4-bit one at once, then one full-precision model at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.quantization import living_objects_left_out_of_collection, resolve_compute_dtype

    with living_objects_left_out_of_collection():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        rows = read_jsonl(formatted_eval)[: params.compare_prompts]
        batches = [tokenizer(row["prompt"] + row["completion"], return_tensors="pt") for row in rows]

        full_device = full_precision_device(model_dir, device, quantize.load_in_4bit)
        # On one device, transformers 5 records no device map, so peft (below) does not dispatch the model again.
        full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                    device_map={"": full_device})
        as_trained = load_base_as_trained(model_dir, quantize, device, torch.float32)
        dequantized = fold_trained_weights(as_trained, full) if params.base == "dequantized" else 0
        trained = PeftModel.from_pretrained(as_trained, adapter_dir).eval()
        trained_logits = _logits(trained, batches)
        del trained, as_trained
        free_memory(device)

        unmerged = PeftModel.from_pretrained(full, adapter_dir).eval()
        unmerged_logits = _logits(unmerged, batches)
        merged = unmerged.merge_and_unload().to(getattr(torch, params.dtype))
        overflow = [name for name, param in merged.named_parameters() if not torch.isfinite(param).all()]
        if overflow:
            raise PipelineError(f"params key 'merge.dtype': {params.dtype} cannot hold the merged weight {overflow[0]} "
                                "(values beyond its range); use bfloat16 or float32")
        merged.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        del merged, unmerged, full
        free_memory(full_device)

        # The model as saved, as the evaluate stage and users load it.
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, use_safetensors=True,
                                                        device_map={"": full_device})
        merged_logits = _logits(reloaded, batches)
        del reloaded
        free_memory(full_device)
        return {
            "base": params.base,
            "dtype": params.dtype,
            "device": device,
            "full_precision_device": full_device,
            "dequantized_weights": dequantized,
            "compare_prompts": len(batches),
            "max_abs_logit_diff_vs_trained": round(_max_abs_diff(merged_logits, trained_logits), 6),
            "max_abs_logit_diff_vs_unmerged": round(_max_abs_diff(merged_logits, unmerged_logits), 6),
            "logit_abs_max": round(max(logits.abs().max().item() for logits in trained_logits), 3),
            "trained_in_4bit": quantize.load_in_4bit,
            "trained_compute_dtype": str(resolve_compute_dtype(quantize, device)).removeprefix("torch."),
        }


_BASE_DESCRIPTION = {
    "dequantized": "the 4-bit NF4 weights it was trained against, dequantized",
    "original": "the original full-precision weights (not the 4-bit ones it was trained against)",
}


def model_card(base_record: dict[str, Any], training_params: dict[str, Any], metrics: dict[str, Any]) -> str:
    """README.md of the merged model: where it comes from and how it was made."""
    into = _BASE_DESCRIPTION[metrics["base"]] if metrics["trained_in_4bit"] else "the full-precision base it was trained on"
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
        "Made by qlora-pipeline: LoRA adapter trained with trl's SFTTrainer"
        + (" on the 4-bit base" if metrics["trained_in_4bit"] else "") + f", merged into {into},",
        f"saved in {metrics['dtype']} as safetensors.",
        "",
        "## Training params",
        "",
        "```json",
        json.dumps(training_params, indent=2),
        "```",
        "",
        "## Merge check",
        "",
        f"Largest absolute logit difference on {metrics['compare_prompts']} held-out prompts (logits reach "
        f"{metrics['logit_abs_max']}): to the model that was trained, {metrics['max_abs_logit_diff_vs_trained']}; "
        f"to its base in float32 with the adapter applied on the fly (the cost of the merge and the cast alone), {metrics['max_abs_logit_diff_vs_unmerged']}.",
        "",
    ])
