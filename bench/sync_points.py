"""Where a stage makes the CPU wait for the GPU: the stage run in this process with torch's sync debug mode on,
each synchronizing call counted by where it was made.

    python bench/gpu_pipeline.py ... --keep-project            # a reproduced project to run the stage in
    python bench/sync_points.py --project /tmp/qlora-pipeline/project-distilgpt2 [--stage train] [--top 25]

A call that waits for the GPU (`.item()`, a copy to the host, a copy from pageable host memory, ...) stops the
CPU from queuing the next kernels while the GPU works, so the two take turns instead of overlapping. torch's
sync debug mode warns at each such call; this counts the warnings by the innermost frames of the project and
of the library below it. The stage writes its outputs into the project as `dvc repro` would (use a throw-away
project). Prints a table and writes bench/results/sync_points-<UTC time>-<gpu>-<stage>.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("/stages/", "/qlora_pipeline/")


def where(stack: list[traceback.FrameSummary], depth: int) -> str:
    """The innermost frame of the project and the `depth` innermost library frames it led to."""
    stack = [f for f in stack if "/warnings.py" not in f.filename and __file__ not in f.filename]
    ours = [i for i, f in enumerate(stack) if any(mark in f.filename for mark in OURS)]
    start = ours[-1] if ours else 0
    frames = [stack[start], *stack[start + 1:][-depth:]] if len(stack) > start + 1 else [stack[start]]
    return " > ".join(f"{Path(f.filename).stem}.{f.name}:{f.lineno}" for f in frames)


def main(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("sync_points: needs a GPU (torch sees none)")
    project = Path(args.project).resolve()
    os.chdir(project)
    counts: collections.Counter = collections.Counter()
    first_seen: dict[str, float] = {}
    started = time.perf_counter()

    def count(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        key = where(traceback.extract_stack()[:-1], args.depth)
        counts[key] += 1
        first_seen.setdefault(key, round(time.perf_counter() - started, 2))

    shown = warnings.showwarning
    warnings.showwarning = count
    warnings.filterwarnings("always", message=".*synchronizing CUDA operation")
    torch.cuda.set_sync_debug_mode("warn")

    script = project / "stages" / f"{args.stage.replace('-', '_')}.py"
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(f"stage_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    wall = time.perf_counter() - started
    torch.cuda.set_sync_debug_mode(0)

    rows = [{"count": n, "first_s": first_seen[key], "where": key} for key, n in counts.most_common()]
    total = sum(counts.values())
    steps = None
    train_metrics = project / "metrics" / "train.json"
    if args.stage == "train" and train_metrics.exists():
        steps = json.loads(train_metrics.read_text()).get("steps")
    gpu = torch.cuda.get_device_name(0)
    print(f"{args.stage} on {gpu}: {total} synchronizing calls in {wall:.1f} s"
          + (f", {total / steps:.1f} a step over {steps} steps" if steps else ""))
    print(f"{'count':>6} {'first s':>8}  where (innermost project frame > library frames)")
    for row in rows[:args.top]:
        print(f"{row['count']:6d} {row['first_s']:8.2f}  {row['where']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    path = out / f"sync_points-{stamp}-{gpu.replace(' ', '_')}-{args.stage}.json"
    path.write_text(json.dumps({"benchmark": "sync_points", "date": stamp, "gpu": gpu, "stage": args.stage,
                                "wall_s": round(wall, 2), "steps": steps, "total": total, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, help="a reproduced project (gpu_pipeline.py --keep-project)")
    parser.add_argument("--stage", default="train", help="the stage script to run (train, merge, evaluate, ...)")
    parser.add_argument("--depth", type=int, default=3, help="library frames shown below the project's")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    main(parser.parse_args())
