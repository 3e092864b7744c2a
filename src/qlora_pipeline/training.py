"""The train stage: QLoRA with bitsandbytes 4-bit weights, a peft LoRA adapter and trl's SFTTrainer.

Rows per optimizer step = train.batch_size x train.grad_accum: that is what is optimized. How those rows
are executed is separate: `train.micro_batch_size` rows a forward pass (auto: all of them in one pass),
batches padded per batch (never to a fixed length), padding masked out of attention and loss. The loss
is normalized by the trained tokens of the whole optimizer step, so splitting a step into micro-batches
changes the arithmetic order only, not what is optimized.
"""

from __future__ import annotations

import csv
import io
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_pipeline.config import LoraParams, QuantizeParams, TrainParams
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.quantization import (
    load_model,
    lora_config,
    resolve_compute_dtype,
    resolve_device,
    resolve_target_modules,
)

STEP_LOG_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "seconds")


class TokenCountingCollator:
    """trl's collator, counting the real (non-padding) and trained tokens that pass through it."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of if pad_to_multiple_of > 1 else None
        )
        self.real_tokens = 0
        self.trained_tokens = 0
        self.padded_tokens = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["input_ids"].numel()
        self.trained_tokens += int((batch["labels"] != -100).sum())
        return batch


def _step_logger(collator: TokenCountingCollator, rows: list[dict]):
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):
        """Keeps one row per logged step: loss, learning rate, gradient norm, tokens seen, wall time."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                rows.append({
                    "step": state.global_step,
                    "epoch": round(state.epoch or 0.0, 4),
                    "loss": round(logs["loss"], 6),
                    "learning_rate": logs.get("learning_rate"),
                    "grad_norm": round(float(logs["grad_norm"]), 6) if logs.get("grad_norm") is not None else None,
                    "tokens": collator.real_tokens,
                    "seconds": round(time.perf_counter() - self.start, 3),
                })

    return StepLogger()


def sft_trainer_class(token_metrics: bool):
    """trl's SFTTrainer, or (token_metrics false) one whose loss is trl's own fused-head loss without the
    per-step entropy and token-accuracy metrics, whose `.item()` calls make every step wait for the GPU."""
    from trl import SFTTrainer

    if token_metrics:
        return SFTTrainer

    class SFTTrainerWithoutTokenMetrics(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return SFTTrainerWithoutTokenMetrics


def resolve_optimizer(name: str, device: str, trainable_params: int) -> str:
    """`auto`: torch's fused AdamW on a GPU unless bitsandbytes' 8-bit states would save at least 1 GiB
    (6 bytes a parameter: two float32 moments against two 8-bit ones); 8-bit AdamW otherwise."""
    if name != "auto":
        return name
    if device == "cuda" and trainable_params * 6 < 2**30:
        return "adamw_torch_fused"
    return "adamw_8bit"


def fuse_activations(model) -> int:
    """Swap GPT-2's gelu_new, composed of eight elementwise ops (each kept for the backward pass), for
    PyTorch's fused kernel of the same tanh approximation. Returns how many modules were swapped."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def _dequantized_forward(self, x):
    """Linear4bit.forward with the weight dequantized once: bitsandbytes' 4-bit matmul also dequantizes to the
    compute dtype and multiplies, so the arithmetic is the same; only the per-call dequantization is gone."""
    import torch.nn.functional as F

    input_dtype = x.dtype
    x = x.to(self.dequantized_weight.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.dequantized_weight, bias).to(input_dtype)


def cache_dequantized_weights(model, compute_dtype, budget_mb: float) -> float:
    """Keep each frozen 4-bit weight also dequantized in `compute_dtype`, if all of them fit in `budget_mb`.
    Returns the MiB used (0 when they do not fit or the model has no 4-bit layers)."""
    import types

    import bitsandbytes as bnb
    import torch

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    element_size = torch.empty((), dtype=compute_dtype).element_size()
    size_mb = sum(m.weight.quant_state.shape.numel() for m in layers) * element_size / 2**20
    if not layers or size_mb > budget_mb:
        return 0.0
    for layer in layers:
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        dtype = layer.compute_dtype or compute_dtype
        layer.register_buffer("dequantized_weight", weight.to(dtype), persistent=False)
        layer.forward = types.MethodType(_dequantized_forward, layer)
    return round(size_mb, 1)


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # Peak resident set of this process (KiB on Linux).
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def train(
    model_dir: Path,
    tokenized_dir: Path,
    adapter_dir: Path,
    quantize: QuantizeParams,
    lora: LoraParams,
    params: TrainParams,
    seed: int,
) -> tuple[dict[str, Any], list[dict]]:
    """Train a LoRA adapter on the 4-bit base; save it to `adapter_dir`; return metrics and the step log."""
    import datasets
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig

    device = resolve_device(params.device)
    compute_dtype = resolve_compute_dtype(quantize, device)
    rows_per_step = params.batch_size * params.grad_accum
    micro_batch = rows_per_step if params.micro_batch_size == "auto" else params.micro_batch_size
    if rows_per_step % micro_batch:
        raise PipelineError(
            f"params key 'train.micro_batch_size': {micro_batch} does not divide the {rows_per_step} rows of an optimizer step"
        )
    if device == "cuda":
        # cuDNN's attention rebuilds its plan for every new sequence length: with per-batch padding
        # that costs more than the attention itself (DESIGN.md, measured on H200).
        torch.backends.cuda.enable_cudnn_sdp(params.sdpa_cudnn)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set = datasets.load_from_disk(str(tokenized_dir / "train")).select_columns(["input_ids", "labels"])

    model = load_model(model_dir, quantize, device, compute_dtype)
    if params.fused_activation:
        fuse_activations(model)
    dequantized_mb = cache_dequantized_weights(model, compute_dtype, params.dequantized_cache_mb) if quantize.load_in_4bit else 0.0
    if quantize.load_in_4bit and params.upcast_non_quantized:
        # The usual QLoRA preparation: embeddings, norms and biases in float32 for numerical stability.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets = resolve_target_modules(model, lora)
    model = get_peft_model(model, lora_config(lora, targets))
    trainable, all_params = model.get_nb_trainable_parameters()
    optimizer = resolve_optimizer(params.optim, device, trainable)

    # The trainer wants a directory of its own; nothing is saved there (checkpoints are off).
    work_dir = tempfile.mkdtemp(prefix="qlora-trainer-")
    collator = TokenCountingCollator(tokenizer.pad_token_id, params.pad_to_multiple_of)
    step_rows: list[dict] = []
    config = SFTConfig(
        output_dir=work_dir,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=rows_per_step // micro_batch,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # a float < 1 is a fraction of the total steps
        optim=optimizer,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        gradient_checkpointing=params.gradient_checkpointing,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=device == "cpu",
        logging_steps=params.log_every_steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    trainer = sft_trainer_class(params.token_metrics)(
        model=model,
        args=config,
        train_dataset=train_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[_step_logger(collator, step_rows)],
    )
    # trl casts the LoRA weights of a quantized model to bfloat16, whatever the device and compute dtype.
    # Keep them float32 (peft's default): the optimizer then updates full-precision master weights, and
    # on a GPU autocast still runs the matmuls in the compute dtype. On the CPU, bfloat16 matmuls are slow.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)

    steps = trainer.state.global_step
    metrics = {
        "train_loss": round(result.training_loss, 6),
        "final_step_loss": step_rows[-1]["loss"] if step_rows else None,
        "steps": steps,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "rows_per_step": rows_per_step,
        "micro_batch_size": micro_batch,
        "optimizer": optimizer,
        "dequantized_cache_mb": dequantized_mb,
        "train_rows": len(train_set),
        "real_tokens": collator.real_tokens,
        "trained_tokens": collator.trained_tokens,
        "padded_tokens": collator.padded_tokens,
        "tokens_per_step": round(collator.real_tokens / max(steps, 1), 1),
        "runtime_s": round(seconds, 2),
        "real_tokens_per_s": round(collator.real_tokens / seconds, 1),
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda max allocated" if device == "cuda" else "process max RSS",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "lora_target_modules": targets,
        "lora_trainable_params": trainable,
        "lora_trainable_percent": round(100 * trainable / all_params, 4),
    }
    if not math.isfinite(result.training_loss):
        print(f"warning: training loss is {result.training_loss}", file=sys.stderr)
    return metrics, step_rows


def step_log_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=STEP_LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
