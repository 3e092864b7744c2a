"""Training speed: the tutorial's training code vs. the pipeline's train stage, side by side on one GPU.

Both train the reference experiment on the same rows from the same random distilgpt2-shaped start
(same shapes and FLOPs as the real model): 4-bit NF4 + double quant, LoRA r=8 / alpha 16 / dropout
0.05 on c_attn, c_proj, c_fc, 10 rows an optimizer step, lr 2e-4, 3 epochs, weight decay 0.01, max
grad norm 0.3, warmup 3 %. Then both adapters are scored by the same code on the answer tokens of the
same 100 held-out rows.

    python bench/train_speed.py --data ../shared/data/alpaca_sample_1k.json --tokenizer models/base

Prints a table and writes bench/results/train_speed-<UTC time>-<gpu>.json (GPU, versions, date, every figure).
`--variants` picks pipeline execution variants by name (see VARIANTS); `--epochs` shortens a trial.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Execution variants of the pipeline's train stage (train.* params over the tutorial profile).
# None changes what is optimized: rows per step, hyperparameters and data order stay the same (the optimizer
# differs only in the precision of its state: fused AdamW keeps float32 moments, adamw_8bit 8-bit ones).
VARIANTS = {
    "pipeline-as-tutorial": {"micro_batch_size": 2, "gradient_checkpointing": True, "sdpa_cudnn": True,
                             "fused_activation": False, "dequantized_cache_mb": 0, "optim": "adamw_8bit",
                             "token_metrics": True, "cuda_graphs": False},
    "pipeline-default": {},
    "eager": {"cuda_graphs": False},
    "graphs-pad32": {"pad_to_multiple_of": 32},
    "8bit-adamw": {"optim": "adamw_8bit"},
    "token-metrics": {"token_metrics": True},
    "8bit-adamw-token-metrics": {"optim": "adamw_8bit", "token_metrics": True},
    "no-dequantized-cache": {"dequantized_cache_mb": 0},
    "unfused-gelu": {"fused_activation": False},
    "micro5": {"micro_batch_size": 5},
    "cudnn-pad64": {"sdpa_cudnn": True, "pad_to_multiple_of": 64},
    "pad64": {"pad_to_multiple_of": 64},
    "no-upcast": {"upcast_non_quantized": False},
}


def tutorial_tokenize(tokenizer, rows, max_length=1024):
    """The tutorial's preprocessing: prompt + answer, padded with EOS to 1,024 tokens, loss on every token."""
    texts = [row["prompt"] + row["completion"] for row in rows]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}


def train_reference(model_dir: Path, rows, adapter_dir: Path, params, seed: int, device: str) -> dict:
    """A faithful re-implementation of the tutorial's training code."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, default_data_collator, set_seed
    from trl import SFTConfig, SFTTrainer

    from qlora_pipeline.trainer import peak_memory_mb, peak_reserved_mb

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    train_set = datasets.Dataset.from_dict(tutorial_tokenize(tokenizer, rows))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map={"": device})
    model = prepare_model_for_kbit_training(model)  # gradient checkpointing on, as in the tutorial
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["c_attn", "c_proj", "c_fc"]))
    config = SFTConfig(
        output_dir=str(adapter_dir.parent / "reference-trainer"), per_device_train_batch_size=2, gradient_accumulation_steps=5,
        num_train_epochs=params.train.epochs, learning_rate=2e-4, optim="adamw_8bit", weight_decay=0.01, max_grad_norm=0.3,
        warmup_steps=0.03, bf16=device == "cuda", use_cpu=device == "cpu", gradient_checkpointing=True, logging_steps=10, save_strategy="no", report_to="none",
        seed=seed, data_seed=seed, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set, data_collator=default_data_collator,
                         processing_class=tokenizer)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.save_pretrained(adapter_dir)
    real_tokens = sum(sum(mask) for mask in train_set["attention_mask"]) * params.train.epochs
    return {
        "train_loss": round(result.training_loss, 4), "steps": trainer.state.global_step, "runtime_s": round(seconds, 2),
        "real_tokens_per_s": round(real_tokens / seconds, 1), "padded_tokens_per_step": 10 * 1024,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_reserved_mb": peak_reserved_mb(device),
    }


def score(model_dir: Path, adapter_dir: Path, tokenized_eval, quantize, device: str) -> dict:
    """Answer loss of base (4-bit) + adapter on the held-out rows, with and without the final EOS."""
    import torch
    from peft import PeftModel

    from qlora_pipeline.evaluation import answer_loss
    from qlora_pipeline.quantization import load_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = PeftModel.from_pretrained(load_model(model_dir, quantize, device, dtype), adapter_dir).eval()
    with_eos = answer_loss(model, tokenized_eval, tokenizer.pad_token_id, 16, device)
    no_eos = [{**row, "labels": row["labels"][:-1] + [-100]} for row in tokenized_eval]
    without_eos = answer_loss(model, no_eos, tokenizer.pad_token_id, 16, device)
    return {"eval_answer_loss": with_eos["loss"], "eval_answer_loss_no_eos": without_eos["loss"]}


def main(args: argparse.Namespace) -> None:
    # The allocator setting the train stage uses in one process (stages/train.py); before CUDA starts.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import datasets
    import torch
    import transformers
    from transformers import AutoTokenizer

    from qlora_pipeline.config import deep_update, parse_params
    from qlora_pipeline.prompts import format_rows
    from qlora_pipeline.sources import normalize_rows, random_model
    from qlora_pipeline.splits import make_subset
    from qlora_pipeline.tokenization import Encoder, read_split, tokenize_split
    from qlora_pipeline.training import train

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a smoke run (--rows, --epochs)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_params = yaml.safe_load((ROOT / "profiles" / "tutorial.yaml").read_text())
    base_params = deep_update(base_params, {"model": {"source": "random", "name": "distilgpt2"},
                                            "train": {"epochs": args.epochs, "device": device,
                                                      # the reference neither evaluates nor saves while training
                                                      "eval_every_steps": 0, "checkpoint_every_steps": 0}})
    params = parse_params(base_params)

    # The same random start for every run: distilgpt2's exact config, seed 42, saved once.
    model_dir = work / "distilgpt2-random"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    random_model("distilgpt2", params.seed, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rows = normalize_rows(json.loads(Path(args.data).read_text()), params.data.columns, args.data)[: args.rows]
    eval_size = min(100, len(rows) // 5)
    train_rows, eval_rows = make_subset(rows, len(rows) - eval_size, eval_size, params.seed)
    train_fmt, eval_fmt = format_rows(train_rows, params.format.template), format_rows(eval_rows, params.format.template)
    tokenized = work / "tokenized"
    stats = {}
    for split, split_rows in (("train", train_fmt), ("eval", eval_fmt)):
        items, stats[split] = tokenize_split(Encoder.of(tokenizer), split_rows, params.tokenize.max_length,
                                             params.tokenize.train_on)
        datasets.Dataset.from_dict({k: [i[k] for i in items] for k in ("input_ids", "labels")}).save_to_disk(str(tokenized / split))
    tokenized_eval = read_split(tokenized / "eval")

    results = []
    if "reference" in args.variants:
        figures = train_reference(model_dir, train_fmt, work / "adapter-reference", params, params.seed, device)
        results.append({"variant": "reference (tutorial code)", **figures,
                        **score(model_dir, work / "adapter-reference", tokenized_eval, params.quantize, device)})
        print(results[-1], flush=True)
    for name in [v for v in args.variants if v != "reference"]:
        for seed in args.seeds:
            variant_params = parse_params(deep_update(base_params, {"seed": seed, "train": VARIANTS[name]}))
            adapter = work / f"adapter-{name}-{seed}"
            metrics, *_ = train(model_dir, tokenized, adapter, variant_params.quantize, variant_params.lora,
                               variant_params.train, seed)
            results.append({
                "variant": name if len(args.seeds) == 1 else f"{name} (seed {seed})",
                **{k: metrics[k] for k in ("train_loss", "steps", "runtime_s", "real_tokens_per_s", "peak_memory_mb",
                                           "peak_reserved_mb", "cuda_graph_shapes", "cuda_graph_capture_s")},
                "padded_tokens_per_step": round(metrics["padded_tokens"] / max(metrics["steps"], 1), 1),
                **score(model_dir, adapter, tokenized_eval, params.quantize, device),
            })
            print(results[-1], flush=True)

    if args.profile:
        profile_variant(args.profile, base_params, model_dir, tokenized, work, Path(args.out))

    reference = next((r for r in results if r["variant"].startswith("reference")), None)
    header = f"{'variant':34} {'steps':>5} {'train s':>8} {'speed-up':>8} {'tokens/s':>9} {'peak MiB':>9} {'reserved':>9} {'eval loss':>9} {'w/o EOS':>8}"
    print(header)
    for r in results:
        speedup = f"{reference['runtime_s'] / r['runtime_s']:.1f}x" if reference else "-"
        print(f"{r['variant']:34} {r['steps']:>5} {r['runtime_s']:>8.2f} {speedup:>8} {r['real_tokens_per_s']:>9.0f} "
              f"{r['peak_memory_mb']:>9.0f} {r['peak_reserved_mb'] or 0:>9.0f} {r['eval_answer_loss']:>9.4f} {r['eval_answer_loss_no_eos']:>8.4f}")
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{platform.processor() or platform.machine()}"
    record = {
        "benchmark": "train_speed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "host": platform.node(), "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, datasets)} | _other_versions(),
        "data": {"file": Path(args.data).name, "train_rows": len(train_rows), "eval_rows": len(eval_rows), "tokens": stats},
        "epochs": args.epochs, "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    name = f"train_speed-{stamp}-{gpu.replace(' ', '_')}.json"
    (out / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / name}")


def profile_variant(name: str, base_params: dict, model_dir: Path, tokenized: Path, work: Path, out: Path) -> None:
    """30 optimizer steps of one variant under the PyTorch profiler: where does a step's time go?"""
    from torch.profiler import ProfilerActivity, profile

    from qlora_pipeline.config import deep_update, parse_params
    from qlora_pipeline.training import train

    variant = parse_params(deep_update(base_params, {"train": {**VARIANTS[name], "max_steps": 30}}))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        metrics, *_ = train(model_dir, tokenized, work / "adapter-profile", variant.quantize, variant.lora, variant.train,
                           variant.seed)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    table = events.table(sort_by="self_cpu_time_total", row_limit=30)
    table_gpu = events.table(sort_by="self_device_time_total", row_limit=20)
    text = (f"variant {name}: 30 steps in {metrics['runtime_s']} s; GPU kernel time {device_us / 1e6:.2f} s\n\n"
            f"by CPU time:\n{table}\n\nby GPU time:\n{table_gpu}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{name}.txt").write_text(text)
    print(text[:6000])


def _other_versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("bitsandbytes", "peft", "trl", "accelerate")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Alpaca-format JSON file (e.g. ../shared/data/alpaca_sample_1k.json)")
    parser.add_argument("--tokenizer", required=True, help="directory with the tokenizer to use (e.g. models/base)")
    parser.add_argument("--variants", nargs="+", default=["reference", *VARIANTS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--rows", type=int, default=None, help="use only the first N rows (smoke runs)")
    parser.add_argument("--profile", choices=list(VARIANTS), help="also profile 30 steps of this variant")
    parser.add_argument("--work", default="/tmp/qlora-bench")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    main(parser.parse_args())
