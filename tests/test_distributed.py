"""train.num_processes: 2 makes the train stage relaunch itself through torchrun (gloo on the CPU); the
rows of each optimizer step stay the same, so it trains what one process trains.

Tolerance: the two runs differ only in the order float32 sums are taken (each process reduces its own
rows, then DDP averages the gradients) and in padding (each process pads its 4 rows, not 8): the step
losses and gradient norms agree to 1e-6 relative, and the adapters to 1e-5 absolute (1.3e-7 observed on
weights up to 0.13; one Adam step at this learning rate moves a weight by up to 5e-4). LoRA dropout is
off: its masks come from each process's random stream, so with dropout the runs are alike only in
distribution."""

import csv
import json
import shutil

import pytest

from conftest import make_project, run_stage, tiny_params


def train_in(ran, dest, num_processes):
    project = make_project(dest, tiny_params(
        lora={"dropout": 0.0}, train={"max_steps": 4, "num_processes": num_processes, "checkpoint_every_steps": 2}))
    for name in ("models/base", "data/tokenized"):
        shutil.copytree(ran / name, project / name)
    return project, run_stage(project, "train.py")


def test_two_processes_train_what_one_trains(ran, tmp_path):
    from safetensors.torch import load_file

    one, _ = train_in(ran, tmp_path / "one", 1)
    two, result = train_in(ran, tmp_path / "two", 2)
    assert "launching 2 processes" in result.stdout

    metrics = {p: json.loads((p / "metrics/train.json").read_text()) for p in (one, two)}
    assert (metrics[one]["num_processes"], metrics[two]["num_processes"]) == (1, 2)
    assert (metrics[one]["micro_batch_size"], metrics[two]["micro_batch_size"]) == (8, 4)
    # Every row trained once either way: the token counts are summed over the processes.
    assert metrics[one]["real_tokens"] == metrics[two]["real_tokens"]
    assert metrics[one]["trained_tokens"] == metrics[two]["trained_tokens"]

    logs = {}
    for p in (one, two):
        with open(p / "metrics/train_log.csv") as fh:
            logs[p] = list(csv.DictReader(fh))
    assert len(logs[one]) == len(logs[two]) == 4
    for a, b in zip(logs[one], logs[two]):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-6)
        assert a["tokens"] == b["tokens"]

    first = load_file(one / "models/adapter/adapter_model.safetensors")
    second = load_file(two / "models/adapter/adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-5
    # Only the first process wrote outputs: one adapter, no stray temporary directories.
    assert not list(two.glob("**/.*.tmp-*"))
    assert sorted(p.name for p in (two / "checkpoints/train").iterdir()) == ["run.json"]


def test_processes_must_share_the_rows_evenly(ran, tmp_path):
    project = make_project(tmp_path / "p", tiny_params(train={"num_processes": 3}))
    for name in ("models/base", "data/tokenized"):
        shutil.copytree(ran / name, project / name)
    result = run_stage(project, "train.py", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: params key 'train.num_processes': 3 processes cannot share the 8 rows "
                                     "of an optimizer step evenly (train.batch_size x train.grad_accum)")
