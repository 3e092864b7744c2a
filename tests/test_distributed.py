"""train.num_processes: 2 makes the train stage relaunch itself through torchrun (gloo on the CPU); the
rows of each optimizer step stay the same, so it trains what one process trains. train.nnodes: 2 spreads
the processes over two machines (here two checkouts on 127.0.0.1, one process each, the second started with
--join): they train what one machine with two processes trains, and only the first machine writes.

Tolerance: the two runs differ only in the order float32 sums are taken (each process reduces its own
rows, then DDP averages the gradients) and in padding (each process pads its 4 rows, not 8): the step
losses and gradient norms agree to 1e-6 relative, and the adapters to 1e-5 absolute (1.3e-7 observed on
weights up to 0.13; one Adam step at this learning rate moves a weight by up to 5e-4). LoRA dropout is
off: its masks come from each process's random stream, so with dropout the runs are alike only in
distribution."""

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import project_with_inputs, run_stage, tiny_params, tool_env


def project_in(ran, dest, **train):
    """A project trained on the tiny data with `train` params, its inputs copied from the reproduced one."""
    return project_with_inputs(ran, dest, tiny_params(
        lora={"dropout": 0.0}, train={"max_steps": 4, "checkpoint_every_steps": 2, **train}))


def train_in(ran, dest, num_processes):
    project = project_in(ran, dest, num_processes=num_processes)
    return project, run_stage(project, "train.py")


@pytest.fixture(scope="module")
def two_processes(ran, tmp_path_factory):
    """One machine, two processes: the reference of the runs on several."""
    return train_in(ran, tmp_path_factory.mktemp("two") / "two", 2)


def step_log(project):
    with open(project / "metrics/train_log.csv") as fh:
        return list(csv.DictReader(fh))


def assert_same_training(one, other):
    """The same step losses, gradient norms and token counts, and the same adapter, within the tolerance above."""
    from safetensors.torch import load_file

    assert len(step_log(one)) == len(step_log(other)) == 4
    for a, b in zip(step_log(one), step_log(other)):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-6)
        assert a["tokens"] == b["tokens"]
    first = load_file(one / "models/adapter/adapter_model.safetensors")
    second = load_file(other / "models/adapter/adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-5


def test_two_processes_train_what_one_trains(ran, two_processes, tmp_path):
    one, _ = train_in(ran, tmp_path / "one", 1)
    two, result = two_processes
    assert "launching 2 processes" in result.stdout

    metrics = {p: json.loads((p / "metrics/train.json").read_text()) for p in (one, two)}
    assert (metrics[one]["num_processes"], metrics[two]["num_processes"]) == (1, 2)
    assert (metrics[one]["micro_batch_size"], metrics[two]["micro_batch_size"]) == (8, 4)
    # Every row trained once either way: the token counts are summed over the processes.
    assert metrics[one]["real_tokens"] == metrics[two]["real_tokens"]
    assert metrics[one]["trained_tokens"] == metrics[two]["trained_tokens"]

    assert_same_training(one, two)
    # Only the first process wrote outputs: one adapter, no stray temporary directories.
    assert not list(two.glob("**/.*.tmp-*"))
    assert sorted(p.name for p in (two / "checkpoints/train").iterdir()) == ["run.json"]


def test_processes_must_share_the_rows_evenly(ran, tmp_path):
    project = project_with_inputs(ran, tmp_path / "p", tiny_params(train={"num_processes": 3}))
    result = run_stage(project, "train.py", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: params key 'train.num_processes': 3 processes cannot share the 8 rows "
                                     "of an optimizer step evenly (train.batch_size x train.grad_accum)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def join(project, endpoint, *args):
    """Start the stage on another "machine" (a checkout), joining the run at `endpoint`."""
    return subprocess.Popen([sys.executable, "stages/train.py", "--join", endpoint, *args], cwd=project,
                            env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def files_of(project):
    """Every file of a checkout with its size and modification time (bytecode caches aside)."""
    return {str(p.relative_to(project)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in project.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_two_machines_train_what_one_machine_with_two_processes_trains(ran, two_processes, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    # A rendezvous timeout well under the test's: a failure to meet ends the test instead of hanging it.
    first = project_in(ran, tmp_path / "first", nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout_s=60)
    other = project_in(ran, tmp_path / "other", nnodes=2, rdzv_timeout_s=60)   # --join gives its endpoint
    before = files_of(other)
    joining = join(other, endpoint)    # before the first machine is up: it waits for the rendezvous
    result = run_stage(first, "train.py")
    out, err = joining.communicate(timeout=120)
    assert joining.returncode == 0, err[-3000:]

    assert f"python stages/train.py --join {endpoint} --node-rank 1" in result.stdout
    assert "--rdzv_backend=static" in result.stdout and "machine 2 of 2" in out
    metrics = json.loads((first / "metrics/train.json").read_text())
    assert (metrics["num_processes"], metrics["nnodes"], metrics["sharding"]) == (2, 2, "none")
    assert_same_training(two_processes[0], first)
    # The first machine wrote every output; the other wrote nothing into its checkout (checkpoints included:
    # each of its processes kept them in a temporary directory and sent its random-number state to the first).
    assert sorted(p.name for p in (first / "checkpoints/train").iterdir()) == ["run.json"]
    assert files_of(other) == before


def test_machines_with_different_params_are_refused_naming_the_key(ran, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    first = project_in(ran, tmp_path / "first", nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout_s=60)
    other = project_in(ran, tmp_path / "other", nnodes=2, rdzv_timeout_s=60, learning_rate=1e-3)
    joining = join(other, endpoint)
    result = run_stage(first, "train.py", check=False)
    _, err = joining.communicate(timeout=120)
    line = ("error: params key 'train.learning_rate' differs between the machines: 0.0005 on the first, 0.001 on "
            "machine 2 (node rank 1); give every machine the same params")
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (2, line)
    assert (joining.returncode, err.strip().splitlines()[-1]) == (2, line)
    assert not (first / "models/adapter").exists()


def test_a_machine_that_never_joins_stops_the_run_after_the_timeout(ran, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    first = project_in(ran, tmp_path / "first", nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout_s=2)
    result = run_stage(first, "train.py", check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: train: 1 of the 2 machines (train.nnodes) joined the rendezvous at {endpoint} within "
        "train.rdzv_timeout_s (2 s); run the join command printed above on each other machine")
    assert not (first / "models/adapter").exists()

    other = project_in(ran, tmp_path / "other", nnodes=2, rdzv_timeout_s=2)
    out, err = join(other, endpoint).communicate(timeout=120)
    assert err.strip() == (f"error: --join {endpoint}: no first machine answered there within train.rdzv_timeout_s "
                           f"(2 s); start the stage on the first machine (its train.rdzv_endpoint: {endpoint})")


@pytest.mark.parametrize("train, args, line", [
    ({"nnodes": 2, "rdzv_endpoint": "node-1"}, (), "params key 'train.rdzv_endpoint': must be '' or HOST:PORT (the "
     "first machine's address and a port from 1 to 65535), got 'node-1'"),
    ({"nnodes": 2}, (), "params key 'train.rdzv_endpoint' is needed with train.nnodes > 1: HOST:PORT of this machine, "
     "reachable from the others"),
    ({"nnodes": 2, "rdzv_endpoint": "no-such-host.invalid:29500"}, (), "params key 'train.rdzv_endpoint': host "
     "'no-such-host.invalid' of no-such-host.invalid:29500 does not resolve (Name or service not known)"),
    ({}, ("--join", "127.0.0.1:29500"), "--join 127.0.0.1:29500: params key 'train.nnodes' is 1 on this machine; "
     "give it the first machine's params"),
    ({"nnodes": 3}, ("--join", "127.0.0.1:29500", "--node-rank", "3"), "--node-rank 3: must be from 1 to 2 with "
     "train.nnodes 3 (0 is the first machine's)"),
    ({"nnodes": 2}, ("--join", "127.0.0.1"), "--join 127.0.0.1: '127.0.0.1' is not HOST:PORT (a port from 1 to "
     "65535)"),
    ({"num_processes": 2, "sharding": "fsdp"}, (), "params key 'train.sharding' is 'fsdp' but training runs on the "
     "CPU, where accelerate applies no FSDP (it would train whole copies, as DDP): use none or auto"),
])
def test_bad_rendezvous_and_sharding_params_stop_before_any_process_starts(ran, tmp_path, train, args, line):
    project = project_in(ran, tmp_path / "p", **train)
    result = run_stage(project, "train.py", *args, check=False)
    assert (result.returncode, result.stderr.strip()) == (2, f"error: {line}")
    assert "launching" not in result.stdout


def test_a_run_on_two_machines_resumes_where_it_stopped(ran, two_processes, tmp_path):
    """Stopped after its first checkpoint (the first machine's stage gets SIGTERM, as dvc stops a stage), the run
    resumes on both machines from that checkpoint, which holds the other machine's random-number state too, and
    ends as the uninterrupted run does."""
    import signal
    import time

    endpoint = f"127.0.0.1:{free_port()}"
    first = project_in(ran, tmp_path / "first", nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout_s=60)
    other = project_in(ran, tmp_path / "other", nnodes=2, rdzv_timeout_s=60)
    joining = join(other, endpoint)
    stopped = subprocess.Popen([sys.executable, "stages/train.py"], cwd=first, env=tool_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = first / "checkpoints/train/checkpoint-2"
    while not (checkpoint / "pipeline_state.json").exists():
        assert stopped.poll() is None, "the stage finished before it could be stopped"
        time.sleep(0.02)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.communicate(timeout=120)[1].strip().splitlines()[-1] == (
        "error: train: stopped by SIGTERM; rerun to continue from the last checkpoint")
    joining.communicate(timeout=120)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}

    joining = join(other, endpoint)
    run_stage(first, "train.py")
    assert joining.communicate(timeout=120) and joining.returncode == 0
    assert json.loads((first / "metrics/train.json").read_text())["resumed_from_step"] == 2
    assert_same_training(two_processes[0], first)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher's death signal is Linux's prctl")
def test_training_processes_end_when_the_launcher_is_killed(ran, tmp_path):
    """SIGKILL gives torchrun's agent (the stage's process) no chance to stop the processes it started: they must
    stop by themselves, not hold the GPUs after a killed `dvc repro`."""
    import os
    import signal
    import time

    project = project_in(ran, tmp_path / "p", num_processes=2, max_steps=10_000, checkpoint_every_steps=0)
    launcher = subprocess.Popen([sys.executable, "stages/train.py"], cwd=project, env=tool_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(workers := children_of(launcher.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers) >= 2, "torchrun started no training processes"
    time.sleep(3)   # into their imports and the process group
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in workers if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"training processes {alive} outlived their killed launcher"


def smallest_in_group(rank: int, port: int, values: list[float], out: Path) -> None:
    import torch.distributed as dist

    from qlora_pipeline.distributed import smallest_over_processes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(values))
    try:
        (out / f"{rank}.txt").write_text(str(smallest_over_processes(values[rank])))
    finally:
        dist.destroy_process_group()


def test_processes_plan_with_the_smallest_budget_among_them(tmp_path):
    """Each process reads its own GPU's free memory: they plan with the least of them, so that every process
    executes the same plan (under FSDP, as many passes as the others; training.plan_execution)."""
    import torch.multiprocessing as mp

    from qlora_pipeline.distributed import smallest_over_processes
    from servers import free_port

    assert smallest_over_processes(7.5) == 7.5   # one process, no group
    mp.spawn(smallest_in_group, args=(free_port(), [9.0, 6.5], tmp_path), nprocs=2)
    assert [(tmp_path / f"{rank}.txt").read_text() for rank in (0, 1)] == ["6.5", "6.5"]
