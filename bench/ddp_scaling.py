"""Multi-GPU scaling: the train stage on 1 GPU and on N GPUs (train.num_processes, DDP through torchrun),
same rows per optimizer step, on a model large enough to need it.

The model is Llama-shaped with random weights: TinyLlama-1.1B's architecture (22 layers, hidden 2,048,
MLP 5,632, 32 heads, 4 KV heads) with the embedded tokenizer's 49,152-token vocabulary, 1.17 B
parameters, saved as models/base of a throw-away project. The rows are ../shared/data/alpaca_sample_1k.json
through the pipeline's own download, subset, format and tokenize stages; then `python stages/train.py`
runs once per process count (and `--repeat` times on one GPU, to see how far two identical GPU runs differ).

    python bench/ddp_scaling.py --data ../shared/data/alpaca_sample_1k.json --tokenizer models/base --processes 1 2

Prints a table and writes bench/results/ddp_scaling-<UTC time>-<gpus>.json. Throughput is real (non-padding)
tokens per second over the steps after the first `--warmup` ones, read from metrics/train_log.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SHAPE = "tinyllama-1.1b"  # qlora_pipeline.sources.RANDOM_CONFIGS


# --smoke: the same code path on the CPU with a 2-layer model, to check the script before GPU time is spent.
SMOKE_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def stage(project: Path, script: str, *args: str) -> None:
    subprocess.run([sys.executable, f"stages/{script}", *args], cwd=project, check=True)


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def steady_tokens_per_s(project: Path, warmup: int) -> float:
    with open(project / "metrics/train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    first, last = rows[warmup - 1], rows[-1]
    return (int(last["tokens"]) - int(first["tokens"])) / (float(last["seconds"]) - float(first["seconds"]))


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def main(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from qlora_pipeline.config import deep_update
    from qlora_pipeline.sources import RANDOM_CONFIGS, random_model

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    project = work / "project"
    project.mkdir(parents=True)
    for name in ("dvc.yaml", "stages", "src"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, project / name)
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "data": {"source": "local", "name": str(Path(args.data).resolve()), "duplicates": "drop"},
        # The sample holds 985 distinct rows: longer runs take more than one epoch of 960.
        "subset": {"train_size": min(args.rows_per_step * args.steps, 960), "eval_size": 16},
        "tokenize": {"max_length": 512},
        "lora": {"dropout": 0.0},  # dropout masks come from each process's random stream: off, runs compare exactly
        "train": {"batch_size": args.rows_per_step, "grad_accum": 1, "max_steps": args.steps,
                  "micro_batch_size": args.micro_batch or "auto",
                  "checkpoint_every_steps": 0, "device": "cpu" if args.smoke else "cuda",
                  "dequantized_cache_mb": args.dequantized_cache_mb},
    })
    write_params(project, params)

    # models/base: the random Llama-shaped model (bfloat16 on disk: half the bytes to write and read).
    base = project / "models/base"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = random_model(SHAPE, params["seed"], tokenizer, dtype="bfloat16", **(SMOKE_SHAPES if args.smoke else {}))
    n_params = model.num_parameters()
    model.save_pretrained(base)
    del model
    tokenizer.save_pretrained(base)
    (base / "source.json").write_text(json.dumps({"source": "random", "name": "llama-1b", "parameters": n_params}))
    for script, *script_args in (("download.py", "data"), ("subset.py",), ("format.py",), ("tokenize_data.py",)):
        stage(project, script, *script_args)

    runs = [(1, repeat) for repeat in range(args.repeat)] + [(n, 0) for n in args.processes if n > 1]
    results, adapters = [], {}
    for processes, repeat in runs:
        write_params(project, deep_update(params, {"train": {"num_processes": processes}}))
        stage(project, "train.py")
        metrics = json.loads((project / "metrics/train.json").read_text())
        adapters[(processes, repeat)] = work / f"adapter-{processes}-{repeat}"
        shutil.copytree(project / "models/adapter", adapters[(processes, repeat)])
        results.append({
            "gpus": processes, "repeat": repeat + 1, "rows_per_step": metrics["rows_per_step"],
            "rows_per_pass_per_gpu": metrics["micro_batch_size"], "steps": metrics["steps"],
            "train_loss": metrics["train_loss"], "final_step_loss": metrics["final_step_loss"],
            "runtime_s": metrics["runtime_s"], "real_tokens": metrics["real_tokens"],
            "tokens_per_s": metrics["real_tokens_per_s"],
            "steady_tokens_per_s": round(steady_tokens_per_s(project, args.warmup), 1),
            "peak_memory_mb_first_gpu": metrics["peak_memory_mb"],
        })
        print(results[-1], flush=True)

    single = results[0]["steady_tokens_per_s"]
    for r in results:
        r["speedup"] = round(r["steady_tokens_per_s"] / single, 3)
        r["scaling_efficiency"] = round(r["speedup"] / r["gpus"], 3)
        r["max_abs_adapter_diff_vs_first_1gpu_run"] = adapter_difference(adapters[(1, 0)], adapters[(r["gpus"], r["repeat"] - 1)])

    print(f"\nmodel: Llama-shaped, {n_params / 1e9:.2f} B parameters, 4-bit NF4 + LoRA; {args.rows_per_step} rows a step, "
          f"{args.steps} steps; dequantized cache {args.dequantized_cache_mb} MiB; throughput after step {args.warmup}")
    print(f"{'GPUs':>4} {'run':>3} {'rows/pass/GPU':>13} {'tokens/s':>9} {'steady tok/s':>12} {'speed-up':>8} "
          f"{'efficiency':>10} {'train loss':>10} {'peak MiB':>9} {'max |Δw| vs 1st':>16}")
    for r in results:
        print(f"{r['gpus']:>4} {r['repeat']:>3} {r['rows_per_pass_per_gpu']:>13} {r['tokens_per_s']:>9.0f} "
              f"{r['steady_tokens_per_s']:>12.0f} {r['speedup']:>7.2f}x {r['scaling_efficiency']:>10.2f} "
              f"{r['train_loss']:>10.6f} {r['peak_memory_mb_first_gpu']:>9.0f} {r['max_abs_adapter_diff_vs_first_1gpu_run']:>16.3g}")

    gpu = torch.cuda.get_device_name() if not args.smoke else "cpu-smoke"
    record = {
        "benchmark": "ddp_scaling", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "gpus_on_host": torch.cuda.device_count(), "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": {"architecture": "llama", "parameters": n_params, **RANDOM_CONFIGS[SHAPE]},
        "dequantized_cache_mb": args.dequantized_cache_mb,
        "data": Path(args.data).name, "rows_per_step": args.rows_per_step, "steps": args.steps, "warmup_steps": args.warmup,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    path = out / f"ddp_scaling-{stamp}-{max(torch.cuda.device_count(), 1)}x{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Alpaca-format JSON rows")
    parser.add_argument("--tokenizer", required=True, help="a directory with the embedded model's tokenizer files")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process (GPU) counts to run")
    parser.add_argument("--rows-per-step", type=int, default=16, help="rows per optimizer step, whatever the GPU count")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady throughput")
    parser.add_argument("--repeat", type=int, default=2, help="runs on one GPU (two: how far identical GPU runs differ)")
    parser.add_argument("--work", default="/tmp/ddp-scaling")
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="train.micro_batch_size: at most this many rows a pass on each GPU (default: auto, all)")
    parser.add_argument("--dequantized-cache-mb", type=float, default=1024,
                        help="train.dequantized_cache_mb (params.yaml's default: 1024, too small to cache this model)")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU (gloo): checks the script only")
    main(parser.parse_args())
