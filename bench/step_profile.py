"""Where one training pass of a large model spends its time and memory: peft's LoRA modules against the fused
layers (train.fused_layers), eager, on one GPU (the graphed speed of the whole train stage is scale_speed.py's).

    python bench/step_profile.py --data .bench-assets/alpaca_sample_1k.json --tokenizer .bench-assets/tokenizer \
        --shape llama-3-8b [--rows 10] [--out DIR]

The model and rows are scale_speed.py's (random weights of the shape, the Alpaca sample, max_length 1,024); one
pass packs the first --rows rows of the train split, as the train stage packs a step, and runs the train stage's
pass (cuda_graphs.GraphedTrainingPass.loss: forward, trl's chunked loss head, backward) on the model the train
stage prepares, with nothing checkpointed and no dequantized-weight cache. Each variant runs in a process of its
own. Reported per variant: activation memory a token a layer (peak during the pass minus what was allocated
before it, over tokens and layers), eager milliseconds a pass (median of 5), the kernels a pass launches and
the GPU's busy time in them (torch.profiler), and the 12 kernels that take the most time.
Writes <out>/step_profile-<UTC time>-<gpu>-<shape>.json.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {"peft-modules": {"fused_layers": False}, "fused-layers": {"fused_layers": True}}


def one_variant(args) -> dict:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import datasets
    import torch
    import yaml
    from transformers import AutoTokenizer

    from qlora_pipeline import execution
    from qlora_pipeline.config import deep_update, parse_params
    from qlora_pipeline.cuda_graphs import GraphedTrainingPass
    from qlora_pipeline.packing import pack, use_packed_attention  # noqa: F401  (prepare_model uses it)
    from qlora_pipeline.training import prepare_model

    work = Path(args.work)
    model_dir = work / args.shape
    raw = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "auto"}, "train": VARIANTS[args.one]})
    params = parse_params(raw)
    run = execution.Execution(args.rows, args.rows, float("inf"), True, False, 0, 0.0, 64, "step profile",
                              fused_layers=VARIANTS[args.one]["fused_layers"])
    model, _, _ = prepare_model(model_dir, params.quantize, params.lora, params.train, run, "cuda", 0, torch.bfloat16)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.train()
    rows = datasets.load_from_disk(str(work / "tokenized" / "train")).select(range(args.rows))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = pack([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], tokenizer.pad_token_id or 0, 64)
    tokens = batch["input_ids"].shape[1]
    real = sum(len(r["input_ids"]) for r in rows)
    input_ids, labels = batch["input_ids"].cuda(), batch["labels"].cuda()
    boundaries = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in batch.items() if k not in ("input_ids", "labels")}
    num_items = int((labels[:, 1:] != -100).sum())
    graphed = GraphedTrainingPass(model, torch.bfloat16)
    params_list = [p for p in model.parameters() if p.requires_grad]

    def eager_pass():
        loss = graphed.loss(input_ids, labels, torch.as_tensor(num_items, device="cuda"), boundaries)
        torch.autograd.grad(loss, params_list)
        return loss

    eager_pass()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = eager_pass()
    torch.cuda.synchronize()
    activation = torch.cuda.max_memory_allocated() - before
    layers = model.config.get_text_config().num_hidden_layers
    eager_ms = []
    for _ in range(5):
        start = time.perf_counter()
        eager_pass()
        torch.cuda.synchronize()
        eager_ms.append((time.perf_counter() - start) * 1e3)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eager_pass()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]

    return {
        "variant": args.one, "tokens": tokens, "real_tokens": real, "loss": round(loss.item(), 4),
        "activation_bytes_per_token_layer": round(activation / tokens / layers),
        "activation_mb": round(activation / 2**20), "eager_ms": round(statistics.median(eager_ms), 1),
        "kernels": len(kernels), "gpu_busy_ms": round(busy_ms, 1),
        "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20),
        "top_kernels": [{"name": n, "count": c, "ms": round(ms, 2)} for n, (c, ms) in top],
    }


def main(args) -> None:
    import torch

    from scale_speed import model_and_rows

    work = Path(args.work)
    parameters = model_and_rows(args.shape, Path(args.data), Path(args.tokenizer), work, args.seed)
    results = []
    for name in args.variants:
        child = subprocess.run([sys.executable, __file__, "--one", name, "--shape", args.shape, "--work", str(work),
                                "--rows", str(args.rows)], capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"variant": name, "error": (child.stderr.strip().splitlines()
                                                                                  or ["no output"])[-1][:300]}
        if not lines:
            print(child.stderr[-3000:], file=sys.stderr)
        results.append(result)
    gpu = torch.cuda.get_device_name()
    print(f"\n{args.shape} ({parameters / 1e9:.2f} B), {gpu}, one packed pass of {args.rows} rows")
    print(f"{'variant':14} {'tokens':>6} {'act B/tok/layer':>15} {'eager ms':>8} {'kernels':>7} {'GPU busy ms':>11} "
          f"{'tokens/s eager':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:14} error: {r['error']}")
            continue
        print(f"{r['variant']:14} {r['tokens']:>6} {r['activation_bytes_per_token_layer']:>15,} {r['eager_ms']:>8} "
              f"{r['kernels']:>7} {r['gpu_busy_ms']:>11} {r['real_tokens'] / r['eager_ms'] * 1e3:>14,.0f}  loss {r['loss']}")
        for k in r["top_kernels"]:
            print(f"    {k['ms']:>8.2f} ms {k['count']:>5}x  {k['name']}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_profile-{stamp}-{gpu.replace(' ', '_')}-{args.shape}.json"
    path.write_text(json.dumps({"benchmark": "step_profile", "gpu": gpu, "model": {"shape": args.shape,
                                "parameters": parameters}, "rows": args.rows, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    from scale_speed import model_arguments

    parser = model_arguments(__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rows", type=int, default=10)
    parsed = parser.parse_args()
    print(json.dumps(one_variant(parsed))) if parsed.one else main(parsed)
