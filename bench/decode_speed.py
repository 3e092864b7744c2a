"""Greedy generation speed on one GPU: transformers' generate against the evaluate stage's decoding (static cache,
each token replayed from a CUDA graph: qlora_pipeline.decoding), side by side on the same model and prompts.

    python bench/decode_speed.py --data .bench-assets/alpaca_sample_1k.json --tokenizer .bench-assets/tokenizer \
        [--shape distilgpt2 | llama-3-8b] [--rows 16] [--new-tokens 64] [--dtype bfloat16 | float32]

The model has random weights (qlora_pipeline.sources.RANDOM_CONFIGS), in the two forms evaluate generates with:
`plain`, the model in bfloat16 (evaluate's base and merged models), and `4-bit + LoRA`, the base loaded as the
train stage loads it (merging.load_base_as_trained: NF4, double quantization, bfloat16 compute) with a LoRA adapter
of rank 8 on every linear layer whose B is not zero (evaluate's trained model). --dtype float32 runs both in
float32 instead, where rounding can hardly part the two decodings' choices. Prompts: the first --rows rows of
the Alpaca sample in the alpaca template, left-padded. Every row generates --new-tokens tokens (the EOS id is one
no step produces), timed after one untimed call of each. Reported: ms per generated token (per step of all rows)
and how many rows the two decodings agree on token for token. Prints a table, writes
bench/results/decode_speed-<UTC time>-<gpu>-<shape>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def timed(generate, repeats: int = 2):
    """The last of `repeats` calls' result and its seconds (the first call pays one-time set-up)."""
    import torch

    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = generate()
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def compare(name: str, model, batch, new_tokens: int, never: int, pad: int) -> dict:
    import torch

    from qlora_pipeline.decoding import greedy_generate, static_decoding_unsupported

    assert static_decoding_unsupported(model, "cuda") is None
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        reference, reference_s = timed(lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
            eos_token_id=never)[:, ids.shape[1]:])
        graphed, graphed_s = timed(lambda: greedy_generate(model, ids, mask, new_tokens, never, pad, static=True))
    return {"model": name, "rows": len(ids), "new_tokens": new_tokens,
            "generate_ms_per_token": round(1000 * reference_s / new_tokens, 2),
            "graphed_ms_per_token": round(1000 * graphed_s / new_tokens, 2),
            "speedup": round(reference_s / graphed_s, 2),
            "rows_identical": int((reference == graphed).all(1).sum()),
            "tokens_identical": round(float((reference == graphed).float().mean()), 4)}


def main(args: argparse.Namespace) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from qlora_pipeline.config import QuantizeParams
    from qlora_pipeline.merging import load_base_as_trained
    from qlora_pipeline.prompts import build_prompt
    from qlora_pipeline.sources import random_model

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.padding_side = "left"
    rows = json.loads(Path(args.data).read_text())[: args.rows]
    prompts = [build_prompt("alpaca", row["instruction"], row.get("input", "")) for row in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    plain = random_model(args.shape, args.seed, tokenizer, device="cuda", dtype=args.dtype).eval()
    never = plain.config.vocab_size + 5
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = [compare(f"plain ({args.dtype})", plain, batch, args.new_tokens, never, pad)]
    with tempfile.TemporaryDirectory(dir=args.work) as model_dir:
        plain.save_pretrained(model_dir)
        del plain
        torch.cuda.empty_cache()
        quantize = QuantizeParams(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype=args.dtype)
        base = load_base_as_trained(Path(model_dir), quantize, "cuda", getattr(torch, args.dtype))
    torch.manual_seed(args.seed)
    trained = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                              init_lora_weights=False)).eval()
    results.append(compare("4-bit + LoRA", trained, batch, args.new_tokens, never, pad))

    gpu = torch.cuda.get_device_name()
    print(f"\ngreedy generation, {args.shape} in {args.dtype}, {gpu}: {args.rows} rows x {args.new_tokens} new tokens")
    print(f"{'model':18} {'generate ms/token':>18} {'graphed ms/token':>17} {'speed-up':>9} {'rows identical':>15}")
    for r in results:
        print(f"{r['model']:18} {r['generate_ms_per_token']:>18} {r['graphed_ms_per_token']:>17} {r['speedup']:>8}x"
              f" {r['rows_identical']:>9} of {r['rows']}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    out = Path(args.out) / f"decode_speed-{stamp}-{gpu.replace(' ', '_')}-{args.shape}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "decode_speed", "gpu": gpu, "shape": args.shape, "rows": args.rows,
                               "new_tokens": args.new_tokens, "dtype": args.dtype, "versions": {"torch": torch.__version__},
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Alpaca-format JSON file (the Alpaca sample)")
    parser.add_argument("--tokenizer", required=True, help="directory with the tokenizer (the embedded model's)")
    parser.add_argument("--shape", default="distilgpt2", choices=["distilgpt2", "llama-3-8b", "llama-3.2-1b"])
    parser.add_argument("--rows", type=int, default=16, help="prompts generated for at once (evaluate.batch_size)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated for every row")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the plain model's dtype and the 4-bit layers' compute dtype (evaluate's: bfloat16)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where the model is saved to be loaded in 4 bit")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    main(parser.parse_args())
