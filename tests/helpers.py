"""What the tests share besides fixtures (conftest.py): the tiny profile, throw-away projects, running stages
and tools in them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from qlora_pipeline.config import deep_update

ROOT = Path(__file__).resolve().parents[1]

# The tiny profile: params.yaml with a 2-layer random GPT-2, a few rows and two optimizer steps.
TINY_OVERLAY = {
    "model": {"source": "random", "name": "tiny-gpt2"},
    "subset": {"train_size": 16, "eval_size": 8},
    "tokenize": {"max_length": 384},
    "train": {"max_steps": 2, "batch_size": 4, "grad_accum": 2, "optim": "adamw_torch"},
    "merge": {"compare_prompts": 2},
    "evaluate": {"batch_size": 4, "max_new_tokens": 8, "generate_rows": 4},
}

# A Hugging Face token as a user would export it: tests check that it never reaches a file or a log.
FAKE_HF_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params(**overrides) -> dict:
    return deep_update(deep_update(default_params(), TINY_OVERLAY), overrides)


def make_project(dest: Path, params: dict) -> Path:
    """A copy of the project (code, dvc.yaml, the given params) in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "stages", "src", "plots"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "offline.html"))
        else:
            shutil.copy(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def project_with_inputs(source: Path, dest: Path, params: dict,
                        inputs: Iterable[str] = ("models/base", "data/tokenized")) -> Path:
    """A new project (make_project) with the outputs `inputs` of the project `source` copied in: a later stage
    runs there with other params, without rerunning the stages before it."""
    project = make_project(dest, params)
    for path in inputs:
        shutil.copytree(source / path, project / path)
    return project


def copy_project(project: Path, dest: Path) -> Path:
    """A copy of a project with its git repository and DVC cache, to change freely."""
    shutil.copytree(project, dest, symlinks=True)
    return dest


def edit_params(project: Path, change) -> None:
    """Apply `change` (a function of the params mapping) to the project's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# Metrics keys that are wall-clock or memory measurements: they differ between runs of the same computation.
TIMING = {"runtime_s", "real_tokens_per_s", "peak_memory_mb", "seconds"}


def reproducible_outputs(project: Path) -> dict:
    """Every output file's bytes; for the metrics with wall-clock figures, the rest of their content."""
    found = {}
    for path in sorted(p for top in ("data", "models", "metrics", "reports", "dvclive", "checkpoints")
                       for p in (project / top).rglob("*") if p.is_file()):
        key = str(path.relative_to(project))
        if path.suffix == ".json" and path.parent.name == "metrics":
            found[key] = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}
        elif path.name == "train_log.csv":
            found[key] = [line.rsplit(",", 1)[0] for line in path.read_text().splitlines()]  # no seconds column
        else:
            found[key] = path.read_bytes()
    return found


def tool_env(**extra: str) -> dict:
    """The environment for `dvc`, `git` and the stages' `python`: this environment's, whether or not it is
    activated, offline, with a git identity and a (fake) Hugging Face token."""
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@localhost", "HF_TOKEN": FAKE_HF_TOKEN, **extra}


def run_stage(project: Path, script: str, *args: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(project / "stages" / script), *args], cwd=project, env=tool_env(), capture_output=True,
        text=True, **popen,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def sh(project: Path, *cmd: str, env: dict | None = None) -> str:
    """Run a command in `project`; fail the test with its output if it fails; return its stdout."""
    result = subprocess.run(cmd, cwd=project, env=env or tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout
