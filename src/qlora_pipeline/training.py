"""The train stage: QLoRA with bitsandbytes 4-bit weights, a peft LoRA adapter and trl's SFTTrainer.

Rows per optimizer step = train.batch_size x train.grad_accum: that is what is optimized. How those rows
are executed is separate: `train.micro_batch_size` rows a forward pass (auto: all of them in one pass),
batches padded per batch (never to a fixed length), padding masked out of attention and loss. The loss
is normalized by the trained tokens of the whole optimizer step, so splitting a step into micro-batches
changes the arithmetic order only, not what is optimized.
"""

from __future__ import annotations

import collections
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora_pipeline import checkpoints
from qlora_pipeline.config import LoraParams, QuantizeParams, TrainParams, as_dict
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.quantization import (
    load_model,
    lora_config,
    resolve_compute_dtype,
    resolve_device,
    resolve_target_modules,
)

class TokenCountingCollator:
    """trl's collator, counting the real (non-padding), trained and padded tokens of each batch.

    The data loader collates ahead of training, so a batch's counts wait in `pending` until the trainer
    takes the batch (`count_next`): the totals are those of the batches trained on, which a checkpoint
    can then record exactly."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of if pad_to_multiple_of > 1 else None
        )
        self.pending: collections.deque[tuple[int, int, int]] = collections.deque()
        self.real_tokens = 0
        self.trained_tokens = 0
        self.padded_tokens = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.pending.append((
            int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum()), batch["input_ids"].numel()
        ))
        return batch

    def count_next(self) -> None:
        real, trained, padded = self.pending.popleft()
        self.real_tokens += real
        self.trained_tokens += trained
        self.padded_tokens += padded


class RunLog:
    """What the pipeline itself keeps of a run: the step log, the loss sum, the token counts and the time
    spent. It is saved in every checkpoint, so a resumed run reports the whole run, not its last part."""

    def __init__(self, collator: TokenCountingCollator):
        self.collator = collator
        self.rows: list[dict] = []
        self.eval_rows: list[dict] = []   # held-out loss at the evaluation steps
        self.loss_sum = 0.0           # sum over optimizer steps of each step's loss
        self.last_logged_step = 0
        self.seconds_before = 0.0     # training time spent before the latest resume
        self.resumed_from_step = 0

    COUNTS = ("real_tokens", "trained_tokens", "padded_tokens")

    def token_counts(self) -> dict[str, int]:
        """Tokens trained on so far, by all processes (a collective call in a distributed run)."""
        return dict(zip(self.COUNTS, _summed_over_processes([getattr(self.collator, n) for n in self.COUNTS])))

    def state(self, seconds: float) -> dict[str, Any]:
        return {"rows": self.rows, "eval_rows": self.eval_rows, "loss_sum": self.loss_sum,
                "last_logged_step": self.last_logged_step, "seconds": seconds, "token_counts": self.token_counts()}

    def restore(self, state: dict[str, Any], step: int) -> None:
        self.rows = state["rows"]
        self.eval_rows = state["eval_rows"]
        self.loss_sum = state["loss_sum"]
        self.last_logged_step = state["last_logged_step"]
        self.seconds_before = state["seconds"]
        self.resumed_from_step = step
        # The saved counts are totals over all processes: one process carries them on, the others add theirs.
        if world()[1] == 0:
            for name, count in state["token_counts"].items():
                setattr(self.collator, name, count)


def _run_log_callback(run_log: RunLog):
    from transformers import TrainerCallback

    class RunLogCallback(TrainerCallback):
        """Keeps one row per logged step (loss, learning rate, gradient norm, tokens seen, wall time) and
        saves the run log into each checkpoint."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def elapsed(self) -> float:
            return run_log.seconds_before + time.perf_counter() - self.start

        def on_step_end(self, args, state, control, **kwargs):
            # Log at every checkpoint and at the end, so the loss of every step reaches the run log
            # (the Trainer forgets the loss of steps it has not logged when it resumes).
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                run_log.loss_sum += logs["loss"] * (state.global_step - run_log.last_logged_step)
                run_log.last_logged_step = state.global_step
                run_log.rows.append({
                    "step": state.global_step,
                    "epoch": round(state.epoch or 0.0, 4),
                    "loss": round(logs["loss"], 6),
                    "learning_rate": logs.get("learning_rate"),
                    "grad_norm": round(float(logs["grad_norm"]), 6) if logs.get("grad_norm") is not None else None,
                    "tokens": run_log.token_counts()["real_tokens"],
                    "seconds": round(self.elapsed(), 3),
                })

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                run_log.eval_rows.append({"step": state.global_step, "loss": round(metrics["eval_loss"], 6)})

        def on_save(self, args, state, control, **kwargs):
            # Every process takes part (the token counts are summed over processes), so every process has
            # finished writing its part of the checkpoint before the main one marks it complete.
            run_state = run_log.state(self.elapsed())
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"{checkpoints.PREFIX}{state.global_step}"
                checkpoints.save_state(checkpoint, run_state)

    return RunLogCallback()


def sft_trainer_class(collator: TokenCountingCollator, token_metrics: bool, graphed=None):
    """trl's SFTTrainer, telling `collator` of each batch it trains on. Without token_metrics, its loss is
    trl's own fused-head loss without the per-step entropy and token-accuracy metrics, whose `.item()`
    calls make every step wait for the GPU. With `graphed` (a cuda_graphs.GraphedTrainingPass), each
    training pass replays a CUDA graph instead of running forward and backward eagerly."""
    from trl import SFTTrainer

    class SFTTrainerCountingTokens(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            collator.count_next()
            if graphed is None:
                return super().training_step(model, inputs, num_items_in_batch)
            # One pass a step in one process (resolve_cuda_graphs): the loss needs no rescaling for
            # gradient accumulation, and the gradients no all-reduce.
            model.train()
            inputs = self._prepare_inputs(inputs)
            labels = inputs["labels"]
            if num_items_in_batch is None:
                num_items_in_batch = (labels[:, 1:] != -100).sum()
            return graphed(inputs["input_ids"], labels, num_items_in_batch)

        def evaluate(self, *args, **kwargs):
            # Held-out batches go through the same collator: their counts are not training's.
            waiting = len(collator.pending)
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                while len(collator.pending) > waiting:
                    collator.pending.pop()

    if token_metrics:
        return SFTTrainerCountingTokens

    class SFTTrainerWithoutTokenMetrics(SFTTrainerCountingTokens):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return SFTTrainerWithoutTokenMetrics


def world() -> tuple[int, int, int]:
    """(world size, rank, local rank) of this process, as torchrun and accelerate set them."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))


def execution_plan(params: TrainParams, num_processes: int) -> tuple[int, int]:
    """(rows a forward pass, forward passes an optimizer step) in each process, so that every optimizer
    step takes train.batch_size x train.grad_accum rows whatever the number of processes."""
    rows_per_step = params.batch_size * params.grad_accum
    if rows_per_step % num_processes:
        raise PipelineError(
            f"params key 'train.num_processes': {num_processes} processes cannot share the {rows_per_step} rows "
            "of an optimizer step evenly (train.batch_size x train.grad_accum)"
        )
    rows_per_process = rows_per_step // num_processes
    micro_batch = rows_per_process if params.micro_batch_size == "auto" else min(params.micro_batch_size, rows_per_process)
    if rows_per_process % micro_batch:
        raise PipelineError(
            f"params key 'train.micro_batch_size': {micro_batch} does not divide the {rows_per_process} rows "
            f"of an optimizer step{' in each process' if num_processes > 1 else ''}"
        )
    return micro_batch, rows_per_process // micro_batch


def _summed_over_processes(values: list[int]) -> list[int]:
    """`values` added up over all processes of a distributed run (unchanged in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = f"cuda:{world()[2]}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def resolve_optimizer(name: str, device: str, trainable_params: int) -> str:
    """`auto`: torch's fused AdamW on a GPU unless bitsandbytes' 8-bit states would save at least 1 GiB
    (6 bytes a parameter: two float32 moments against two 8-bit ones); 8-bit AdamW otherwise."""
    if name != "auto":
        return name
    if device == "cuda" and trainable_params * 6 < 2**30:
        return "adamw_torch_fused"
    return "adamw_8bit"


def resolve_cuda_graphs(params: TrainParams, device: str, num_processes: int, passes_per_step: int, compute_dtype,
                        model) -> bool:
    """`auto`: replay each training pass from a CUDA graph wherever that computes the same as the eager pass
    (see cuda_graphs.py); `true` where it cannot is an error naming the reason."""
    import torch

    from qlora_pipeline.cuda_graphs import unsupported_model

    model_problem = unsupported_model(model)
    reasons = [
        (device != "cuda", "training runs on the CPU"),
        (num_processes > 1, "train.num_processes > 1 (each process's gradients are all-reduced outside a graph)"),
        (passes_per_step > 1, "a step takes several forward passes (train.micro_batch_size)"),
        (params.gradient_checkpointing, "train.gradient_checkpointing is on"),
        (params.token_metrics, "train.token_metrics is on (its metrics are computed outside the pass)"),
        (compute_dtype == torch.float16, "float16 compute needs loss scaling"),
        (model_problem is not None, model_problem),
    ]
    blocking = [reason for applies, reason in reasons if applies]
    if params.cuda_graphs == "auto":
        return not blocking
    if params.cuda_graphs and blocking:
        raise PipelineError(f"params key 'train.cuda_graphs' is true but {blocking[0]}")
    return params.cuda_graphs


def resolve_pad_multiple(params: TrainParams, cuda_graphs: bool) -> int:
    """`auto`: 64 with CUDA graphs (each distinct batch shape costs a capture), else 1 (each batch padded to
    its longest row: no token computed in vain)."""
    if params.pad_to_multiple_of != "auto":
        return params.pad_to_multiple_of
    return 64 if cuda_graphs else 1


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


# Train keys that change neither the arithmetic nor the data order: a run may resume under other values.
_NOT_IN_RUN_IDENTITY = ("checkpoint_every_steps", "log_every_steps")


def resume_params(quantize: QuantizeParams, lora: LoraParams, params: TrainParams, seed: int) -> dict[str, Any]:
    """The params a checkpoint must share with the run that resumes from it."""
    train = {k: v for k, v in as_dict(params).items() if k not in _NOT_IN_RUN_IDENTITY}
    return {"seed": seed, "quantize": as_dict(quantize), "lora": as_dict(lora), "train": train}


def save_adapter(model, tokenizer, adapter_dir: Path) -> None:
    """The adapter and tokenizer, byte for byte the same for the same weights: peft keeps
    target_modules as a set and writes it in hash order, which differs from one process to the next."""
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def peak_reserved_mb(device: str) -> float | None:
    """Peak GPU memory the caching allocator held (None on the CPU): allocated memory plus its cached blocks."""
    import torch

    return round(torch.cuda.max_memory_reserved() / 2**20, 1) if device == "cuda" else None


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
    checkpoint_dir: Path | None = None,
) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """Train a LoRA adapter on the 4-bit base; save it to `adapter_dir`; return metrics, the step log and
    the held-out loss at the evaluation steps.

    With `train.checkpoint_every_steps` > 0, checkpoints go to `checkpoint_dir` and a run cut off earlier
    continues from its last one (see checkpoints.py); the caller calls checkpoints.finish once the outputs
    are in place."""
    import datasets
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig

    device = resolve_device(params.device)
    compute_dtype = resolve_compute_dtype(quantize, device)
    num_processes, rank, local_rank = world()
    if num_processes != params.num_processes:
        raise PipelineError(
            f"params key 'train.num_processes' is {params.num_processes} but the stage runs in {num_processes} processes"
        )
    rows_per_step = params.batch_size * params.grad_accum
    micro_batch, passes_per_step = execution_plan(params, num_processes)
    # Each process holds its own 4-bit copy of the model on its own GPU.
    placement = f"cuda:{local_rank}" if device == "cuda" and num_processes > 1 else device
    if device == "cuda":
        # cuDNN's attention rebuilds its plan for every new sequence length: with per-batch padding
        # that costs more than the attention itself (DESIGN.md, measured on H200).
        torch.backends.cuda.enable_cudnn_sdp(params.sdpa_cudnn)
    resume_from = None
    if params.checkpoint_every_steps:
        if checkpoint_dir is None:
            raise ValueError("train.checkpoint_every_steps > 0 needs a checkpoint directory")
        identity = checkpoints.run_identity(
            resume_params(quantize, lora, params, seed), {"base_model": model_dir, "tokenized_data": tokenized_dir}
        )
        resume_from = checkpoints.prepare(checkpoint_dir, identity, write=rank == 0)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set = datasets.load_from_disk(str(tokenized_dir / "train")).select_columns(["input_ids", "labels"])
    eval_set = datasets.load_from_disk(str(tokenized_dir / "eval")).select_columns(["input_ids", "labels"])

    if placement != device:
        torch.cuda.set_device(placement)
    model = load_model(model_dir, quantize, placement, compute_dtype)
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
    cuda_graphs = resolve_cuda_graphs(params, device, num_processes, passes_per_step, compute_dtype, model)
    pad_multiple = resolve_pad_multiple(params, cuda_graphs)
    graphed = None
    if cuda_graphs:
        from qlora_pipeline.cuda_graphs import GraphedTrainingPass

        graphed = GraphedTrainingPass(model, compute_dtype)

    # The trainer wants a directory of its own even when it saves no checkpoints.
    work_dir = Path(tempfile.mkdtemp(prefix="qlora-trainer-"))
    collator = TokenCountingCollator(tokenizer.pad_token_id, pad_multiple)
    run_log = RunLog(collator)
    if resume_from is not None:
        run_log.restore(checkpoints.load_state(resume_from), int(resume_from.name.removeprefix(checkpoints.PREFIX)))
    config = SFTConfig(
        output_dir=str(checkpoint_dir if params.checkpoint_every_steps else work_dir),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=passes_per_step,
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
        ddp_backend=("gloo" if device == "cpu" else "nccl") if num_processes > 1 else None,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient every step
        logging_steps=params.log_every_steps,
        # The filter checks every pass's loss for NaN on the host, making each step wait for the GPU; a
        # non-finite loss is then reported as it is (and warned about) instead of replaced by an average.
        logging_nan_inf_filter=False,
        eval_strategy="steps" if params.eval_every_steps else "no",
        eval_steps=params.eval_every_steps or None,
        per_device_eval_batch_size=micro_batch,
        prediction_loss_only=True,
        save_strategy="steps" if params.checkpoint_every_steps else "no",
        save_steps=params.checkpoint_every_steps or None,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        disable_tqdm=False,
        # Batches are copied to the GPU from pinned memory without waiting: a blocking copy would make the
        # CPU wait for every queued kernel first, so it could never prepare the next step during this one.
        dataloader_pin_memory=device == "cuda",
        accelerator_config={"non_blocking": device == "cuda"},
    )
    trainer = sft_trainer_class(collator, params.token_metrics, graphed)(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set if params.eval_every_steps else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[_run_log_callback(run_log)],
    )
    # trl casts the LoRA weights of a quantized model to bfloat16, whatever the device and compute dtype.
    # Keep them float32 (peft's default): the optimizer then updates full-precision master weights, and
    # on a GPU autocast still runs the matmuls in the compute dtype. On the CPU, bfloat16 matmuls are slow.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if resume_from is not None:
        print(f"train: resuming from {resume_from}", file=sys.stderr)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    counts = run_log.token_counts()
    if rank == 0:
        save_adapter(model, tokenizer, adapter_dir)

    steps = trainer.state.global_step
    train_loss = run_log.loss_sum / max(steps, 1)
    step_rows = run_log.rows
    eval_rows = run_log.eval_rows
    metrics = {
        "train_loss": round(train_loss, 6),
        "final_step_loss": step_rows[-1]["loss"] if step_rows else None,
        "final_eval_loss": eval_rows[-1]["loss"] if eval_rows else None,
        "steps": steps,
        "resumed_from_step": run_log.resumed_from_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "rows_per_step": rows_per_step,
        "num_processes": num_processes,
        "micro_batch_size": micro_batch,
        "passes_per_step": passes_per_step,
        "optimizer": optimizer,
        "cuda_graphs": cuda_graphs,
        "cuda_graph_shapes": len(graphed.graphs) if graphed else 0,
        "cuda_graph_capture_s": round(graphed.capture_seconds, 2) if graphed else 0.0,
        "pad_to_multiple_of": pad_multiple,
        "dequantized_cache_mb": dequantized_mb,
        "train_rows": len(train_set),
        "real_tokens": counts["real_tokens"],
        "trained_tokens": counts["trained_tokens"],
        "padded_tokens": counts["padded_tokens"],
        "tokens_per_step": round(counts["real_tokens"] / max(steps, 1), 1),
        "runtime_s": round(run_log.seconds_before + seconds, 2),
        "real_tokens_per_s": round(counts["real_tokens"] / (run_log.seconds_before + seconds), 1),
        "peak_memory_mb": peak_memory_mb(device),
        "peak_reserved_mb": peak_reserved_mb(device),
        "peak_memory_kind": ("cuda max allocated" if device == "cuda" else "process max RSS")
        + (" (first process)" if num_processes > 1 else ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "lora_target_modules": targets,
        "lora_trainable_params": trainable,
        "lora_trainable_percent": round(100 * trainable / all_params, 4),
    }
    if not math.isfinite(train_loss):
        print(f"warning: training loss is {train_loss}", file=sys.stderr)
    return metrics, step_rows, eval_rows
