"""The train stage: QLoRA with bitsandbytes 4-bit weights, a peft LoRA adapter and trl's SFTTrainer.

Rows per optimizer step = train.batch_size x train.grad_accum: that is what is optimized, with the loss
normalized by the trained tokens of the whole step. How those rows are executed is separate (execution.py):
rows a forward pass, packed into one sequence or padded, activation checkpointing, CUDA graphs, a cache of
dequantized weights. On a GPU the memory plan (memory_plan.py) picks the fastest execution that fits
`train.max_memory`; none of these choices changes what is optimized, only the arithmetic's order. (One more
than that: a sharded run whose whole model does not fit a GPU loads it on the CPU, where bitsandbytes rounds
0.2 % of its 8-bit scale codes differently; the execution line in metrics/train.json says so.)

The rooms: execution.py and memory_plan.py (how a step is executed), speedups.py (changes to the model that
keep what it computes), trainer.py (the Trainer, its collator and the run log), checkpoints.py (resume).
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from qlora_pipeline import checkpoints, distributed, execution, memory_plan, speedups, trainer
from qlora_pipeline.config import LoraParams, QuantizeParams, TrainParams, as_dict
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.quantization import (host_memory_available, living_objects_left_out_of_collection, load_model,
                                         lora_config, resolve_compute_dtype, resolve_device, resolve_target_modules)

# Optimizer steps within which an out-of-memory error makes the stage retry once with a smaller plan.
FALLBACK_STEPS = 3


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
    import pyarrow.compute
    import torch
    from transformers import AutoTokenizer, set_seed

    device = resolve_device(params.device)
    compute_dtype = resolve_compute_dtype(quantize, device)
    num_processes, rank, local_rank = _join_processes(model_dir, tokenized_dir, quantize, lora, params, seed, device)
    resume_from = _resume_point(model_dir, tokenized_dir, quantize, lora, params, seed, checkpoint_dir, rank)
    if params.checkpoint_every_steps:
        resume_from = distributed.share_resume_point(resume_from, checkpoint_dir)
    train_set, eval_set = (datasets.load_from_disk(str(tokenized_dir / split)).select_columns(["input_ids", "labels"])
                           for split in ("train", "eval"))
    # Planned before any weight is loaded: a budget nothing fits in stops here with one line.
    # Read off the Arrow column, without turning every token id into a Python int.
    row_lengths = pyarrow.compute.list_value_length(train_set.with_format("arrow")["input_ids"]).to_pylist()
    run = plan_execution(model_dir, lora, quantize, params, device, compute_dtype, num_processes, local_rank, row_lengths)
    _refuse_padding_over_context(model_dir, run, max(row_lengths))
    print(f"train: execution: {run.reason}", file=sys.stderr)

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with living_objects_left_out_of_collection():
        model, targets, dequantized_mb = prepare_model(model_dir, quantize, lora, params, run, device, local_rank,
                                                       compute_dtype)
        trainable, all_params = model.get_nb_trainable_parameters()
        optimizer = execution.resolve_optimizer(params.optim, device, trainable)
        initial_adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

        def attempt(run):
            set_seed(seed)
            return trainer.fit(model, tokenizer, train_set, eval_set, params, run, optimizer, compute_dtype, device,
                               num_processes, seed, checkpoint_dir, resume_from)

        start = time.perf_counter()
        try:
            result = attempt(run)
        except torch.OutOfMemoryError as exc:
            # Retried after the except block, once the failed attempt's frames (and their tensors) are gone.
            smaller = _smaller_execution(run, exc, params, model_dir, lora, row_lengths)
            result = None
        if result is None:
            run, dequantized_mb = _shrink_to(model, run, smaller, initial_adapter, dequantized_mb)
            start = time.perf_counter()
            result = attempt(run)
        seconds = time.perf_counter() - start
        if rank == 0:
            trainer.save_adapter(model, tokenizer, adapter_dir, state_dict=result[3])
        return _metrics(result, run, seconds, dequantized_mb, optimizer, device, compute_dtype, num_processes,
                        len(train_set), targets, trainable, all_params, params)


def _refuse_padding_over_context(model_dir, run: execution.Execution, longest_row: int) -> None:
    """train.pad_to_multiple_of must not pad a row past the model's positions (packed, positions restart with each
    row and the pad tail, so only the tail's length counts)."""
    from qlora_pipeline.tokenization import refuse_over_context

    multiple = run.pad_to_multiple_of
    positions = max(longest_row, multiple - 1) if run.packing else -(-longest_row // multiple) * multiple
    refuse_over_context(model_dir, "train.pad_to_multiple_of", positions,
                        f"batches padded to a multiple of {multiple} reach")


def _resume_point(model_dir, tokenized_dir, quantize, lora, params: TrainParams, seed: int, checkpoint_dir, rank: int):
    """The checkpoint a run cut off earlier continues from, or None (checkpoints.py)."""
    if not params.checkpoint_every_steps:
        return None
    if checkpoint_dir is None:
        raise ValueError("train.checkpoint_every_steps > 0 needs a checkpoint directory")
    identity = checkpoints.run_identity(
        checkpoints.resume_params(quantize, lora, params, seed), {"base_model": model_dir, "tokenized_data": tokenized_dir}
    )
    return checkpoints.prepare(checkpoint_dir, identity, write=rank == 0)


def prepare_model(model_dir, quantize: QuantizeParams, lora: LoraParams, params: TrainParams, run: execution.Execution,
                  device: str, local_rank: int, compute_dtype):
    """The 4-bit base on this process's device, changed as the execution says (speedups.py, packed attention,
    checkpointed layers), wrapped with a fresh LoRA adapter. Returns (model, LoRA targets, MiB of dequantized cache)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    placement = f"cuda:{local_rank}" if device == "cuda" and params.num_processes > 1 else device
    if placement != device:
        torch.cuda.set_device(placement)
    if device == "cuda":
        # cuDNN's attention rebuilds its plan for every new sequence length: with per-batch padding
        # that costs more than the attention itself (bench/NOTES.md, measured on H200).
        torch.backends.cuda.enable_cudnn_sdp(params.sdpa_cudnn)
    # FSDP shards only floating-point tensors: the packed 4-bit weights are stored as bfloat16 then (the same
    # bytes; accelerate would otherwise leave uint8 ones whole on every process).
    storage = torch.bfloat16 if run.sharding == "fsdp" else None
    # Where the whole model does not fit the GPU, FSDP moves each layer there as it shards it (trainer.shard_decoder_layers).
    load_device = "cpu" if run.plan is not None and run.plan.loads_on_cpu else placement
    threads = torch.get_num_threads()
    if load_device == "cpu":
        # torchrun gives each of several processes one thread (OMP_NUM_THREADS=1), and bitsandbytes quantizes on
        # the CPU with torch's operations: ~4 minutes for an 8 B model on one thread. The cores are shared out.
        torch.set_num_threads(max(threads, (os.cpu_count() or 1) // params.num_processes))
    try:
        model = load_model(model_dir, quantize, placement, compute_dtype, quant_storage=storage, load_device=load_device)
    finally:
        torch.set_num_threads(threads)
    if params.fused_activation:
        speedups.fuse_activations(model)
    if quantize.load_in_4bit:
        speedups.keep_4bit_layers_trainable(model)
    dequantized_mb = speedups.cache_dequantized_weights(model, compute_dtype, run.dequantized_cache_mb) if quantize.load_in_4bit else 0.0
    if quantize.load_in_4bit and params.upcast_non_quantized:
        # The usual QLoRA preparation: embeddings, norms and biases in float32 for numerical stability.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if run.packing:
        from qlora_pipeline.packing import use_packed_attention

        use_packed_attention(model)
    speedups.checkpoint_layers(model, run.checkpointed_layers)
    targets = resolve_target_modules(model, lora)
    model = get_peft_model(model, lora_config(lora, targets))
    if run.fused_layers:
        from qlora_pipeline import fused_layers

        fused_layers.fuse_lora(model)
        fused_layers.fuse_swiglu(model)
    return model, targets, dequantized_mb


def _shrink_to(model, run: execution.Execution, smaller: execution.Execution, initial_adapter: dict,
               dequantized_mb: float) -> tuple[execution.Execution, float]:
    """After an out-of-memory error with `run`: say so, make the model execute the smaller plan, and put the
    adapter back to where training started. Returns the plan and the MiB of weights still kept dequantized."""
    import torch

    print(f"warning: out of GPU memory in the first {FALLBACK_STEPS} steps with {run.reason}; "
          f"retrying once with {smaller.reason}", file=sys.stderr)
    gc.collect()
    if not smaller.dequantized_cache_mb:
        speedups.drop_dequantized_weights(model)
    speedups.checkpoint_layers(model, smaller.checkpointed_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial_adapter:
                param.copy_(initial_adapter[name])
                param.grad = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # The peak in the metrics is then the retry's (the first attempt's was at the budget, or past it).
        torch.cuda.reset_peak_memory_stats()
    return smaller, min(dequantized_mb, smaller.dequantized_cache_mb)


def _join_processes(model_dir: Path, tokenized_dir: Path, quantize: QuantizeParams, lora: LoraParams,
                    params: TrainParams, seed: int, device: str) -> tuple[int, int, int]:
    """This process's place in the run (processes, rank, local rank). With several, before anything is loaded:
    they start their process group, and processes that would not train the same run stop, all with one line."""
    num_processes, rank, local_rank = execution.world()
    if num_processes != params.num_processes * params.nnodes:
        raise PipelineError(
            f"params keys 'train.num_processes' x 'train.nnodes' make {params.num_processes * params.nnodes} processes "
            f"but the stage runs in {num_processes}"
        )
    if num_processes > 1:
        distributed.start_process_group(device)
        # The rendezvous may differ: --join names it on the other machines, each may wait as long as it likes.
        train_keys = {k: v for k, v in as_dict(params).items() if k not in ("rdzv_endpoint", "rdzv_timeout_s")}
        distributed.refuse_differences({"seed": seed, "quantize": as_dict(quantize), "lora": as_dict(lora),
                                        "train": train_keys},
                                       {"base_model": model_dir, "tokenized_data": tokenized_dir})
    return num_processes, rank, local_rank


def plan_execution(model_dir, lora, quantize, params: TrainParams, device: str, compute_dtype, num_processes: int,
                   local_rank: int, row_lengths: list[int]) -> execution.Execution:
    """How this run executes its steps: on a GPU, the fastest plan within the memory budget."""
    model = memory_plan.shapes_only_model(model_dir)
    rows = execution.rows_per_process(params, num_processes)
    packing, _ = execution.resolve_packing(params, model)
    size = memory_plan.model_size(model, lora)
    execution.refuse_sharding(params, device, num_processes)
    if device != "cuda":
        return execution.cpu_execution(params, rows, packing, size.layers,
                                       execution.uses_fused_layers(params, quantize, "none", device))
    blockers = execution.graph_blockers(params, device, num_processes, compute_dtype, model, packing)
    if params.cuda_graphs is True and blockers:
        raise PipelineError(f"params key 'train.cuda_graphs' is true but {blockers[0]}")
    if params.cuda_graphs is True and params.gradient_checkpointing is True:
        raise PipelineError("params key 'train.cuda_graphs' is true but train.gradient_checkpointing is on")
    # Every process plans with the smallest budget among them, so all execute the same plan: under FSDP every
    # process must run as many passes as the others (each pass gathers the weights together).
    budget = distributed.smallest_over_processes(memory_plan.memory_budget(params.max_memory, local_rank))
    eight_bit = execution.resolve_optimizer(params.optim, device, size.lora_params) == "adamw_8bit"

    def plan_for(shards: int):
        fused = execution.uses_fused_layers(params, quantize, "fsdp" if shards > 1 else "none", device)
        layer_bytes = memory_plan.layer_activation_bytes(size, fused, params.upcast_non_quantized, lora.dropout > 0)
        return memory_plan.plan_step(size, params, quantize, rows, row_lengths, packing, budget, eight_bit,
                                     graphs_allowed=not blockers, shards=shards, layer_bytes=layer_bytes)

    sharding, plan = execution.resolve_sharding(params, num_processes, plan_for)
    if plan.loads_on_cpu:
        _refuse_loading_beyond_host_memory(memory_plan.weights_bytes(size, quantize, params.upcast_non_quantized)
                                           + plan.dequantized_cache_mb * memory_plan.MIB, params.num_processes, budget)
    return execution.gpu_execution(params, plan, rows, packing, budget,
                                   execution.uses_fused_layers(params, quantize, sharding, device), sharding)


def _refuse_loading_beyond_host_memory(model_bytes: float, processes_here: int, budget: float) -> None:
    """A sharded run loading on the CPU holds a whole model (and any dequantized cache) in host memory in each of
    a machine's processes until its layers are on the GPU: one line on every process where some machine has not
    that much available, instead of a process killed for memory halfway and the others waiting for it."""
    available = host_memory_available()
    needed = model_bytes * processes_here
    short = needed > available
    if distributed.agree_on_any(short):
        where = (f"this machine has {available / 2**30:.1f} GiB available" if short
                 else "another machine has less available")
        raise PipelineError(
            f"params key 'train.max_memory': the whole model ({model_bytes / 2**30:.1f} GiB) does not fit a process's "
            f"GPU budget of {budget / 2**30:.1f} GiB beside the plan's margins, so each process loads it on the CPU "
            f"first, {needed / 2**30:.1f} GiB for a machine's {processes_here}, but {where}; free host memory, or "
            "spread the processes over more machines (train.nnodes)"
        )


def _smaller_execution(run: execution.Execution, exc: BaseException, params: TrainParams, model_dir, lora,
                       row_lengths: list[int]) -> execution.Execution:
    """The plan to retry with after an out-of-memory error in the first steps, or a one-line error."""
    step = getattr(exc, "qlora_step", 0)
    smaller = None
    # One process only: in a distributed run (DDP or FSDP) the others would go on with the old plan, out of step.
    if run.plan is not None and step < FALLBACK_STEPS and execution.world()[0] == 1:
        size = memory_plan.model_size(memory_plan.shapes_only_model(model_dir), lora)
        smaller = memory_plan.fallback(run.plan, size, run.rows_per_step, row_lengths, run.packing)
    if smaller is None:
        raise PipelineError(
            f"train: out of GPU memory at step {step} with {run.reason}; lower params key 'train.max_memory' "
            "(or set train.micro_batch_size / train.gradient_checkpointing by hand)"
        ) from exc
    return execution.gpu_execution(params, smaller, run.rows_per_step, run.packing, run.plan.peak_mb * memory_plan.MIB,
                                   run.fused_layers)


def _metrics(result, run: execution.Execution, seconds: float, dequantized_mb: float, optimizer: str, device: str,
             compute_dtype, num_processes: int, train_rows: int, targets, trainable: int, all_params: int,
             params: TrainParams) -> tuple[dict[str, Any], list[dict], list[dict]]:
    import torch

    state, run_log, graphed, _ = result
    collator_passes = run_log.collator.passes
    counts = run_log.token_counts()
    steps = state.global_step
    train_loss = run_log.loss_sum / max(steps, 1)
    step_rows, eval_rows = run_log.rows, run_log.eval_rows
    total_seconds = run_log.seconds_before + seconds
    metrics = {
        "train_loss": round(train_loss, 6),
        "final_step_loss": step_rows[-1]["loss"] if step_rows else None,
        "final_eval_loss": eval_rows[-1]["loss"] if eval_rows else None,
        "steps": steps,
        "resumed_from_step": run_log.resumed_from_step,
        "epochs": round(state.epoch or 0.0, 4),
        "rows_per_step": params.batch_size * params.grad_accum,
        "num_processes": num_processes,
        "nnodes": params.nnodes,
        "sharding": run.sharding,
        "micro_batch_size": run.rows_per_pass,
        "max_tokens_per_pass": run.tokens_per_pass if math.isfinite(run.tokens_per_pass) else None,
        "passes_per_step": round(collator_passes / max(steps - run_log.resumed_from_step, 1), 3),
        "packing": run.packing,
        "checkpointed_layers": run.checkpointed_layers,
        "fused_layers": run.fused_layers,
        "execution": run.reason,
        "estimated_peak_mb": run.plan.peak_mb if run.plan else None,
        "optimizer": optimizer,
        "cuda_graphs": run.cuda_graphs,
        "cuda_graph_shapes": len(graphed.graphs) if graphed else 0,
        "cuda_graph_capture_s": round(graphed.capture_seconds, 2) if graphed else 0.0,
        "pad_to_multiple_of": run.pad_to_multiple_of,
        "dequantized_cache_mb": dequantized_mb,
        "train_rows": train_rows,
        "real_tokens": counts["real_tokens"],
        "trained_tokens": counts["trained_tokens"],
        "padded_tokens": counts["padded_tokens"],
        "tokens_per_step": round(counts["real_tokens"] / max(steps, 1), 1),
        "runtime_s": round(total_seconds, 2),
        "real_tokens_per_s": round(counts["real_tokens"] / total_seconds, 1),
        "peak_memory_mb": trainer.peak_memory_mb(device),
        "peak_reserved_mb": trainer.peak_reserved_mb(device),
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
