"""Resumable training: a train stage that is killed continues from its last checkpoint when rerun.

`checkpoints/train/` is a persistent DVC output (DVC does not delete it before running the stage):

    run.json            which run the checkpoints belong to: the params that shape the result and the
                        digests of the base model and the tokenized data
    checkpoint-<N>/     the Trainer's state after N optimizer steps (adapter, optimizer, scheduler, RNG
                        states, trainer state) and pipeline_state.json, written last: a checkpoint
                        without it was cut off while being saved, and is never resumed from

A checkpoint of another run (other params, model or data) is refused, never mixed in. When the run
completes, its checkpoints are removed and run.json records that it completed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from qlora_pipeline import outputs
from qlora_pipeline.config import LoraParams, QuantizeParams, TrainParams, as_dict
from qlora_pipeline.errors import PipelineError

RUN_FILE = "run.json"
STATE_FILE = "pipeline_state.json"
PREFIX = "checkpoint-"


def digest_tree(path: Path) -> str:
    """sha256 over the relative names and contents of every file under `path`."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def run_identity(params: dict[str, Any], inputs: dict[str, Path]) -> dict[str, Any]:
    """What makes two runs the same run: their params and the digests of their inputs."""
    return {"params": params, "inputs": {name: digest_tree(path) for name, path in inputs.items()}}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def _difference(saved: dict, current: dict) -> str:
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            if key.startswith("inputs."):
                return f"{key.removeprefix('inputs.')} has changed"
            return f"'{key.removeprefix('params.')}' was {old.get(key)!r}, is now {new.get(key)!r}"
    return "nothing"


def _checkpoints(directory: Path) -> list[Path]:
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / STATE_FILE).is_file()


def prepare(directory: Path, identity: dict[str, Any], write: bool = True) -> Path | None:
    """Return the checkpoint to resume from (None: start from step 0) and mark `directory` as this run's.

    Checkpoints cut off while being saved are ignored (and removed); checkpoints of another run stop the
    stage. In a distributed run every process calls this, and only the main one writes (`write`)."""
    directory = Path(directory)
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        for torn in [c for c in _checkpoints(directory) if not is_complete(c)]:
            shutil.rmtree(torn)
    complete = [c for c in _checkpoints(directory) if is_complete(c)] if directory.is_dir() else []
    run_file = directory / RUN_FILE
    if complete:
        if not run_file.is_file():
            raise PipelineError(
                f"{complete[-1]}: a checkpoint without {RUN_FILE}, so of an unknown run; delete {directory} to start over"
            )
        saved = json.loads(run_file.read_text())
        if saved.get("identity") != identity:
            raise PipelineError(
                f"{complete[-1]} is from another run ({_difference(saved.get('identity', {}), identity)}); "
                f"finish that run with its params, or delete {directory} to start this one over"
            )
    if write:
        outputs.write_json(run_file, {"status": "running", "identity": identity})
    return complete[-1] if complete else None


def save_state(checkpoint: Path, state: dict[str, Any]) -> None:
    """Complete `checkpoint` with the pipeline's own state, then drop the older checkpoints."""
    outputs.write_json(Path(checkpoint) / STATE_FILE, state)
    for older in _checkpoints(Path(checkpoint).parent):
        if older != Path(checkpoint):
            shutil.rmtree(older)


def load_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def finish(directory: Path) -> None:
    """The run completed and its outputs are in place: its checkpoints are no longer needed."""
    directory = Path(directory)
    run_file = directory / RUN_FILE
    identity = json.loads(run_file.read_text()).get("identity") if run_file.is_file() else None
    outputs.write_json(run_file, {"status": "complete", "identity": identity})
    # The checkpoints, and the model card trl writes beside them.
    for entry in directory.iterdir():
        if entry.name != RUN_FILE:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# Train keys that change neither the arithmetic nor the data order: a run may resume under other values
# (the memory budget: the plan it leads to changes only the execution, and free memory differs run to run;
# the rendezvous: a run cut off on several machines may resume at another address).
_NOT_IN_RUN_IDENTITY = ("checkpoint_every_steps", "log_every_steps", "max_memory", "rdzv_endpoint", "rdzv_timeout_s")


def resume_params(quantize: QuantizeParams, lora: LoraParams, params: TrainParams, seed: int) -> dict[str, Any]:
    """The params a checkpoint must share with the run that resumes from it."""
    train = {k: v for k, v in as_dict(params).items() if k not in _NOT_IN_RUN_IDENTITY}
    return {"seed": seed, "quantize": as_dict(quantize), "lora": as_dict(lora), "train": train}
