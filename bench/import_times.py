"""What each stage spends importing: every stage run once, in order, under `python -X importtime`, in a
throw-away copy of the project.

    python bench/import_times.py [--stages tokenize,train] [-S key=value ...] [--keep DIR]

The stages import their heavy libraries inside main() (the library does so lazily too), so only a real run
shows what a stage loads: each stage script runs for real, offline, on the project's params.yaml with a few
keys made small (rows, steps, generated tokens; `-S` adds or overrides: they change how long the stage
works, not what it imports). Prints a table: the stage's wall time, its import time (the top-level imports'
cumulative microseconds as -X importtime reports them), which of the heavy libraries it loaded, and the
packages whose modules took longest to import (their own time, summed over the package).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # dvc.yaml's stage -> the command line of its script, in pipeline order
    "download@model": ["download.py", "model"], "download@data": ["download.py", "data"], "subset": ["subset.py"],
    "format": ["format.py"], "tokenize": ["tokenize_data.py"], "quantize-inspect": ["quantize_inspect.py"],
    "train": ["train.py"], "merge": ["merge.py"], "evaluate": ["evaluate.py"],
}
HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "sklearn", "tokenizers")
# Keys made small so that the run is quick; none decides which modules a stage imports.
QUICK = ["subset.train_size=16", "subset.eval_size=8", "train.batch_size=4", "train.max_steps=1",
         "merge.compare_prompts=1", "evaluate.generate_rows=2", "evaluate.max_new_tokens=4"]


def set_key(params: dict, assignment: str) -> None:
    """Apply `section.key=value` (the value read as YAML) to the params mapping."""
    dotted, _, value = assignment.partition("=")
    *sections, key = dotted.split(".")
    for section in sections:
        params = params[section]
    params[key] = yaml.safe_load(value)


def parse_importtime(stderr: str) -> tuple[float, collections.Counter]:
    """Seconds in top-level imports, and each top-level package's own import seconds, from -X importtime lines
    (`import time: self [us] | cumulative | name`, the name indented one space a nesting level)."""
    total, by_package = 0.0, collections.Counter()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:"):].split("|")
        if len(name) - len(name.lstrip()) == 1:
            total += int(cumulative) / 1e6
        by_package[name.strip().split(".")[0]] += int(own) / 1e6
    return total, by_package


def main(args: argparse.Namespace) -> None:
    work = Path(args.keep or tempfile.mkdtemp(prefix="import-times-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, work / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in QUICK + args.set:
        set_key(params, assignment)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    chosen = args.stages.split(",") if args.stages else list(STAGES)
    print(f"{'stage':17} {'wall s':>7} {'imports s':>9}  heavy libraries loaded; top packages by import time (s)")
    for stage in STAGES:
        if stage not in chosen:
            continue
        script, *stage_args = STAGES[stage]
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-X", "importtime", str(work / "stages" / script), *stage_args],
                                cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            sys.exit(f"{stage} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        total, by_package = parse_importtime(result.stderr)
        heavy = ",".join(name for name in HEAVY if name in by_package) or "-"
        top = ", ".join(f"{name} {seconds:.2f}" for name, seconds in by_package.most_common(5))
        print(f"{stage:17} {wall:7.1f} {total:9.2f}  {heavy}; {top}", flush=True)
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", help="comma-separated dvc.yaml stage names (default: all, in order; a stage "
                                         "needs the outputs of those before it, so a subset needs --keep DIR of a run)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params key to set, as in dvc exp run -S (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temporary directory, removed)")
    main(parser.parse_args())
