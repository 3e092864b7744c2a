"""The whole pipeline on one GPU with `dvc repro`, timed stage by stage, in a fresh git + DVC project.

    python bench/gpu_pipeline.py --data .bench-assets/alpaca_sample_1k.json --tokenizer .bench-assets/tokenizer \
        [--shape distilgpt2 | llama-3-8b | llama-3.2-1b] [--set train.max_steps=50 ...] [--profile-stages] [--timeline]

distilgpt2: the tutorial's experiment (profiles/tutorial.yaml) on distilgpt2-shaped random weights. The Llama
shapes: the default params.yaml on a random model of that shape built on the GPU in bfloat16 (the large-models
benchmark's, bench/scale_speed.py). Either way the model is a local directory outside the project
(model.source: local, as a user's own checkpoint would be) and the rows the Alpaca-format JSON file.

Before timing, the libraries' bytecode is compiled once (an installed environment has it; the GPU image's
site-packages are read-only and hold none, so every stage would otherwise recompile ~3,400 modules). While
`dvc repro` runs, a sampler reads every 0.25 s the largest resident set of the stage's processes and the GPU's
used memory (nvidia-smi, all processes). Each stage runs from DVC's "Running stage" line to the next (its
command plus DVC's own work on its outputs). Prints a table and writes
bench/results/gpu_pipeline-<UTC time>-<gpu>-<shape>.json (stages, whole and no-op `dvc repro`, the params
changed, the stages' metrics, library versions). --profile-stages then runs the model stages again under
bench/stage_profile.py (imports, loading, training, ...). --code DIR runs the pipeline of another checkout
(dvc.yaml, stages, src, params.yaml and profiles taken from DIR), for before/after tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# dvc.yaml's stage -> its script, where the names differ (a foreach stage's key is the script's argument).
STAGE_SCRIPTS = {"quantize-inspect": "quantize_inspect.py", "tokenize": "tokenize_data.py"}
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "dvc", "dvclive")


def project_params(code: Path, shape: str, model_dir: Path, data: Path, overrides: list[str]) -> dict:
    """The params the run uses: the tutorial profile for distilgpt2, the default params.yaml for the Llama shapes,
    with the local model and data, and `overrides` (dotted key=YAML value) applied last."""
    params = yaml.safe_load((code / ("profiles/tutorial.yaml" if shape == "distilgpt2" else "params.yaml")).read_text())
    params["model"].update(source="local", name=str(model_dir))
    params["data"].update(source="local", name=str(data), duplicates="drop")
    params["subset"].update(train_size=885, eval_size=100)   # 985 distinct rows in the Alpaca sample
    for item in overrides:
        key, value = item.split("=", 1)
        *sections, last = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        if last not in node:
            raise SystemExit(f"--set {item}: no params key {key}")
        node[last] = yaml.safe_load(value)
    return params


def build_model(shape: str, tokenizer_dir: Path, model_dir: Path, seed: int) -> int:
    """The random model of `shape` saved with the tokenizer in model_dir (reused when there); its parameter count."""
    if shape == "distilgpt2":
        from transformers import AutoTokenizer

        from qlora_pipeline.sources import random_model

        if not (model_dir / "config.json").exists():
            model = random_model("distilgpt2", seed)
            model.save_pretrained(model_dir)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
            (model_dir / "parameters.json").write_text(json.dumps({"parameters": model.num_parameters()}))
        return json.loads((model_dir / "parameters.json").read_text())["parameters"]
    sys.path.insert(0, str(ROOT / "bench"))
    from scale_speed import build_model as build_scale_model

    return build_scale_model(shape, tokenizer_dir, model_dir, seed)


def make_project(code: Path, work: Path, params: dict) -> None:
    """A fresh git + DVC repository in `work` holding the pipeline of `code` and `params`."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("dvc.yaml", "stages", "src", "plots"):
        if (code / name).is_dir():
            shutil.copytree(code / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
        elif (code / name).exists():
            shutil.copy2(code / name, work / name)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = lambda *command: subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL)
    run("git", "init", "-q")
    run("git", "config", "user.email", "bench@localhost")
    run("git", "config", "user.name", "bench")
    run("dvc", "init", "-q")
    # Links, not copies, from the cache: a multi-GB model is not stored twice (what DVC advises for large files).
    run("dvc", "config", "cache.type", "hardlink,symlink")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "bench project")


def warm_bytecode(env: dict) -> float:
    """Compile the libraries' bytecode once, as installing them does; returns the seconds it took."""
    started = time.perf_counter()
    code = "import torch, transformers.modeling_utils, transformers.generation.utils, peft, trl, bitsandbytes, " \
           "datasets, dvclive, tokenizers, dvc.repo"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - started


class Sampler(threading.Thread):
    """Every 0.25 s: the largest resident set among the processes under `pid`, and the GPU's used memory."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stopped = pid, [], threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.is_set():
            try:
                rss = max((p.memory_info().rss for p in psutil.Process(self.pid).children(recursive=True)), default=0)
            except psutil.Error:   # dvc, or a process under it, ended while being read
                rss = 0
            gpu_mib = gpu_used_mib()
            self.samples.append((time.time(), rss, gpu_mib))
            self.stopped.wait(0.25)


def hold_gpu_memory(free_gib: float) -> subprocess.Popen:
    """A process that holds all of the GPU's free memory but `free_gib` GiB, until it is killed: the stages
    then see the card as a smaller one would be (what train.max_memory auto, and merge and evaluate, find free)."""
    # It holds the memory until its standard input closes: when this process ends, however it ends.
    code = ("import sys, torch\n"
            "free, _ = torch.cuda.mem_get_info()\n"
            "held = torch.empty(int(free - float(sys.argv[1]) * 2**30), dtype=torch.uint8, device='cuda')\n"
            "print(round(torch.cuda.mem_get_info()[0] / 2**30, 2), flush=True)\n"
            "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(free_gib)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    left = holder.stdout.readline().strip()
    if not left:
        raise SystemExit(f"--gpu-memory {free_gib:g}: could not hold the rest of the GPU (more than is free?)")
    print(f"GPU memory free for the stages: {left} GiB")
    return holder


def release(holder: subprocess.Popen | None) -> None:
    if holder:
        holder.stdin.close()
        holder.wait()


def gpu_used_mib() -> int:
    """The GPU's used memory over all processes (nvidia-smi), or 0 without one."""
    if not shutil.which("nvidia-smi"):
        return 0
    smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return sum(int(line) for line in smi.stdout.split() if line.strip().isdigit())


def timed_repro(work: Path, env: dict, log: Path, timeline: Path | None = None) -> tuple[list[dict], float]:
    """`dvc repro` in `work`: each stage's wall time, peak resident set and peak GPU memory (above what other
    processes held when it started); the whole time. With `timeline` (a directory), every Python process samples
    where its time goes (bench/timeline) and each stage gets its process's summary (stage_timeline)."""
    baseline = gpu_used_mib()
    if timeline:
        shutil.rmtree(timeline, ignore_errors=True)
        timeline.mkdir(parents=True)
        env = {**env, "QLORA_TIMELINE_DIR": str(timeline),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "timeline"), env.get("PYTHONPATH", "")])}
    started = time.time()
    # DVC's "Running stage" lines as they are printed: the stage marks (the stages inherit it; they print a few lines).
    env = {**env, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(["dvc", "repro"], cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(process.pid)
    sampler.start()
    marks = []
    with log.open("w") as fh:
        for line in process.stdout:
            fh.write(f"{time.time():.3f} {line}")
            if line.startswith("Running stage '"):
                marks.append((time.time(), line.split("'")[1]))
    if process.wait():
        raise SystemExit(f"dvc repro failed (exit {process.returncode}); see {log}")
    ended = time.time()
    sampler.stopped.set()
    sampler.join()
    records = [json.loads(p.read_text()) for p in sorted(timeline.glob("*.json"))] if timeline else []
    used: set[int] = set()
    stages = []
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else ended
        inside = [s for s in sampler.samples if start <= s[0] < end]
        stages.append({"stage": name, "wall_s": round(end - start, 1),
                       "peak_rss_gib": round(max((s[1] for s in inside), default=0) / 2**30, 2),
                       "peak_gpu_used_mib": max((s[2] - baseline for s in inside), default=0)})
        # The stage's own process: its script (and foreach key) as dvc.yaml runs it, started after the previous
        # stage's process (the kernel's start time and this process's clock can differ by a few ms).
        command = [STAGE_SCRIPTS.get(name.split("@")[0], name.split("@")[0] + ".py"), *name.split("@")[1:]]
        ran = [r for r in records if r["pid"] not in used and r["started"] >= start - 0.1
               and [Path(r["argv"][0]).name, *r["argv"][1:]] == command]
        if ran:
            record = min(ran, key=lambda r: r["started"])
            used.add(record["pid"])
            stages[-1]["timeline"] = stage_timeline(record, start, end)
    return stages, ended - started


def stage_timeline(record: dict, mark: float, next_mark: float) -> dict:
    """A stage process's sampled time (bench/timeline): DVC's seconds before it started and after it ended, its
    imports by package, and its other time by the project function and library it was in, with the functions
    running there most (largest first)."""
    imports: dict[str, float] = {}
    parts: dict[str, dict[str, float]] = {}
    for label, _, seconds in record["segments"]:
        if label.startswith("import "):
            imports[label[7:]] = imports.get(label[7:], 0.0) + seconds
        else:
            part, _, running = label.rpartition(" > ") if " > " in label else (label, "", label)
            by_running = parts.setdefault(part, {})
            by_running[running] = by_running.get(running, 0.0) + seconds
    totals = {part: sum(by_running.values()) for part, by_running in parts.items()}
    largest = sorted(parts, key=totals.get, reverse=True)
    return {"dvc_before_s": round(record["started"] - mark, 2), "process_s": round(record["ended"] - record["started"], 2),
            "dvc_after_s": round(next_mark - record["ended"], 2), "imports_s": round(sum(imports.values()), 2),
            "imports_by_package": {k: round(v, 2) for k, v in sorted(imports.items(), key=lambda kv: -kv[1]) if v >= 0.05},
            "seconds": {part: round(totals[part], 2) for part in largest if totals[part] >= 0.05},
            "running": {part: {k: round(v, 2) for k, v in sorted(parts[part].items(), key=lambda kv: -kv[1])[:4] if v >= 0.05}
                        for part in largest[:8]}}


def gpu_name() -> str:
    """The GPU's name from nvidia-smi (asking torch would give this process a CUDA context that `dvc repro`
    would then run beside), or the CPU's where there is none."""
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if smi.stdout.strip():
            return smi.stdout.splitlines()[0].strip()
    return platform.processor() or "cpu"


def main(args) -> None:
    code, data, tokenizer = Path(args.code).resolve(), Path(args.data).resolve(), Path(args.tokenizer).resolve()
    work = Path(args.work) / f"project-{args.shape}"
    model_dir = Path(args.model_dir or Path(args.work) / f"model-{args.shape}")
    # In a process of its own: building a Llama shape on the GPU leaves a CUDA context behind.
    built = subprocess.run([sys.executable, __file__, "--build-model", args.shape, str(tokenizer), str(model_dir),
                            str(args.seed)], check=True, capture_output=True, text=True)
    parameters = int(built.stdout.split()[-1])
    params = project_params(code, args.shape, model_dir, data, args.set)
    make_project(code, work, params)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # The project's own library, not this checkout's (stages import the library beside their script anyway).
    env["PYTHONPATH"] = os.pathsep.join([str(work / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                              if p and Path(p).resolve() != ROOT / "src"])
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path.home() / ".cache" / "pycache"))
    # dvc, and the `python` of dvc.yaml's commands, from this interpreter's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    bytecode_s = warm_bytecode(env)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    holder = hold_gpu_memory(args.gpu_memory) if args.gpu_memory else None
    try:
        stages, whole_s = timed_repro(work, env, out / f"gpu_pipeline-{args.shape}-dvc_repro.log",
                                      Path(args.work) / "timeline" if args.timeline else None)
        started = time.time()
        subprocess.run(["dvc", "repro"], cwd=work, env=env, check=True, capture_output=True)
        noop_s = time.time() - started
        metrics = {p.stem: json.loads(p.read_text()) for p in sorted((work / "metrics").glob("*.json"))}
        # Last: the profiled runs write the stages' outputs again.
        profiles = profile_stages(work, env, out) if args.profile_stages else []
    finally:
        release(holder)

    gpu = gpu_name()
    print(f"\ndvc repro, {args.shape} ({parameters / 1e9:.3f} B parameters), {gpu}"
          f"{f' with {args.gpu_memory:g} GiB free' if args.gpu_memory else ''}; bytecode compiled first in {bytecode_s:.1f} s")
    print(f"{'stage':18} {'wall s':>7} {'peak RSS GiB':>13} {'GPU used MiB':>13}")
    for s in stages:
        print(f"{s['stage']:18} {s['wall_s']:>7.1f} {s['peak_rss_gib']:>13.2f} {s['peak_gpu_used_mib']:>13}")
    print(f"{'whole dvc repro':18} {whole_s:>7.1f}\n{'no-op dvc repro':18} {noop_s:>7.1f}")
    for s in stages:
        if "timeline" in s:
            t = s["timeline"]
            print(f"timeline {s['stage']:16} dvc {t['dvc_before_s']:.2f} + {t['dvc_after_s']:.2f} s, process {t['process_s']:.2f} s, "
                  f"imports {t['imports_s']:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in t["imports_by_package"].items()) + ")")
            for part, seconds in list(t["seconds"].items())[:6]:
                print(f"    {seconds:6.2f} {part}: " + ", ".join(f"{k} {v:.2f}" for k, v in t["running"].get(part, {}).items()))

    record = {
        "benchmark": "gpu_pipeline", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "host": platform.node(), "model": {"shape": args.shape, "parameters": parameters},
        "code": str(code), "params_set": args.set, "gpu_memory_free_gib": args.gpu_memory, "bytecode_compile_s": round(bytecode_s, 1),
        "stages": stages, "whole_dvc_repro_s": round(whole_s, 1), "noop_dvc_repro_s": round(noop_s, 1),
        "stage_profiles": profiles, "metrics": metrics, "versions": versions(),
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    path = out / f"gpu_pipeline-{stamp}-{gpu.replace(' ', '_')}-{args.shape}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    if not args.keep_project:
        shutil.rmtree(work, ignore_errors=True)


def profile_stages(work: Path, env: dict, out: Path) -> list[str]:
    """The model stages again under bench/stage_profile.py: where each one's time goes (imports, loading, ...)."""
    lines = []
    for stage in (["download.py", "model"], ["tokenize_data.py"], ["quantize_inspect.py"], ["train.py"], ["merge.py"],
                  ["evaluate.py"]):
        run = subprocess.run([sys.executable, str(ROOT / "bench" / "stage_profile.py"), "--out", str(out),
                              f"stages/{stage[0]}", *stage[1:]], cwd=work, env=env, capture_output=True, text=True)
        lines += [line for line in run.stderr.splitlines() if line.startswith("profile")]
    print("\n".join(lines))
    return lines


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build-model"]:   # main's child: build the model, print its parameter count
        shape, tokenizer_dir, model_dir, seed = sys.argv[2:6]
        print(build_model(shape, Path(tokenizer_dir), Path(model_dir), int(seed)))
        sys.exit()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Alpaca-format JSON file (the Alpaca sample)")
    parser.add_argument("--tokenizer", required=True, help="directory with the tokenizer (the embedded model's)")
    parser.add_argument("--shape", default="distilgpt2", choices=["distilgpt2", "llama-3-8b", "llama-3.2-1b"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params key to change, e.g. train.max_steps=50 (YAML value)")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose pipeline runs (default: this one)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="/tmp/qlora-pipeline", help="where the model and the project go")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="leave only this much GPU memory free while dvc repro runs (a smaller card)")
    parser.add_argument("--model-dir", help="where the random model goes (default: in --work; reused when there)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--profile-stages", action="store_true", help="then run the model stages under stage_profile")
    parser.add_argument("--timeline", action="store_true",
                        help="sample where each stage's process spends its time (bench/timeline), per stage")
    parser.add_argument("--keep-project", action="store_true", help="leave the project (and its models) in --work")
    main(parser.parse_args())
