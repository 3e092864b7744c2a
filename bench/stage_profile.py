"""Where a stage's time goes: run a stage script under cProfile and split its wall time into imports,
model and tokenizer loading, quantizing, training, merging, saving, generating and the rest.

    python bench/stage_profile.py --out bench/results stages/train.py [stage args...]

Prints one line per part and appends it to <out>/stage_profile.jsonl (stage, machine, seconds by part).
cProfile attributes each part by the outermost call of its functions (recursion counted once); the parts
can overlap (a model loaded inside training counts in both), so they need not add up to the wall time.
"""

from __future__ import annotations

import argparse
import builtins
import cProfile
import datetime
import json
import platform
import pstats
import runpy
import sys
import time
from pathlib import Path

# part -> (file path fragment, function name) pairs whose cumulative time the part is. Imports are timed
# apart (ImportTimer): cProfile does not see through the frozen import machinery of Python 3.12.
PARTS = {
    "load model": [("transformers/modeling_utils.py", "from_pretrained"), ("peft/peft_model.py", "from_pretrained")],
    "load tokenizer": [("transformers/tokenization_utils_base.py", "from_pretrained"),
                       ("transformers/models/auto/tokenization_auto.py", "from_pretrained")],
    "quantize (4-bit load)": [("transformers/quantizers/quantizer_bnb_4bit.py", "create_quantized_param"),
                              ("bitsandbytes/nn/modules.py", "_quantize")],
    "train": [("transformers/trainer.py", "train")],
    "merge": [("peft/tuners/tuners_utils.py", "merge_and_unload"), ("peft/tuners/lora/model.py", "merge_and_unload")],
    "generate": [("transformers/generation/utils.py", "generate")],
    "save": [("transformers/modeling_utils.py", "save_pretrained"), ("peft/peft_model.py", "save_pretrained"),
             ("datasets/arrow_dataset.py", "save_to_disk"), ("safetensors/torch.py", "save_file")],
    "hash inputs": [("qlora_pipeline/checkpoints.py", "run_identity")],
    "compare logits": [("qlora_pipeline/merging.py", "_logits")],
    "answer loss": [("qlora_pipeline/evaluation.py", "answer_loss")],
}


class ImportTimer:
    """Wall time spent in `import` statements, counted at the outermost one only (nested imports are inside)."""

    def __init__(self):
        self.seconds = 0.0
        self.depth = 0
        self.original = builtins.__import__

    def __call__(self, *args, **kwargs):
        if self.depth:
            return self.original(*args, **kwargs)
        self.depth += 1
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.depth -= 1


def parts_of(stats: pstats.Stats) -> dict[str, float]:
    found = {part: 0.0 for part in PARTS}
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for part, patterns in PARTS.items():
            if any(fragment in filename and function == name for fragment, name in patterns):
                found[part] = max(found[part], cumulative)  # nested entries of one part: the outermost
    return {part: round(seconds, 2) for part, seconds in found.items()}


def main(args: argparse.Namespace) -> None:
    sys.argv = [args.script, *args.script_args]
    sys.path.insert(0, str(Path(args.script).resolve().parent))
    import entry

    entry.end_process = lambda: None   # a stage ends its process when done; this one still writes the profile
    profiler = cProfile.Profile()
    imports = ImportTimer()
    builtins.__import__ = imports
    start = time.perf_counter()
    code = 0
    profiler.enable()
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        profiler.disable()
        builtins.__import__ = imports.original
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    record = {"stage": Path(args.script).stem, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": platform.node(), "exit_code": code, "wall_s": round(wall, 2),
              "parts_s": {"imports": round(imports.seconds, 2), **parts_of(stats)}}
    try:
        import torch

        record["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stage_profile.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    parts = "  ".join(f"{k} {v:.1f}" for k, v in record["parts_s"].items() if v >= 0.05)
    print(f"profile {record['stage']:18} {wall:6.1f} s   {parts}", file=sys.stderr)
    if args.top:
        stats.sort_stats("cumulative").print_stats(args.top)
    sys.exit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--top", type=int, default=0, help="also print the N functions of largest cumulative time")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    main(parser.parse_args())
