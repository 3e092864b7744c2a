"""The train stage's FSDP path on ONE GPU: pre-sharded decoder layers (trainer.shard_decoder_layers), accelerate's
FSDP2 plugin in the Trainer, a checkpoint saved and resumed from, the gathered adapter. A check for a machine
without two GPUs, not a benchmark: the stage refuses fsdp with one process, so this script patches that
refusal and the sharding decision, and compares with the same run unsharded (tiny Llama, random weights).

    torchrun --nproc_per_node 1 bench/fsdp_one_gpu.py [--out bench/results]

Writes <out>/fsdp_one_gpu-<UTC time>-<gpu>.json: per run (none, fsdp, fsdp resumed from its checkpoint of the
last step, fsdp with the model loaded on the CPU and moved to the GPU layer by layer as it is sharded, which the
plan chooses where the whole model does not fit a GPU) the step losses, gradient norms and held-out losses, the
largest adapter differences none/fsdp and fsdp/loaded on the CPU, and how bitsandbytes' 4-bit quantization of one
matrix on the CPU compares with the GPU's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def prepare(work: Path) -> Path:
    import datasets

    from qlora_pipeline.config import ModelParams
    from qlora_pipeline.prompts import format_rows
    from qlora_pipeline.sources import fetch_model
    from qlora_pipeline.tasks import generate
    from qlora_pipeline.tokenization import load_encoder, tokenize_split

    model_dir = work / "model"
    fetch_model(ModelParams("random", "tiny-llama", "main", False, False), 0, model_dir)
    encoder = load_encoder(model_dir)
    rows = format_rows(generate(64), "alpaca")
    for split, part in (("train", rows[:48]), ("eval", rows[48:])):
        items, _ = tokenize_split(encoder, part, 384, "completion")
        datasets.Dataset.from_list(items).save_to_disk(str(work / "tokenized" / split))
    return model_dir


LOAD_ON_CPU = {"fsdp": False}   # what the patched sharding decision plans for a sharded run


def allow_fsdp_on_one_process() -> None:
    """With one process the whole model always fits where its shards do: the plan loading on the CPU is forced."""
    from dataclasses import replace

    from qlora_pipeline import execution

    resolve = execution.resolve_sharding
    execution.refuse_sharding = lambda *args: None
    execution.resolve_sharding = lambda params, processes, plan: (
        ("fsdp", replace(plan(1), loads_on_cpu=LOAD_ON_CPU["fsdp"], dequantized_cache_mb=0.0))
        if params.sharding == "fsdp" else resolve(params, processes, plan))


def quantization_agreement() -> dict:
    """One bfloat16 matrix (4,096 x 4,096, weights-like scale) quantized to NF4 with double quantization, packed
    as bfloat16 (as under FSDP), on the CPU and on the GPU: the share of packed bytes and constants that differ,
    and the largest difference of the dequantized weights."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.bfloat16)
    (cpu_packed, cpu_state), (gpu_packed, gpu_state) = (
        quantize_4bit(weight.to(device), quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
        for device in ("cpu", "cuda"))
    gpu_packed = gpu_packed.cpu()
    gpu_state.to("cpu")
    differing = (cpu_packed.view(torch.uint8) != gpu_packed.view(torch.uint8)).float().mean().item()
    absmax = (cpu_state.absmax != gpu_state.absmax).float().mean().item()
    second = (cpu_state.state2.absmax != gpu_state.state2.absmax).float().mean().item()
    dequantized = (dequantize_4bit(cpu_packed, cpu_state) - dequantize_4bit(gpu_packed, gpu_state)).abs().max().item()
    return {"packed_bytes_differing": differing, "absmax_codes_differing": absmax, "second_level_differing": second,
            "offset_difference": abs(float(cpu_state.offset) - float(gpu_state.offset)),
            "dequantized_max_difference": dequantized}


def train_once(work: Path, model_dir: Path, name: str, sharding: str, checkpoint_dir: Path | None) -> dict:
    from helpers import tiny_params
    from qlora_pipeline import training
    from qlora_pipeline.config import parse_params

    p = parse_params(tiny_params(lora={"dropout": 0.0}, train={
        "sharding": sharding, "cuda_graphs": False, "batch_size": 8, "grad_accum": 1, "max_steps": 4,
        "log_every_steps": 1, "checkpoint_every_steps": 2 if checkpoint_dir else 0, "eval_every_steps": 2,
        "optim": "adamw_torch", "gradient_checkpointing": False}))
    metrics, steps, evals = training.train(model_dir, work / "tokenized", work / name, p.quantize, p.lora, p.train,
                                           p.seed, checkpoint_dir=checkpoint_dir)
    return {"sharding": metrics["sharding"], "resumed_from_step": metrics["resumed_from_step"],
            "steps": metrics["steps"], "losses": [s["loss"] for s in steps],
            "grad_norms": [s["grad_norm"] for s in steps], "eval_losses": [e["loss"] for e in evals],
            "peak_memory_mb": metrics["peak_memory_mb"], "execution": metrics["execution"]}


def main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = prepare(work)
    allow_fsdp_on_one_process()
    results = {"none": train_once(work, model_dir, "none", "none", None),
               "fsdp": train_once(work, model_dir, "fsdp", "fsdp", work / "checkpoints")}
    results["checkpoints"] = sorted(p.name for p in (work / "checkpoints").iterdir())
    # train() leaves the checkpoints (the stage finishes them): the same run again resumes from the last one.
    results["fsdp_resumed"] = train_once(work, model_dir, "fsdp-resumed", "fsdp", work / "checkpoints")
    unsharded, sharded = (load_file(work / name / "adapter_model.safetensors") for name in ("none", "fsdp"))
    LOAD_ON_CPU["fsdp"] = True
    results["fsdp_loaded_on_cpu"] = train_once(work, model_dir, "fsdp-cpu", "fsdp", None)
    loaded_on_cpu = load_file(work / "fsdp-cpu" / "adapter_model.safetensors")
    results["adapter_max_difference"] = max((unsharded[k].float() - sharded[k].float()).abs().max().item()
                                            for k in unsharded)
    results["adapter_max_difference_loaded_on_cpu"] = max(
        (sharded[k].float() - loaded_on_cpu[k].float()).abs().max().item() for k in sharded)
    results["quantization_cpu_vs_gpu"] = quantization_agreement()
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {"benchmark": "fsdp_one_gpu", "gpu": gpu,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **results}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    out = Path(args.out) / f"fsdp_one_gpu-{stamp}-{gpu.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'run':13} {'steps':>5}  losses")
    for name in ("none", "fsdp", "fsdp_resumed", "fsdp_loaded_on_cpu"):
        print(f"{name:18} {results[name]['steps']:>5}  {results[name]['losses']}  peak {results[name]['peak_memory_mb']} MiB")
    print(f"adapter max |none - fsdp| {results['adapter_max_difference']:.2e}, |fsdp - loaded on the CPU| "
          f"{results['adapter_max_difference_loaded_on_cpu']:.2e}")
    print(f"quantized on the CPU vs the GPU: {results['quantization_cpu_vs_gpu']}; wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/fsdp-one-gpu")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    main(parser.parse_args())
