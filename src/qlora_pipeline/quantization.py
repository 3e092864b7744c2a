"""4-bit loading (bitsandbytes), LoRA wrapping (peft) and the quantize-inspect report.

Memory figures are `get_memory_footprint()` (parameters and buffers) divided by 2**20, the unit the
tutorial prints as "MB". The 4-bit footprint counts each packed weight at half a byte and every other
parameter at the load dtype; bitsandbytes' quantization constants (absmax, ...) are not parameters and
are not in the footprint.

The report's figures follow from the model's shapes alone, so quantize-inspect reads no weight: it builds
the model on the meta device as a load builds it (shapes_as_loaded), in float32 and in 4 bit, in seconds
and a few hundred MB whatever the model's size (a float32 load of an 8 B model needs ~30 GB).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from qlora_pipeline.config import LoraParams, QuantizeParams
from qlora_pipeline.errors import PipelineError

MIB = 2**20


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params key 'train.device' is 'cuda' but no CUDA GPU is available")
    return requested


def resolve_compute_dtype(quantize: QuantizeParams, device: str):
    """bfloat16 on a GPU that has it; float32 on the CPU, where bfloat16 4-bit matmuls are ~10x slower."""
    import torch

    if quantize.compute_dtype != "auto":
        return getattr(torch, quantize.compute_dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def memory_budget(max_memory: float | str, device_index: int = 0) -> float:
    """Bytes this process may use on its GPU: `train.max_memory` GiB, or (auto) what is free, capped by the
    process's memory fraction (torch.cuda.set_per_process_memory_fraction) where one is set."""
    import torch

    free, total = torch.cuda.mem_get_info(device_index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(device_index) if get_fraction else 1.0
    allowed = min(free, total * fraction)
    if max_memory == "auto":
        return allowed
    return min(float(max_memory) * 2**30, allowed) if max_memory else allowed


def host_memory_available() -> float:
    """Bytes of host memory this process can still take: what the system has available, or less where a cgroup
    (a container, a SLURM job) limits the process."""
    import psutil

    available = [psutil.virtual_memory().available]
    for limit_file, usage_file in (("memory.max", "memory.current"),                                # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        try:
            limit, usage = (Path("/sys/fs/cgroup", name).read_text().strip() for name in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            available.append(int(limit) - int(usage))
    return min(available)


def bnb_config(quantize: QuantizeParams, compute_dtype, quant_storage=None):
    """quant_storage: the dtype the packed 4-bit weights are stored as (None: bitsandbytes' uint8)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize.quant_type,
        bnb_4bit_use_double_quant=quantize.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


@contextlib.contextmanager
def living_objects_left_out_of_collection():
    """Collect the garbage, then, until the block ends, leave every object still alive out of the collector's
    passes (gc.freeze; gc.unfreeze after).

    Enter it before the stage makes its first model. What is alive then, the imported libraries (~380,000 objects
    with torch, transformers and peft) and the stage's inputs, lives through the block anyway, and each full
    collection in it (free_memory after each model, the Trainer's) went over all of it again: 0.18 s a collection
    on a 2-core CPU, ~0.2 s on a GPU host; left out, one takes what the models made. Garbage is collected first and
    the objects are given back to the collector after, so that a process that trains or evaluates several times
    (a benchmark, a test) keeps nothing for good."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def load_model(model_dir: str | Path, quantize: QuantizeParams, device: str, dtype, quant_storage=None,
               load_device: str | None = None):
    """The base model, in 4 bit if `quantize.load_in_4bit` (packed into `quant_storage`, see bnb_config), its other
    parameters in `dtype`, for `device` (its 4-bit compute dtype); loaded and quantized on `load_device` (default:
    `device`; a sharded run may load on the CPU and move the layers to the GPU one at a time)."""
    from transformers import AutoModelForCausalLM

    # No model code runs: config.py refuses model.trust_remote_code, and only safetensors weights load.
    kwargs: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, trust_remote_code=False)
    if quantize.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quantize, resolve_compute_dtype(quantize, device), quant_storage)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": load_device or device}, **kwargs)
    return model


def shapes_only_model(model_dir: str | Path, dtype=None):
    """The model built from its config on the meta device: every shape, no memory, no weight read. Its
    parameters in `dtype` (None: the config's dtype)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))


def shapes_as_loaded(model_dir: str | Path, quantize: QuantizeParams, dtype):
    """The model as `load_model(model_dir, quantize, device, dtype)` holds it (every parameter and buffer of the
    same name, class, shape and dtype), on the meta device: no weight read, no memory. The load's own code
    builds it: transformers' bitsandbytes quantizer replaces the linear layers it would quantize, and
    bitsandbytes packs each of their weights (its meta kernel gives the packed shape)."""
    import re

    import torch

    model = shapes_only_model(model_dir, dtype)
    # What from_pretrained keeps in float32 whatever `dtype` (a model class's _keep_in_fp32_modules, some MoE
    # routers): parameters matching one of its name patterns, matched as transformers' loader matches them.
    keep = model._get_dtype_plan(dtype)
    if keep:
        pattern = re.compile("|".join(f"(?:{name.replace('*', '.*')})" for name in keep))
        for name, param in model.named_parameters():
            if pattern.search(name):
                param.data = param.data.to(torch.float32)
    if not quantize.load_in_4bit:
        return model
    from transformers.quantizers import AutoHfQuantizer

    # The compute dtype changes no size: the CPU's is taken, so that no GPU is asked. pre_quantized=False: the
    # weights are quantized as they load (AutoHfQuantizer's default is a checkpoint already in 4 bit).
    config = bnb_config(quantize, resolve_compute_dtype(quantize, "cpu"))
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    # from_pretrained replaces the layers under the load dtype as default: the new layers' biases take it.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        quantizer.preprocess_model(model, dtype=dtype, device_map={"": "meta"})
    finally:
        torch.set_default_dtype(default)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            # bitsandbytes' packing op on meta: the packed weight's shape and dtype. (Not Params4bit's own
            # quantization, whose double quantization would cache its code table on the meta device for the
            # whole process, breaking every later real load.)
            weight.data, _ = torch.ops.bitsandbytes.quantize_4bit.default(
                weight.data, weight.blocksize, weight.quant_type, weight.quant_storage)
    return model


def linear_layer_names(model) -> list[str]:
    """Leaf names of the layers 4-bit quantization replaces (every linear layer but the output head)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit,)
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    output_head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, kinds) and module is not output_head
    }
    return sorted(names)


def resolve_target_modules(model, lora: LoraParams) -> list[str]:
    """`auto`: all linear layers of the blocks (GPT-2: c_attn, c_proj, c_fc; Llama: q/k/v/o/gate/up/down)."""
    available = linear_layer_names(model)
    if lora.target_modules == "auto":
        return available
    unknown = [m for m in lora.target_modules if m not in available]
    if unknown:
        raise PipelineError(
            f"params key 'lora.target_modules': {', '.join(unknown)} not in the model (linear layers: {', '.join(available)})"
        )
    return list(lora.target_modules)


def lora_config(lora: LoraParams, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def inspect(model_dir: str | Path, quantize: QuantizeParams, lora: LoraParams) -> dict[str, Any]:
    """Describe what quantization and LoRA do to the base: the base as loaded in float32 and as loaded in 4 bit
    (other parameters float16), both built from its shapes alone (shapes_as_loaded), LoRA applied by peft."""
    import torch
    from peft import get_peft_model

    full = shapes_as_loaded(model_dir, QuantizeParams(**{**quantize.__dict__, "load_in_4bit": False}), torch.float32)
    params_total = full.num_parameters()
    size_fp32 = full.get_memory_footprint()
    before = {name: (type(m).__name__, list(m.weight.shape), str(m.weight.dtype).removeprefix("torch.")) for name, m in full.named_modules() if hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.Tensor)}
    memory = {kind: {"float32": size, "qlora": 0} for kind, size in memory_by_module(full).items()}
    del full

    # Non-linear parameters in float16, as the tutorial loads them.
    quantized = shapes_as_loaded(model_dir, quantize, torch.float16)
    size_4bit = quantized.get_memory_footprint()
    for kind, size in memory_by_module(quantized).items():
        memory.setdefault(kind, {"float32": 0, "qlora": 0})["qlora"] = size
    params_4bit = 0
    replaced = []
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or type(weight).__name__ != "Params4bit":
            continue
        params_4bit += weight.numel() * 2 * weight.element_size()  # two 4-bit values a byte
        kind, shape, dtype = before[name]
        replaced.append(
            {"module": name, "from": kind, "to": type(module).__name__, "shape_before": shape, "dtype_before": dtype,
             "shape_after": list(weight.shape), "dtype_after": str(weight.dtype).removeprefix("torch.")}
        )
    targets = resolve_target_modules(quantized, lora)
    peft_model = get_peft_model(quantized, lora_config(lora, targets))
    trainable, all_params = peft_model.get_nb_trainable_parameters()
    estimate = 0.5 * params_4bit + 2 * (params_total - params_4bit)
    return {
        "params_total": params_total,
        "params_4bit": params_4bit,
        "params_not_4bit": params_total - params_4bit,
        "size_fp32_mb": round(size_fp32 / MIB, 2),
        "size_4bit_mb": round(size_4bit / MIB, 2),
        "size_4bit_estimate_mb": round(estimate / MIB, 2),
        "compression": round(size_fp32 / size_4bit, 3),
        "quant_type": quantize.quant_type if quantize.load_in_4bit else None,
        "double_quant": quantize.double_quant,
        "lora_target_modules": targets,
        "lora_trainable_params": trainable,
        "lora_all_params": all_params,
        "lora_trainable_percent": round(100 * trainable / all_params, 4),
        "replaced_modules": replaced,
        "memory_by_module": memory,
    }


def memory_by_module(model) -> dict[str, int]:
    """Bytes of parameters by module type: linear layers by name (q_proj, c_attn, ...), others by class
    (Embedding, LayerNorm, ...). Tied weights count once; 4-bit weights count their packed bytes."""
    from transformers.pytorch_utils import Conv1D
    import torch

    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        linear = isinstance(module, (torch.nn.Linear, Conv1D)) or type(module).__name__.startswith("Linear")
        kind = name.rsplit(".", 1)[-1] if linear else type(module).__name__
        sizes[kind] = sizes.get(kind, 0) + sum(p.numel() * p.element_size() for p in own)
    return sizes


def report_markdown(figures: dict[str, Any], model_record: dict[str, Any]) -> str:
    """A readable report of what quantization did, every figure from this run; for distilgpt2's shapes, the gap
    to the sizes the tutorial printed."""
    kinds: dict[tuple, int] = {}
    for m in figures["replaced_modules"]:
        key = (m["from"], m["to"], m["module"].rsplit(".", 1)[-1], tuple(m["shape_before"]), tuple(m["shape_after"]), m["dtype_after"])
        kinds[key] = kinds.get(key, 0) + 1
    lines = [
        f"# Quantization report: {model_record.get('source')} / {model_record.get('name')}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| parameters of the base model | {figures['params_total']:,} |",
        f"| parameters stored in 4 bit | {figures['params_4bit']:,} |",
        f"| other parameters (embeddings, norms, biases, head) | {figures['params_not_4bit']:,} |",
        f"| size in float32, `get_memory_footprint()` | {figures['size_fp32_mb']} MB |",
        f"| size after 4-bit load (other parameters float16) | {figures['size_4bit_mb']} MB |",
        f"| estimate 0.5 B × 4-bit params + 2 B × others | {figures['size_4bit_estimate_mb']} MB |",
        f"| LoRA trainable parameters | {figures['lora_trainable_params']:,} ({figures['lora_trainable_percent']} % of {figures['lora_all_params']:,}) |",
        f"| LoRA target modules | {', '.join(figures['lora_target_modules'])} |",
        "",
        "MB here is 2^20 bytes, the unit the tutorial prints. Quantization constants (absmax) are not",
        "parameters, so `get_memory_footprint()` leaves them out, as the estimate does.",
        "",
        "Every figure follows from the model's config: the model is built on the meta device as the float32 and",
        "the 4-bit loads build it (transformers' bitsandbytes quantizer, bitsandbytes' packing); no weight is read.",
        "",
        "## Replaced modules",
        "",
        "| count | module | from | to | weight before | weight after |",
        "|---|---|---|---|---|---|",
    ]
    for (src, dst, leaf, shape_b, shape_a, dtype_a), count in kinds.items():
        lines.append(f"| {count} | {leaf} | {src} | {dst} | {list(shape_b)} | {list(shape_a)} {dtype_a} |")
    lines += _tutorial_comparison(figures, kinds)
    return "\n".join(lines) + "\n"


# What the tutorial printed for distilgpt2 (float32, then 4-bit) with transformers 4, in its "MB" (2^20 bytes).
TUTORIAL_DISTILGPT2_MB = (318.47, 101.49)
DISTILGPT2_PARAMS = 81_912_576  # distilgpt2's parameters (the output head is tied to the embeddings)


def _tutorial_comparison(figures: dict[str, Any], kinds: dict[tuple, int]) -> list[str]:
    """For distilgpt2's shapes only: this run's sizes beside the tutorial's, and why they differ."""
    blocks = sum(count for key, count in kinds.items() if key[2] == "c_attn")
    if figures["params_total"] != DISTILGPT2_PARAMS or blocks != 6:
        return []
    here = (figures["size_fp32_mb"], figures["size_4bit_mb"])
    gaps = [round(tutorial - size, 2) for tutorial, size in zip(TUTORIAL_DISTILGPT2_MB, here)]
    lines = [
        "",
        "## Beside the tutorial",
        "",
        f"For distilgpt2 the tutorial printed {TUTORIAL_DISTILGPT2_MB[0]} MB / {TUTORIAL_DISTILGPT2_MB[1]} MB against "
        f"{here[0]} / {here[1]} here: {gaps[0]} / {gaps[1]} MB more.",
    ]
    if gaps == [float(blocks), float(blocks)]:
        lines += [
            f"transformers 4 registered a 1,024 × 1,024 boolean causal-mask buffer (`attn.bias`, 1 MiB) in each of the "
            f"{blocks} attention blocks, and `get_memory_footprint()` counts buffers: {blocks} × 1 MiB = {blocks} MB in both "
            "figures. transformers 5 builds the mask on the fly, so the buffer is gone; the parameters are the same.",
        ]
    return lines
