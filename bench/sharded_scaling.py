"""Sharded QLoRA (train.sharding: fsdp) against data-parallel (none) on 1, 2 and 4 GPUs: the Llama-3-8B shape
with random weights under a per-process memory budget that one whole copy of the model does not fit in.

    python bench/scale_speed.py ...   # not needed first: this script builds the model and rows the same way
    python bench/sharded_scaling.py --data .bench-assets/alpaca_sample_1k.json --tokenizer .bench-assets/tokenizer \
        [--gpus 1 2 4] [--memory-cap-gib 7] [--steps 8]

The model and the rows are scale_speed.py's (build_model, prepare_rows: the Alpaca sample, alpaca template,
answers only, max_length 1,024), saved as models/base and data/tokenized of a throw-away project; the train
stage then runs there as `dvc repro` runs it (`python stages/train.py`, which relaunches itself through torchrun
on several GPUs), --rows-per-step rows an optimizer step (16) whatever the GPUs. The cap is train.max_memory,
the budget the memory plan executes a step within: under it DDP (sharding none) stops with the planner's one
line naming train.max_memory, fsdp trains; its peak allocated memory (first process, loading and sharding
included) must stay under the cap. Per GPU count:

    1 GPU:   none, no cap                      (the reference)
    N GPUs:  none under the cap, fsdp under the cap, none and fsdp with no cap

Throughput: real (non-padding) tokens per second over the steps after --warmup, from metrics/train_log.csv.
Writes bench/results/sharded_scaling-<UTC time>-<gpus>.json with keys gpu, model {shape, parameters}, results:
[{sharding, gpus, memory_cap_gib, real_tokens_per_s, peak_allocated_mb, error, ...}], and each run's line to
<out>/sharded_scaling-partial.jsonl as it finishes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from ddp_scaling import steady_tokens_per_s, write_params  # noqa: E402
from scale_speed import _versions, build_model, prepare_rows  # noqa: E402



def runs(gpu_counts: list[int], cap: float, which: str = "all",
         fused_layers: tuple[str, ...] = ("auto",)) -> list[tuple[str, int, float | None, str]]:
    """(sharding, GPUs, cap in GiB or None, train.fused_layers) in the order they run. which: all, capped (DDP
    refused, fsdp trains), uncapped (one GPU and the runs without a cap) or fsdp (the uncapped fsdp runs alone).
    Every fsdp run once for each of `fused_layers`; the others with auto (fused on one GPU)."""
    planned = [("none", 1, None, "auto")] if which in ("all", "uncapped") else []
    for gpus in (n for n in gpu_counts if n > 1):
        for capped in {"all": (cap, None), "capped": (cap,), "uncapped": (None,), "fsdp": (None,)}[which]:
            planned += [] if which == "fsdp" else [("none", gpus, capped, "auto")]
            planned += [("fsdp", gpus, capped, fused) for fused in fused_layers]
    return planned


def train_params(params: dict, sharding: str, gpus: int, cap: float | None, fused_layers: str, **train) -> dict:
    from qlora_pipeline.config import deep_update

    fused = {"auto": "auto", "true": True, "false": False}[fused_layers]
    return deep_update(params, {"train": {
        "num_processes": gpus, "sharding": sharding, "max_memory": cap or "auto", "fused_layers": fused, **train}})


def failure(stderr: str) -> str:
    lines = stderr.strip().splitlines() or ["no output"]
    # A failed worker's exception is above the launcher's last line: keep it beside that line.
    raised = [line for line in lines if re.match(r"(\[rank\d+\]: )?\w+(Error|Exception): ", line)]
    return (lines[-1] + (f" ({raised[-1]})" if raised and raised[-1] != lines[-1] else ""))[:600]


def uninterrupted(project: Path, sharding: str, gpus: int, cap: float | None, fused_layers: str) -> Path:
    """Where train_once keeps a finished run's adapter and step log, for the resume check."""
    return project.parent / f"uninterrupted-{sharding}-{gpus}-{cap or 'nocap'}-{fused_layers}"


def train_once(project: Path, params: dict, sharding: str, gpus: int, cap: float | None, warmup: int,
               fused_layers: str = "auto") -> dict:
    write_params(project, train_params(params, sharding, gpus, cap, fused_layers))
    for stale in ("metrics/train.json", "metrics/train_log.csv"):
        (project / stale).unlink(missing_ok=True)
    child = subprocess.run([sys.executable, "stages/train.py"], cwd=project, capture_output=True, text=True)
    result = {"sharding": sharding, "gpus": gpus, "memory_cap_gib": cap, "real_tokens_per_s": None,
              "peak_allocated_mb": None, "error": None}
    if child.returncode:
        result["error"] = failure(child.stderr)
        return result
    # Kept for the resume check: what the same run gives uninterrupted.
    kept = uninterrupted(project, sharding, gpus, cap, fused_layers)
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(project / "models/adapter", kept / "adapter")
    shutil.copy(project / "metrics/train_log.csv", kept)
    metrics = json.loads((project / "metrics/train.json").read_text())
    result.update(
        real_tokens_per_s=round(steady_tokens_per_s(project, warmup), 1),
        peak_allocated_mb=metrics["peak_memory_mb"], peak_reserved_mb=metrics["peak_reserved_mb"],
        peak_memory_kind=metrics["peak_memory_kind"], under_cap=(metrics["peak_memory_mb"] < cap * 1024) if cap else None,
        resolved_sharding=metrics["sharding"], execution=metrics["execution"], train_loss=metrics["train_loss"],
        estimated_peak_mb=metrics["estimated_peak_mb"], steps=metrics["steps"], fused_layers=metrics["fused_layers"],
    )
    return result


def losses(train_log: Path) -> dict[int, float]:
    with open(train_log) as fh:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(fh) if row.get("loss")}


def resume_check(project: Path, params: dict, gpus: int, fused_layers: str, kill_after: int,
                 sharding: str = "fsdp") -> dict:
    """The `sharding` run with no cap, killed (SIGKILL to every process, as a machine that goes down) once checkpoint
    `kill_after` is complete, then run again: it must resume from that checkpoint and end with the losses and
    adapter of the same run uninterrupted (kept by train_once)."""
    from ddp_scaling import adapter_difference

    from qlora_pipeline import checkpoints

    write_params(project, train_params(params, sharding, gpus, None, fused_layers, checkpoint_every_steps=kill_after))
    for stale in ("checkpoints/train", "models/adapter"):
        shutil.rmtree(project / stale, ignore_errors=True)
    for stale in ("metrics/train.json", "metrics/train_log.csv"):
        (project / stale).unlink(missing_ok=True)
    target = project / "checkpoints/train" / f"{checkpoints.PREFIX}{kill_after}"
    child = subprocess.Popen([sys.executable, "stages/train.py"], cwd=project, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while child.poll() is None and not checkpoints.is_complete(target):
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    result = {"sharding": sharding, "gpus": gpus, "fused_layers": fused_layers, "killed_after_checkpoint": kill_after,
              "killed_before_the_end": checkpoints.is_complete(target) and not (project / "models/adapter").exists()}
    rerun = subprocess.run([sys.executable, "stages/train.py"], cwd=project, capture_output=True, text=True)
    if rerun.returncode:
        return {**result, "error": failure(rerun.stderr)}
    kept = uninterrupted(project, sharding, gpus, None, fused_layers)
    expected, resumed = losses(kept / "train_log.csv"), losses(project / "metrics/train_log.csv")
    return {**result, "error": None,
            "resumed_from_step": json.loads((project / "metrics/train.json").read_text())["resumed_from_step"],
            # Steps up to the kill come from the killed run's log: their differences are the GPUs' run-to-run ones.
            "loss_difference_by_step": {s: round(resumed[s] - expected[s], 6) for s in sorted(resumed)},
            "max_loss_difference": max(abs(expected[s] - resumed[s]) for s in resumed),
            "max_adapter_difference": adapter_difference(kept / "adapter", project / "models/adapter")}


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
    params["train"].update(max_steps=args.steps, batch_size=args.rows_per_step, grad_accum=1, learning_rate=2e-4,
                           log_every_steps=1, checkpoint_every_steps=0, eval_every_steps=0, device="cuda")

    available = torch.cuda.device_count()
    gpu_counts = [n for n in args.gpus if n <= available]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "sharded_scaling-partial.jsonl"
    results = []
    for sharding, gpus, cap, fused in runs(gpu_counts, args.memory_cap_gib, args.runs, args.fused_layers):
        result = train_once(project, params, sharding, gpus, cap, args.warmup, fused)
        results.append(result)
        with partial.open("a") as fh:
            fh.write(json.dumps({"shape": args.shape, **result}) + "\n")
        print(f"{sharding:5} {gpus} GPU cap {cap or '-'} fused {fused}: {result['real_tokens_per_s']} tokens/s, peak "
              f"{result['peak_allocated_mb']} MiB, error {result['error']}", flush=True)

    reference = results[0]["real_tokens_per_s"] if results and results[0]["gpus"] == 1 else None
    for r in results:
        r["speedup_vs_1_gpu"] = round(r["real_tokens_per_s"] / reference, 3) if r["real_tokens_per_s"] and reference else None
    resume = None
    if args.resume_check and max(gpu_counts) > 1:
        resume = resume_check(project, params, max(gpu_counts), args.fused_layers[-1], args.steps // 2)
        print(f"resume check: {resume}", flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"\n{args.shape} ({parameters / 1e9:.2f} B parameters), {gpu}, {args.rows_per_step} rows a step, "
          f"{args.steps} steps, tokens/s after step {args.warmup}")
    print(f"{'sharding':8} {'GPUs':>4} {'cap GiB':>7} {'fused':>5} {'tokens/s':>9} {'vs 1 GPU':>8} {'peak MiB':>9}  error")
    for r in results:
        print(f"{r['sharding']:8} {r['gpus']:>4} {r['memory_cap_gib'] or '-':>7} {str(r.get('fused_layers', '-')):>5} "
              f"{r['real_tokens_per_s'] or 0:>9.0f} "
              f"{r['speedup_vs_1_gpu'] or 0:>7.2f}x {r['peak_allocated_mb'] or 0:>9.0f}  {r['error'] or ''}")
    record = {
        "benchmark": "sharded_scaling", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "model": {"shape": args.shape, "parameters": parameters}, "rows_per_step": args.rows_per_step,
        "steps": args.steps, "warmup_steps": args.warmup, "versions": _versions(), "results": results,
        "resume_check": resume,
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
    # The planner (16 rows a step): the 8 B shape needs 7.3 GiB whole (DDP), and sharded from 5.7 GiB over 2
    # processes, 4.8 GiB over 4; under 6.0 GiB the whole 4-bit model (4.9 GiB) no longer fits beside the margins
    # and each process loads it on the CPU. 7 GiB: DDP refused, fsdp loading on the GPU; 5 GiB over 4: on the CPU.
    parser.add_argument("--memory-cap-gib", type=float, default=7.0,
                        help="train.max_memory for the capped runs: under what one whole 4-bit copy needs to train")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", choices=["all", "capped", "uncapped", "fsdp"], default="all",
                        help="all; capped: the capped runs alone (DDP refused, fsdp trains); uncapped: one GPU and the "
                             "runs without a cap; fsdp: the uncapped fsdp runs")
    parser.add_argument("--rows-per-step", type=int, default=16,
                        help="rows an optimizer step, whatever the GPUs (a multiple of 4 divides over 1, 2 and 4)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the tokens/s")
    parser.add_argument("--fused-layers", choices=["auto", "true", "false"], nargs="+", default=["auto"],
                        help="train.fused_layers for the fsdp runs, each in turn (auto leaves them off under fsdp)")
    parser.add_argument("--resume-check", action="store_true",
                        help="then kill the fsdp run (the last --fused-layers, no cap) half way and run it again")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="/tmp/qlora-sharded")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    main(parser.parse_args())
