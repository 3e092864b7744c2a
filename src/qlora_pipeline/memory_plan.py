"""How a training step is executed within the GPU memory it may use (`train.max_memory`).

What is optimized is fixed by params: the rows of each optimizer step, their order, the loss normalization.
How a step is executed is a plan: rows a forward pass, how many of the model's layers recompute their
activations in the backward pass (activation checkpointing), whether passes replay from CUDA graphs, how
much of the 4-bit weights is also kept dequantized. The planner estimates each candidate's peak memory and
step time from the model's shapes and the data's row lengths, and picks the fastest plan that fits. Keys set
by hand (train.micro_batch_size, train.gradient_checkpointing, train.cuda_graphs, train.dequantized_cache_mb)
are taken as they are; the planner chooses the rest.

The memory model (bytes, per token of a pass unless said otherwise), calibrated on Llama-3-8B and 1B shapes
on an H200 (bench/NOTES.md has the measurements it was fitted to):
- a layer that keeps its activations, under peft's LoRA modules: 60 x hidden + 14 x intermediate (bfloat16
  autocast, float32 residual stream, LoRA dropout masks and inputs, attention and MLP intermediates); with the
  fused layers (fused_layers.py) what they keep, counted in layer_activation_bytes;
- a checkpointed layer keeps its float32 input only: 4 x hidden; during the backward pass one layer at a
  time is recomputed, so one full layer's activations come on top;
- the loss head: trl's chunked log-probabilities, 4 x min(vocab, 32,768) + 8 x hidden.
Weights: half a byte per 4-bit parameter plus its quantization constants, 2 or 4 bytes per other parameter
(4 when upcast to float32). LoRA: the weights, their gradients and the optimizer's moments (float32).
The caching allocator and the per-call dequantized weights need some room beyond that: MARGIN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qlora_pipeline.config import LoraParams, QuantizeParams, TrainParams
from qlora_pipeline.errors import PipelineError
# The model on the meta device (its shapes) is built where loading is: the planner's callers take it from here.
from qlora_pipeline.quantization import memory_budget, shapes_only_model  # noqa: F401

GIB = 2**30
MIB = 2**20
# Room left for the allocator's fragmentation and transient buffers: a fraction of the budget and a fixed part.
MARGIN_FRACTION = 0.06
MARGIN_BYTES = 768 * MIB
# trl's chunked log-probability kernel scores this many vocabulary columns at a time.
HEAD_CHUNK = 32768


@dataclass(frozen=True)
class ModelSize:
    """What memory and time follow from: the model's shapes, read from its config without loading a weight."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    linear_params: int        # weights of the blocks' linear layers (stored in 4 bit under QLoRA)
    largest_linear: int       # parameters of the largest of them (dequantized one at a time)
    other_params: int         # embeddings, norms, biases, output head
    lora_params: int          # trainable LoRA parameters
    swiglu: bool = False      # the MLP is down(silu(gate(x)) * up(x)) (fused_layers.is_swiglu)


@dataclass(frozen=True)
class Plan:
    rows_per_pass: int          # at most this many rows a pass
    tokens_per_pass: int        # at most this many tokens a pass (the memory bound; a step takes as many passes as it needs)
    passes_per_step: float      # passes an optimizer step takes on average, with this data
    checkpointed_layers: int
    cuda_graphs: bool
    dequantized_cache_mb: float
    peak_mb: float              # estimated peak GPU memory
    step_s: float               # estimated time of an optimizer step (for ranking plans only)
    loads_on_cpu: bool = False  # FSDP: the 4-bit model is loaded on the CPU, each layer moved to the GPU as it is sharded

    def describe(self) -> str:
        checkpointing = ("no" if not self.checkpointed_layers else f"{self.checkpointed_layers} layers'")
        loading = ", loaded on the CPU and moved to the GPU a layer at a time" if self.loads_on_cpu else ""
        return (f"passes of up to {self.tokens_per_pass:,} tokens and {self.rows_per_pass} rows "
                f"({self.passes_per_step:.2f} a step on average), {checkpointing} activation checkpointing, "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'}, dequantized-weight cache "
                f"{self.dequantized_cache_mb:,.0f} MiB, estimated peak {self.peak_mb / 1024:.1f} GiB{loading}")


def model_size(model, lora: LoraParams) -> ModelSize:
    """The shapes memory and time follow from (of a model on any device, the meta device included)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from qlora_pipeline.fused_layers import is_swiglu
    from qlora_pipeline.quantization import linear_layer_names

    targets = set(linear_layer_names(model) if lora.target_modules == "auto" else lora.target_modules)
    head = model.get_output_embeddings()
    linear = lora_params = largest = 0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            count = module.weight.numel()
            linear += count
            largest = max(largest, count)
            if name.rsplit(".", 1)[-1] in targets:
                lora_params += lora.r * sum(module.weight.shape)
    total = sum(p.numel() for p in model.parameters())
    text = model.config.get_text_config()
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    swiglu = any(is_swiglu(module) for module in model.modules())
    return ModelSize(layers, hidden, intermediate, text.vocab_size, linear, largest, total - linear, lora_params, swiglu)


def weights_bytes(size: ModelSize, quantize: QuantizeParams, upcast: bool) -> float:
    if quantize.load_in_4bit:
        # Packed 4-bit weights; one constant per 64 weights (8 bit with double quantization, else float32).
        linear = size.linear_params * (0.5 + (1 if quantize.double_quant else 4) / 64)
    else:
        linear = size.linear_params * 2
    return linear + size.other_params * (4 if upcast else 2)


def lora_bytes(size: ModelSize, eight_bit_optimizer: bool) -> float:
    """LoRA weights and gradients (float32), the optimizer's two moments, and the graphs' gradient buffers."""
    return size.lora_params * (4 + 4 + (2 if eight_bit_optimizer else 8) + 4)


def sharded_bytes(size: ModelSize, quantize: QuantizeParams, upcast: bool, eight_bit_optimizer: bool, shards: int) -> float:
    """Weights and LoRA states one process holds during a step when FSDP shards them over `shards` processes:
    its share of the packed 4-bit weights and of the LoRA weights, gradients and optimizer states; the
    quantization constants whole (they are not parameters, every process keeps them); the non-quantized
    parameters (embeddings, norms, head) whole, as they are gathered around the whole step; and two layers'
    weights gathered at once (the one computing and the one prefetched)."""
    packed = size.linear_params * (0.5 if quantize.load_in_4bit else 2)
    constants = size.linear_params * (1 if quantize.double_quant else 4) / 64 if quantize.load_in_4bit else 0.0
    other = size.other_params * (4 if upcast else 2)
    gathered_layers = 2 * (packed + size.lora_params * 4) / size.layers
    return (packed + lora_bytes(size, eight_bit_optimizer)) / shards + constants + other + gathered_layers


def layer_activation_bytes(size: ModelSize, fused: bool, upcast: bool, dropout: bool) -> float:
    """Bytes a token of a pass keeps in a layer that is not checkpointed. Fused, Llama with dropout and a float32
    residual stream: 28 x hidden + 7 x intermediate, 215 KB on the 8 B shape, where bench/step_profile.py measured
    217 KB (the pass's peak over tokens and layers, so the head and transients included)."""
    hidden, intermediate = size.hidden, size.intermediate
    if not fused:
        return 60 * hidden + 14 * intermediate
    residual = 4 if upcast else 2
    norms = 2 * residual * hidden                     # the two norms' inputs
    lora_inputs = 2 * (3 * hidden + intermediate)     # one 16-bit copy of each distinct input (qkv, o, gate/up, down)
    masks = (6 * hidden + intermediate) if dropout else 0   # one byte an input element of each LoRA layer
    attention = 8 * hidden                            # queries, keys, values (grouped heads expanded), output
    mlp = 4 * intermediate if size.swiglu else 3 * residual * intermediate
    return norms + lora_inputs + masks + attention + mlp


def activation_bytes(size: ModelSize, tokens: int, checkpointed_layers: int, full_layer: float | None = None) -> float:
    full_layer = layer_activation_bytes(size, False, True, True) if full_layer is None else full_layer
    kept = (size.layers - checkpointed_layers) * full_layer + checkpointed_layers * 4 * size.hidden
    recompute = full_layer if checkpointed_layers else 0
    head = 4 * min(size.vocab, HEAD_CHUNK) + 8 * size.hidden
    # The largest weight dequantized for a call, twice (forward and backward can overlap in the allocator).
    return tokens * (kept + recompute + head) + 2 * 2 * size.largest_linear


def step_seconds(size: ModelSize, tokens_per_step: int, passes: int, checkpointed_layers: int, graphs: bool,
                 cached_fraction: float) -> float:
    """A rough step time on a current GPU, to rank plans: matrix work (slower in small passes, whose matrix
    products cannot fill the GPU), dequantization, kernel launches."""
    recompute = checkpointed_layers / size.layers / 3          # a checkpointed layer runs its forward twice
    tokens_per_pass = tokens_per_step / passes
    efficiency = tokens_per_pass / (tokens_per_pass + 384)
    matmul = 6 * (size.linear_params + size.vocab * size.hidden) * tokens_per_step * (1 + recompute) / 4e14 / efficiency
    dequantize = passes * (2 + 3 * recompute) * size.linear_params * 2.5 / 2e12 * (1 - cached_fraction)
    launches = passes * (size.layers * 150 + 100) * 5e-6 * (0.05 if graphs else 1)
    return matmul + dequantize + launches


def longest_pass_tokens(row_lengths: list[int], rows_per_pass: int, packing: bool) -> int:
    """The most tokens a pass of `rows_per_pass` rows can hold: the longest rows together (packed), or the
    longest row times the rows (padded)."""
    longest = sorted(row_lengths, reverse=True)[:rows_per_pass]
    return sum(longest) if packing else longest[0] * rows_per_pass


def mean_passes(row_lengths: list[int], rows_per_step: int, max_tokens: float, max_rows: int, packing: bool,
                seed: int = 0, by_length: bool = False) -> float:
    """Passes an optimizer step takes on average under these bounds: the data's steps of one shuffled epoch.
    by_length: padded passes as packing.sorted_passes makes them (graphed runs)."""
    import random

    from qlora_pipeline.packing import sorted_passes, split_into_passes

    order = list(row_lengths)
    random.Random(seed).shuffle(order)
    steps = [order[i:i + rows_per_step] for i in range(0, len(order), rows_per_step)]
    if by_length and not packing:
        return sum(len(sorted_passes(step, max_tokens, max_rows)[1]) for step in steps) / max(len(steps), 1)
    return sum(len(split_into_passes(step, max_tokens, max_rows, packing)) for step in steps) / max(len(steps), 1)


def plan_step(size: ModelSize, params: TrainParams, quantize: QuantizeParams, rows_per_process: int,
              row_lengths: list[int], packing: bool, budget: float, eight_bit_optimizer: bool,
              graphs_allowed: bool, shards: int = 1, layer_bytes: float | None = None) -> Plan:
    """The fastest plan whose estimated peak fits `budget` bytes; PipelineError naming train.max_memory and
    the smallest budget that would do when none fits.

    A pass holds at most a token budget (train.micro_batch_size set by hand: at most that many rows instead),
    so memory is bounded by the budget whatever rows a step draws; a step with long rows takes more passes.

    layer_bytes: what a token keeps in a layer that is not checkpointed (layer_activation_bytes; None: peft's modules).

    shards > 1: the weights and LoRA states sharded over that many processes by FSDP (sharded_bytes). Each
    process loads the whole model on its GPU before sharding it, where that fits (accelerate 1.15 skips its
    low-memory loading for 4-bit weights); where it does not, on the CPU, each layer then moved to the GPU as
    it is sharded (loads_on_cpu: slower to start, as bitsandbytes quantizes on the CPU, and the host holds a
    whole model for each process while loading), so that the GPU holds the shards and one whole layer at most.
    Every process must run as many passes as the others (each pass gathers the weights together), so passes
    hold a fixed number of rows and the token bound is what those rows can reach; no CUDA graphs. A dequantized
    cache is a whole copy on every process (made before the weights are sharded, so it counts beside the loading
    too): only the memory the sharded step leaves, and on `auto` none when loading on the CPU (it would be
    dequantized there, slowly, and held in host memory by every process beside its model; a run that short of
    GPU memory has little to give it anyway)."""
    upcast = params.upcast_non_quantized
    usable = budget * (1 - MARGIN_FRACTION) - MARGIN_BYTES
    loads_on_cpu = False
    if shards > 1:
        fixed = sharded_bytes(size, quantize, upcast, eight_bit_optimizer, shards)
        loading = weights_bytes(size, quantize, upcast)
        loads_on_cpu = loading > usable
        if loads_on_cpu:   # the shards so far and one whole layer: less than the step's own `fixed`
            loading = 0.0
        graphs_allowed = False
    else:
        fixed = weights_bytes(size, quantize, upcast) + lora_bytes(size, eight_bit_optimizer)
        loading = 0.0
    longest_row = max(row_lengths)
    if params.micro_batch_size != "auto":
        rows = min(params.micro_batch_size, rows_per_process)
        bounds = [(rows, longest_pass_tokens(row_lengths, rows, packing))]
    elif shards > 1:
        bounds = [(rows, longest_pass_tokens(row_lengths, rows, packing)) for rows in range(1, rows_per_process + 1)]
    else:
        # Token budgets from the longest row (one row a pass at worst) to the longest possible step, by 1/8ths.
        most = longest_pass_tokens(row_lengths, rows_per_process, packing)
        budgets, tokens = [], longest_row
        while tokens < most:
            budgets.append(tokens)
            tokens = int(tokens * 1.125) + 1
        budgets.append(most)
        bounds = [(rows_per_process, tokens) for tokens in budgets]
    if params.cuda_graphs is True:   # a graph holds no checkpointed layer (cuda_graphs.py)
        checkpoint_options = [0]
    elif params.gradient_checkpointing == "auto":
        checkpoint_options = range(size.layers + 1)
    else:
        checkpoint_options = [size.layers if params.gradient_checkpointing else 0]
    typical_step = sorted(row_lengths)[len(row_lengths) // 2] * rows_per_process
    candidates, smallest = [], math.inf
    for rows, tokens in bounds:
        passes = None
        for layers in checkpoint_options:
            need = max(fixed + activation_bytes(size, tokens, layers, layer_bytes), loading)
            smallest = min(smallest, (need + MARGIN_BYTES) / (1 - MARGIN_FRACTION))
            if need > usable:
                continue
            if passes is None:
                passes = mean_passes(row_lengths, rows_per_process, tokens, rows, packing)
            graph_options = [graphs_allowed and layers == 0] if params.cuda_graphs == "auto" else [bool(params.cuda_graphs)]
            for graphs in graph_options:
                cache = _cache_mb(size, quantize, params, 0.0 if loads_on_cpu else usable - need)
                cached_fraction = min(1.0, cache * MIB / max(size.linear_params * 2, 1))
                candidates.append(Plan(rows, tokens, round(passes, 2), layers, graphs, cache,
                                       round((need + cache * MIB) / MIB, 1),
                                       step_seconds(size, typical_step, passes, layers, graphs, cached_fraction),
                                       loads_on_cpu))
    if not candidates:
        sharded = f", sharded over {shards} processes" if shards > 1 else ""
        checkpointing = "no layer checkpointed: train.cuda_graphs is true" if params.cuda_graphs is True else (
            "every layer checkpointed" if max(checkpoint_options) else "no layer checkpointed")
        raise PipelineError(
            f"params key 'train.max_memory': {budget / GIB:.1f} GiB is less than the {smallest / GIB:.1f} GiB that the "
            f"smallest execution of this model and data needs{sharded} (the longest row, {longest_row:,} tokens, "
            f"alone in a pass, {checkpointing}); give it more, or shorten tokenize.max_length"
        )
    best = min(candidates, key=lambda plan: (round(plan.step_s, 4), plan.peak_mb))
    # Graphed padded passes run by length (packing.sorted_passes): the passes the run will take. The ranking above
    # counts them in the data's order, as step_seconds counts no padding either (a step's fewer padded tokens by
    # length and its second launch are left out of it alike; measured on the GPU instead, bench/NOTES.md).
    from qlora_pipeline.packing import runs_by_length

    if runs_by_length(best.cuda_graphs, packing):
        best = replace(best, passes_per_step=round(mean_passes(
            row_lengths, rows_per_process, best.tokens_per_pass, best.rows_per_pass, packing, by_length=True), 2))
    return best


def _cache_mb(size: ModelSize, quantize: QuantizeParams, params: TrainParams, spare: float) -> float:
    """MiB of dequantized weights to keep: as set, or (auto) as much of them as the spare memory holds."""
    if not quantize.load_in_4bit:
        return 0.0
    whole = size.linear_params * 2 / MIB
    if params.dequantized_cache_mb != "auto":
        return min(float(params.dequantized_cache_mb), whole)
    return max(0.0, min(whole, math.floor(spare / MIB)))


def fallback(plan: Plan, size: ModelSize, rows_per_process: int, row_lengths: list[int], packing: bool) -> Plan | None:
    """The next smaller plan after an out-of-memory error: no cache and no graphs first, then every layer
    checkpointed, then half the tokens a pass (down to the longest row); None when there is none."""
    if plan.dequantized_cache_mb or plan.cuda_graphs:   # eager passes: in the data's order (not by length)
        return replace(plan, dequantized_cache_mb=0.0, cuda_graphs=False, passes_per_step=round(
            mean_passes(row_lengths, rows_per_process, plan.tokens_per_pass, plan.rows_per_pass, packing), 2))
    if plan.checkpointed_layers < size.layers:
        return replace(plan, checkpointed_layers=size.layers)
    longest_row = max(row_lengths)
    if plan.tokens_per_pass <= longest_row:    # the longest row alone in a pass: nothing smaller to fall back to
        return None
    tokens = max(longest_row, plan.tokens_per_pass // 2)
    return replace(plan, tokens_per_pass=tokens, passes_per_step=round(
        mean_passes(row_lengths, rows_per_process, tokens, plan.rows_per_pass, packing), 2))
