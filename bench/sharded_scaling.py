"""Sharded QLoRA (train.sharding: fsdp) against data-parallel (none) on 1, 2 and 4 GPUs: the Llama-3-8B shape
with random weights under a per-process memory budget that one whole copy of the model does not fit in.

    python bench/scale_speed.py ...   # not needed first: this script builds the model and rows the same way
    python bench/sharded_scaling.py --data .bench-assets/alpaca_sample_1k.json --tokenizer .bench-assets/tokenizer \
        [--gpus 1 2 4] [--memory-cap-gib 7] [--steps 8]

The model and the rows are scale_speed.py's (build_model, prepare_rows: the Alpaca sample, alpaca template,
answers only, max_length 1,024), saved as models/base and data/tokenized of a throw-away project; the train
stage then runs there as `dvc repro` runs it (`python stages/train.py`, which relaunches itself through torchrun
on several GPUs), 16 rows an optimizer step whatever the GPUs. The cap is train.max_memory, the budget the
memory plan executes a step within: under it DDP (sharding none) stops with the planner's one line naming
train.max_memory, fsdp trains; its peak allocated memory (first process) must stay under the cap. Per GPU count:

    1 GPU:   none, no cap                      (the reference)
    N GPUs:  none under the cap, fsdp under the cap, none and fsdp with no cap

Throughput: real (non-padding) tokens per second over the steps after --warmup, from metrics/train_log.csv.
Writes bench/results/sharded_scaling-<UTC time>-<gpus>.json with keys gpu, model {shape, parameters}, results:
[{sharding, gpus, memory_cap_gib, real_tokens_per_s, peak_allocated_mb, error, ...}], and each run's line to
<out>/sharded_scaling-partial.jsonl as it finishes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from ddp_scaling import steady_tokens_per_s, write_params  # noqa: E402
from scale_speed import _versions, build_model, prepare_rows  # noqa: E402

ROWS_PER_STEP = 16   # divides over 1, 2 and 4 processes


def runs(gpu_counts: list[int], cap: float, capped_only: bool = False) -> list[tuple[str, int, float | None]]:
    """(sharding, GPUs, cap in GiB or None) in the order they run (capped_only: the capped runs alone)."""
    planned = [] if capped_only else [("none", 1, None)]
    for gpus in (n for n in gpu_counts if n > 1):
        planned += [("none", gpus, cap), ("fsdp", gpus, cap)]
        planned += [] if capped_only else [("none", gpus, None), ("fsdp", gpus, None)]
    return planned


def train_once(project: Path, params: dict, sharding: str, gpus: int, cap: float | None, warmup: int,
               fused_layers: str = "auto") -> dict:
    from qlora_pipeline.config import deep_update

    fused = {"auto": "auto", "true": True, "false": False}[fused_layers]
    write_params(project, deep_update(params, {"train": {
        "num_processes": gpus, "sharding": sharding, "max_memory": cap or "auto", "fused_layers": fused}}))
    for stale in ("metrics/train.json", "metrics/train_log.csv"):
        (project / stale).unlink(missing_ok=True)
    child = subprocess.run([sys.executable, "stages/train.py"], cwd=project, capture_output=True, text=True)
    result = {"sharding": sharding, "gpus": gpus, "memory_cap_gib": cap, "real_tokens_per_s": None,
              "peak_allocated_mb": None, "error": None}
    if child.returncode:
        lines = child.stderr.strip().splitlines() or ["no output"]
        # A failed worker's exception is above the launcher's last line: keep it beside that line.
        raised = [line for line in lines if re.match(r"(\[rank\d+\]: )?\w+(Error|Exception): ", line)]
        result["error"] = (lines[-1] + (f" ({raised[-1]})" if raised and raised[-1] != lines[-1] else ""))[:600]
        return result
    metrics = json.loads((project / "metrics/train.json").read_text())
    result.update(
        real_tokens_per_s=round(steady_tokens_per_s(project, warmup), 1),
        peak_allocated_mb=metrics["peak_memory_mb"], peak_reserved_mb=metrics["peak_reserved_mb"],
        peak_memory_kind=metrics["peak_memory_kind"], under_cap=(metrics["peak_memory_mb"] < cap * 1024) if cap else None,
        resolved_sharding=metrics["sharding"], execution=metrics["execution"], train_loss=metrics["train_loss"],
        estimated_peak_mb=metrics["estimated_peak_mb"], steps=metrics["steps"], fused_layers=metrics["fused_layers"],
    )
    return result


def main(args: argparse.Namespace) -> None:
    import torch

    work = Path(args.work)
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    for name in ("dvc.yaml", "stages", "src"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, project / name)
    # Built once in the work directory (16 GB of bfloat16 for the 8 B shape), linked as the project's models/base.
    parameters = build_model(args.shape, Path(args.tokenizer), work / args.shape, args.seed)
    (project / "models").mkdir()
    (project / "models/base").symlink_to((work / args.shape).resolve())
    if not (work / "tokenized" / "train").exists():
        prepare_rows(Path(args.data), Path(args.tokenizer), work, args.seed)
    shutil.copytree(work / "tokenized", project / "data/tokenized")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = args.seed
    params["lora"].update(r=8, alpha=16, dropout=0.05, target_modules="auto")
    params["train"].update(max_steps=args.steps, batch_size=ROWS_PER_STEP, grad_accum=1, learning_rate=2e-4,
                           log_every_steps=1, checkpoint_every_steps=0, eval_every_steps=0, device="cuda")

    available = torch.cuda.device_count()
    gpu_counts = [n for n in args.gpus if n <= available]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "sharded_scaling-partial.jsonl"
    results = []
    for sharding, gpus, cap in runs(gpu_counts, args.memory_cap_gib, args.capped_only):
        result = train_once(project, params, sharding, gpus, cap, args.warmup, args.fused_layers)
        results.append(result)
        with partial.open("a") as fh:
            fh.write(json.dumps({"shape": args.shape, **result}) + "\n")
        print(f"{sharding:5} {gpus} GPU cap {cap or '-'}: {result['real_tokens_per_s']} tokens/s, peak "
              f"{result['peak_allocated_mb']} MiB, error {result['error']}", flush=True)

    reference = results[0]["real_tokens_per_s"] if results[0]["gpus"] == 1 else None
    for r in results:
        r["speedup_vs_1_gpu"] = round(r["real_tokens_per_s"] / reference, 3) if r["real_tokens_per_s"] and reference else None
    gpu = torch.cuda.get_device_name()
    print(f"\n{args.shape} ({parameters / 1e9:.2f} B parameters), {gpu}, {ROWS_PER_STEP} rows a step, "
          f"{args.steps} steps, tokens/s after step {args.warmup}")
    print(f"{'sharding':8} {'GPUs':>4} {'cap GiB':>7} {'tokens/s':>9} {'vs 1 GPU':>8} {'peak MiB':>9}  error")
    for r in results:
        print(f"{r['sharding']:8} {r['gpus']:>4} {r['memory_cap_gib'] or '-':>7} {r['real_tokens_per_s'] or 0:>9.0f} "
              f"{r['speedup_vs_1_gpu'] or 0:>7.2f}x {r['peak_allocated_mb'] or 0:>9.0f}  {r['error'] or ''}")
    record = {
        "benchmark": "sharded_scaling", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "model": {"shape": args.shape, "parameters": parameters}, "rows_per_step": ROWS_PER_STEP,
        "steps": args.steps, "warmup_steps": args.warmup, "versions": _versions(), "results": results,
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    path = out / f"sharded_scaling-{stamp}-{max(gpu_counts)}x{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Alpaca-format JSON file (the Alpaca sample)")
    parser.add_argument("--tokenizer", required=True, help="directory with the tokenizer (the embedded model's)")
    parser.add_argument("--shape", default="llama-3-8b", choices=["llama-3-8b", "llama-3.2-1b"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="GPU counts (those this machine has)")
    # The planner: the 8 B shape needs 7.8 GiB whole (DDP) and from 6.0 GiB sharded (every process loads the whole
    # 4-bit model, 4.9 GiB, before FSDP shards it): 7 GiB is between.
    parser.add_argument("--memory-cap-gib", type=float, default=7.0,
                        help="train.max_memory for the capped runs: under what one whole 4-bit copy needs to train")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--capped-only", action="store_true", help="only the capped runs (DDP refused, fsdp trains)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the tokens/s")
    parser.add_argument("--fused-layers", choices=["auto", "true", "false"], default="auto",
                        help="train.fused_layers for every run (auto leaves them off under fsdp; true asks for them)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="/tmp/qlora-sharded")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    main(parser.parse_args())
