"""Training speed at the sizes QLoRA is for: plain trl + peft + bitsandbytes vs. the pipeline's train stage, side
by side on one GPU, on a Llama-3-8B- or Llama-3.2-1B-shaped model with random weights.

    python bench/scale_speed.py --data .bench-assets/alpaca_sample_1k.json --tokenizer .bench-assets/tokenizer \
        --shape llama-3-8b [--variants ...] [--steps 8]

Both sides train the same rows (the Alpaca sample, alpaca template, answers only, max_length 1,024) in the same
order from the same start: 4-bit NF4 + double quantization, bfloat16 compute, LoRA r 8 / alpha 16 / dropout 0.05
on every linear layer, 10 rows an optimizer step, lr 2e-4. trl runs as a user would write it (SFTTrainer on
prompt/completion rows, adamw_8bit, gradient checkpointing) in three configurations; the pipeline runs its
train() with default execution, with no cap and under per-process memory caps
(torch.cuda.set_per_process_memory_fraction, which stands for a smaller card; trl gets the same caps).

Each variant runs in a process of its own (a cap, and the allocator, start fresh). Reported: real (non-padding)
tokens per second over the steady steps (after --warmup steps), peak allocated and reserved GPU memory, the first
steps' losses. Writes bench/results/scale_speed-<UTC time>-<gpu>.json (keys gpu, model {shape, parameters},
results: [{variant, memory_cap_gib, real_tokens_per_s, peak_allocated_mb, peak_reserved_mb, error, ...}]) and,
as each variant finishes, a line to <out>/scale_speed-partial.jsonl, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (side, memory cap in GiB or None, settings)
VARIANTS = {
    "trl-2x5-checkpointing": ("trl", 24, {"batch": 2, "accum": 5, "packing": False}),
    "trl-10-checkpointing": ("trl", 24, {"batch": 10, "accum": 1, "packing": False}),
    "trl-10-checkpointing-packing": ("trl", 24, {"batch": 10, "accum": 1, "packing": True}),
    "pipeline-default": ("pipeline", None, {}),
    "pipeline-peft-modules-24gib": ("pipeline", 24, {"fused_layers": False}),
    "pipeline-default-24gib": ("pipeline", 24, {}),
    "pipeline-default-16gib": ("pipeline", 16, {}),
}
ROWS_PER_STEP = 10


def build_model(shape: str, tokenizer_dir: Path, out: Path, seed: int) -> int:
    """A random model of `shape` (qlora_pipeline.sources.RANDOM_CONFIGS), built on the GPU in bfloat16 and saved
    with the tokenizer; returns its parameter count. Reused when already there."""
    import torch
    from transformers import AutoTokenizer

    from qlora_pipeline.sources import random_model

    if (out / "config.json").exists():
        return json.loads((out / "parameters.json").read_text())["parameters"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = random_model(shape, seed, tokenizer, device="cuda", dtype="bfloat16")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    parameters = model.num_parameters()
    (out / "parameters.json").write_text(json.dumps({"parameters": parameters}))
    del model
    torch.cuda.empty_cache()
    return parameters


def prepare_rows(data: Path, tokenizer_dir: Path, work: Path, seed: int) -> None:
    """The same rows for both sides: prompt/completion pairs (trl) and the pipeline's tokenized splits."""
    import datasets
    from transformers import AutoTokenizer

    from qlora_pipeline.config import parse_params
    from qlora_pipeline.prompts import format_rows
    from qlora_pipeline.sources import normalize_rows
    from qlora_pipeline.splits import make_subset
    from qlora_pipeline.tokenization import Encoder, tokenize_split
    import yaml

    params = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    rows = normalize_rows(json.loads(data.read_text()), params.data.columns, str(data))
    train_rows, eval_rows = make_subset(rows, len(rows) - 99, 99, seed)
    encoder = Encoder.of(AutoTokenizer.from_pretrained(tokenizer_dir))
    for split, split_rows in (("train", train_rows), ("eval", eval_rows)):
        formatted = format_rows(split_rows, "alpaca")
        (work / f"{split}.json").write_text(json.dumps([{"prompt": r["prompt"], "completion": r["completion"]}
                                                        for r in formatted]))
        items, _ = tokenize_split(encoder, formatted, 1024, "completion")
        datasets.Dataset.from_dict({k: [i[k] for i in items] for k in ("input_ids", "labels")}).save_to_disk(
            str(work / "tokenized" / split))


def model_and_rows(shape: str, data: Path, tokenizer_dir: Path, work: Path, seed: int) -> int:
    """The model of `shape` in work/<shape> and the rows in work/tokenized (built once, reused); returns the
    model's parameter count."""
    (work / "tokenized").mkdir(parents=True, exist_ok=True)
    parameters = build_model(shape, tokenizer_dir, work / shape, seed)
    if not (work / "tokenized" / "train").exists():
        prepare_rows(data, tokenizer_dir, work, seed)
    return parameters


def cap_memory(cap_gib: float | None) -> None:
    import torch

    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)


def run_trl(model_dir: Path, work: Path, settings: dict, steps: int, seed: int) -> dict:
    """Plain trl + peft + bitsandbytes, as a user would write it."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = datasets.Dataset.from_list(json.loads((work / "train.json").read_text()))
    config = SFTConfig(output_dir=str(work / "trl-out"), per_device_train_batch_size=settings["batch"],
                       gradient_accumulation_steps=settings["accum"], gradient_checkpointing=True, optim="adamw_8bit",
                       bf16=True, max_length=1024, packing=settings["packing"], max_steps=steps, learning_rate=2e-4,
                       warmup_steps=0.03, weight_decay=0.01, max_grad_norm=0.3, logging_steps=1, save_strategy="no",
                       report_to="none", seed=seed, data_seed=seed, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, peft_config=lora, processing_class=tokenizer)
    inner = trainer.data_collator
    counted = []

    def counting(examples):
        batch = inner(examples)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        counted.append(int(real))
        return batch

    trainer.data_collator = counting
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            marks.append((time.perf_counter(), sum(counted)))

    trainer.add_callback(Clock())
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    return {"marks": marks, "losses": losses}


def run_pipeline(model_dir: Path, work: Path, steps: int, seed: int, variant: str, settings: dict) -> dict:
    """The pipeline's train stage as `dvc repro` runs it (library call): default execution, or with the train
    keys of `settings` changed."""
    import yaml

    from qlora_pipeline.config import deep_update, parse_params
    from qlora_pipeline.training import train

    raw = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "seed": seed, "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "auto"},
        "train": {"max_steps": steps, "batch_size": 2, "grad_accum": 5, "learning_rate": 2e-4, "log_every_steps": 1,
                  "checkpoint_every_steps": 0, "eval_every_steps": 0, **settings},
    })
    params = parse_params(raw)
    metrics, step_rows, _ = train(model_dir, work / "tokenized", work / f"adapter-{variant}", params.quantize,
                                  params.lora, params.train, seed)
    marks = [(row["seconds"], row["tokens"]) for row in step_rows]
    keep = ("execution", "micro_batch_size", "passes_per_step", "checkpointed_layers", "cuda_graphs", "packing",
            "dequantized_cache_mb", "estimated_peak_mb", "optimizer", "cuda_graph_shapes", "cuda_graph_capture_s",
            "fused_layers", "real_tokens_per_s")
    return {"marks": marks, "losses": [round(r["loss"], 4) for r in step_rows], **{k: metrics[k] for k in keep}}


def one_variant(args) -> None:
    """Child process: run one variant, print its result as JSON on the last line."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    side, cap, settings = VARIANTS[args.one]
    cap_memory(cap)
    work, model_dir = Path(args.work), Path(args.work) / args.shape
    result = {"variant": args.one, "memory_cap_gib": cap, "error": None}
    try:
        figures = (run_trl(model_dir, work, settings, args.steps, args.seed) if side == "trl"
                   else run_pipeline(model_dir, work, args.steps, args.seed, args.one, settings))
        marks = figures.pop("marks")
        (t0, n0), (t1, n1) = marks[args.warmup - 1], marks[-1]
        # The pipeline's own real_tokens_per_s covers every step (CUDA graph captures included): kept beside.
        all_steps = figures.pop("real_tokens_per_s", None)
        result.update(real_tokens_per_s=round((n1 - n0) / (t1 - t0), 1), steady_steps=len(marks) - args.warmup,
                      real_tokens_per_s_all_steps=all_steps, **figures)
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
    except Exception as exc:  # the one line it stopped with, as a user would see it
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    result.update(peak_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                  peak_reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20, 1))
    print(json.dumps(result))


def main(args) -> None:
    import torch

    work = Path(args.work)
    parameters = model_and_rows(args.shape, Path(args.data), Path(args.tokenizer), work, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "scale_speed-partial.jsonl"
    results = []
    for name in args.variants:
        command = [sys.executable, __file__, "--one", name, "--shape", args.shape, "--work", str(work),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
        started = time.perf_counter()
        child = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in child.stdout.splitlines() if l.startswith("{")]
        result = json.loads(lines[-1]) if lines else {
            "variant": name, "memory_cap_gib": VARIANTS[name][1], "real_tokens_per_s": None, "peak_allocated_mb": None,
            "peak_reserved_mb": None, "error": (child.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        result["wall_s"] = round(time.perf_counter() - started, 1)
        results.append(result)
        with partial.open("a") as fh:
            fh.write(json.dumps({"shape": args.shape, **result}) + "\n")
        print(f"{name}: {result.get('real_tokens_per_s')} tokens/s, peak {result.get('peak_allocated_mb')} MiB, "
              f"error {result['error']}", flush=True)
        if child.returncode and not lines:
            print(child.stderr[-3000:], file=sys.stderr)

    gpu = torch.cuda.get_device_name()
    print(f"\n{args.shape} ({parameters / 1e9:.2f} B parameters), {gpu}, {args.steps} steps of {ROWS_PER_STEP} rows, "
          f"tokens/s over steps {args.warmup + 1}-{args.steps}")
    print(f"{'variant':32} {'cap GiB':>7} {'tokens/s':>9} {'alloc MiB':>10} {'reserved':>9}  first losses / error")
    for r in results:
        tail = r["error"] or " ".join(str(x) for x in r.get("losses", [])[:4])
        print(f"{r['variant']:32} {r['memory_cap_gib'] or '-':>7} {r.get('real_tokens_per_s') or 0:>9.0f} "
              f"{r.get('peak_allocated_mb') or 0:>10.0f} {r.get('peak_reserved_mb') or 0:>9.0f}  {tail}")
    record = {
        "benchmark": "scale_speed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "model": {"shape": args.shape, "parameters": parameters}, "steps": args.steps,
        "warmup_steps": args.warmup, "rows_per_step": ROWS_PER_STEP, "versions": _versions(), "results": results,
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    path = out / f"scale_speed-{stamp}-{gpu.replace(' ', '_')}-{args.shape}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def model_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments scale_speed.py and step_profile.py share: the inputs, the shape, seed and folders."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", help="Alpaca-format JSON file (the Alpaca sample)")
    parser.add_argument("--tokenizer", help="directory with the tokenizer (the embedded model's)")
    parser.add_argument("--shape", default="llama-3-8b", choices=["llama-3-8b", "llama-3.2-1b"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="/tmp/qlora-scale")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    return parser


def _versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "bitsandbytes", "peft", "trl", "accelerate")}


if __name__ == "__main__":
    parser = model_arguments(__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the tokens/s (CUDA graph captures)")
    parsed = parser.parse_args()
    one_variant(parsed) if parsed.one else main(parsed)
