"""How a training step is executed: processes, rows a pass, packing, CUDA graphs, checkpointing, optimizer.

None of this changes what is optimized (the rows of each optimizer step, their order, the loss and its
normalization); it decides how fast and in how much memory. On a GPU the memory plan (memory_plan.py)
chooses what params leave on `auto`; on the CPU there is no GPU memory to plan for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qlora_pipeline.config import TrainParams
from qlora_pipeline.errors import PipelineError


def world() -> tuple[int, int, int]:
    """(world size, rank, local rank) of this process, as torchrun and accelerate set them."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))


def summed_over_processes(values: list[int]) -> list[int]:
    """`values` added up over all processes of a distributed run (unchanged in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = f"cuda:{world()[2]}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def rows_per_process(params: TrainParams, num_processes: int) -> int:
    """Rows each process trains on in an optimizer step, so that every step takes train.batch_size x
    train.grad_accum rows whatever the number of processes; one-line errors where they do not divide."""
    rows_per_step = params.batch_size * params.grad_accum
    if rows_per_step % num_processes:
        raise PipelineError(
            f"params key 'train.num_processes': {num_processes} processes cannot share the {rows_per_step} rows "
            "of an optimizer step evenly (train.batch_size x train.grad_accum)"
        )
    rows = rows_per_step // num_processes
    if params.micro_batch_size != "auto" and rows % min(params.micro_batch_size, rows):
        raise PipelineError(
            f"params key 'train.micro_batch_size': {params.micro_batch_size} does not divide the {rows} rows "
            f"of an optimizer step{' in each process' if num_processes > 1 else ''}"
        )
    return rows


def resolve_optimizer(name: str, device: str, trainable_params: int) -> str:
    """`auto`: torch's fused AdamW on a GPU unless bitsandbytes' 8-bit states would save at least 1 GiB
    (6 bytes a parameter: two float32 moments against two 8-bit ones); 8-bit AdamW otherwise."""
    if name != "auto":
        return name
    if device == "cuda" and trainable_params * 6 < 2**30:
        return "adamw_torch_fused"
    return "adamw_8bit"


def resolve_packing(params: TrainParams, model) -> tuple[bool, str | None]:
    """`auto`: pack a pass's rows into one sequence wherever packed attention reproduces the padded pass
    (packing.py); `true` where it cannot is an error naming the reason. Returns (packing, why not)."""
    from qlora_pipeline.packing import supports_packing

    problem = supports_packing(model)
    config = model.config.get_text_config()
    dropout = getattr(config, "attention_dropout", None) or getattr(config, "attn_pdrop", None) or 0.0
    if problem is None and dropout:
        problem = "the model applies dropout to its attention weights (packed attention has none)"
    if params.packing == "auto":
        return problem is None, problem
    if params.packing and problem:
        raise PipelineError(f"params key 'train.packing' is true but {problem}")
    return bool(params.packing), problem


def graph_blockers(params: TrainParams, device: str, num_processes: int, compute_dtype, model, packing: bool) -> list[str]:
    """Why passes cannot replay from CUDA graphs and compute what the eager pass computes (cuda_graphs.py);
    empty when they can. Activation checkpointing, which is planned later, is the other reason."""
    import torch

    from qlora_pipeline.cuda_graphs import unsupported_model
    from qlora_pipeline.packing import varlen_attention

    model_problem = unsupported_model(model)
    reasons = [
        (device != "cuda", "training runs on the CPU"),
        (num_processes > 1, "train.num_processes > 1 (each process's gradients are all-reduced outside a graph)"),
        (params.token_metrics, "train.token_metrics is on (its metrics are computed outside the pass)"),
        (compute_dtype == torch.float16, "float16 compute needs loss scaling"),
        (packing and varlen_attention() is None, "packed attention needs torch's varlen_attn on the GPU to be captured"),
        (model_problem is not None, model_problem),
    ]
    return [reason for applies, reason in reasons if applies]


def resolve_pad_multiple(params: TrainParams, cuda_graphs: bool, packing: bool = False) -> int:
    """`auto`: with CUDA graphs (each distinct batch shape costs a capture), 64 for padded batches and 256 for
    packed passes (one sequence of a whole step's rows, thousands of tokens: ~6 % padding on a 2 k-token pass, a
    capture per 256 tokens of spread instead of per 64); else 1 (each batch padded to its longest row, or a packed
    pass to its tokens: no token computed in vain)."""
    if params.pad_to_multiple_of != "auto":
        return params.pad_to_multiple_of
    if not cuda_graphs:
        return 1
    return 256 if packing else 64


@dataclass(frozen=True)
class Execution:
    """The resolved execution of a run, as metrics/train.json reports it."""

    rows_per_step: int            # in this process
    rows_per_pass: int            # at most
    tokens_per_pass: float        # at most (inf: no token bound)
    packing: bool
    cuda_graphs: bool
    checkpointed_layers: int
    dequantized_cache_mb: float
    pad_to_multiple_of: int
    reason: str
    plan: Any = None              # memory_plan.Plan on a GPU, None on the CPU
    sharding: str = "none"        # "fsdp": weights, gradients and optimizer states sharded over the processes
    fused_layers: bool = False    # LoRA layers and SwiGLU MLPs as single autograd functions (fused_layers.py)


def uses_fused_layers(params: TrainParams, quantize, sharding: str, device: str) -> bool:
    """Fused LoRA layers (fused_layers.py) run over bitsandbytes' 4-bit layers. auto: on a GPU, where activation
    memory is what limits a step (on the CPU they compute the same within float32 rounding, but not bit for bit),
    and not under FSDP, where they are checked on the CPU (tests/test_fsdp_training.py) but not yet measured on
    GPUs: there `true` asks for them."""
    if params.fused_layers == "auto":
        return device == "cuda" and quantize.load_in_4bit and sharding != "fsdp"
    return params.fused_layers and quantize.load_in_4bit


def cpu_execution(params: TrainParams, rows: int, packing: bool, layers: int, fused_layers: bool) -> Execution:
    """On the CPU: the rows as params set them (auto: all of a step's in one pass), no graphs."""
    rows_per_pass = rows if params.micro_batch_size == "auto" else min(params.micro_batch_size, rows)
    checkpointed = layers if params.gradient_checkpointing is True else 0
    cache = 2**20 if params.dequantized_cache_mb == "auto" else params.dequantized_cache_mb
    return Execution(rows, rows_per_pass, float("inf"), packing, False, checkpointed, cache,
                     resolve_pad_multiple(params, False), "the CPU: rows a pass and checkpointing as params set them",
                     fused_layers=fused_layers)


def gpu_execution(params: TrainParams, plan, rows: int, packing: bool, budget: float, fused_layers: bool,
                  sharding: str = "none") -> Execution:
    reason = f"fastest plan within {budget / 2**30:.1f} GiB: {plan.describe()}"
    from qlora_pipeline.packing import runs_by_length

    if runs_by_length(plan.cuda_graphs, packing):
        reason += ", a step's rows by length, a step that fits one pass run as two (fewer padded tokens)"
    if sharding == "fsdp":
        reason += ", FSDP (weights, LoRA gradients and optimizer states sharded over the processes)"
    return Execution(rows, plan.rows_per_pass, plan.tokens_per_pass, packing, plan.cuda_graphs, plan.checkpointed_layers,
                     plan.dequantized_cache_mb, resolve_pad_multiple(params, plan.cuda_graphs, packing), reason, plan, sharding,
                     fused_layers)


def refuse_sharding(params: TrainParams, device: str, num_processes: int) -> None:
    """train.sharding 'fsdp' where it cannot run, in one line. On the CPU accelerate 1.15 applies no FSDP plugin
    (it shards only for GPU-like devices; a CPU run with one would silently be DDP)."""
    if params.sharding != "fsdp":
        return
    if device != "cuda":
        raise PipelineError("params key 'train.sharding' is 'fsdp' but training runs on the CPU, where accelerate "
                            "applies no FSDP (it would train whole copies, as DDP): use none or auto")
    if num_processes == 1:
        raise PipelineError("params key 'train.sharding' is 'fsdp' but there is one process to shard over "
                            "(train.num_processes x train.nnodes)")


def resolve_sharding(params: TrainParams, num_processes: int, plan: Callable[[int], Any]) -> tuple[str, Any]:
    """(sharding, plan) on GPUs, where `plan(shards)` plans a step with the model whole (1) or sharded over the
    processes, or raises the planner's one line. auto: fsdp when the whole model's plan does not fit the
    budget of some process (decided by all of them together: they must all shard or none), else none."""
    from qlora_pipeline.distributed import agree_on_any

    if params.sharding == "none" or num_processes == 1:
        return "none", plan(1)
    if params.sharding == "fsdp":
        return "fsdp", plan(num_processes)
    try:
        whole, whole_error = plan(1), None
    except PipelineError as exc:
        whole, whole_error = None, exc
    if not agree_on_any(whole is None):
        return "none", whole
    try:
        return "fsdp", plan(num_processes)
    except PipelineError as exc:
        raise PipelineError(f"{exc} (whole on each process: {whole_error or 'fits here, not on another process'})") from None
