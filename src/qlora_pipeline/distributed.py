"""Training in several processes, on one machine or several: the launch through torchrun, the check that every
process trains the same run, and what the first machine shares with the others.

One machine: the train stage relaunches itself through torchrun (`--standalone`), train.num_processes processes.
Several (train.nnodes > 1): the stage on the first machine launches its train.num_processes processes with
torchrun's static rendezvous, hosting it at train.rdzv_endpoint; each other machine runs
`python stages/train.py --join HOST:PORT --node-rank K` in its own checkout (its own params.yaml, models/base and
data/tokenized), which launches its processes against the same endpoint. The static rendezvous rather than
torchrun's dynamic c10d one: it gives the first machine node rank 0, so global rank 0, the one process that
writes outputs, is always on the machine whose workspace gets them (the dynamic one ranks machines by host name
and process id).

Only the first machine writes into its workspace; the processes of the others keep what the Trainer writes in
temporary directories. A checkpoint holds every process's random-number state, the other machines' too (sent to
the first, `gather_to_first_machine`), and a run resumed on several machines gets the checkpoint's files from
the first (`share_resume_point`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from qlora_pipeline.config import TrainParams, split_endpoint
from qlora_pipeline.errors import PipelineError

# Set for the processes `launch` starts: they hand their one-line error to the launcher, which prints it once.
LAUNCHED = "QLORA_TRAIN_LAUNCHED"
# Marks an error file that report_to_launcher wrote (torchrun reads "message" and "timestamp" from it).
_REPORTED = "qlora_pipeline_error"
# The collectives' timeout once training runs: transformers' default (TrainingArguments.ddp_timeout).
COLLECTIVE_TIMEOUT_S = 1800


def machine() -> tuple[int, int]:
    """(this machine's node rank, machines) as torchrun sets them; (0, 1) outside torchrun."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return int(os.environ.get("GROUP_RANK", 0)), max(world // max(local, 1), 1)


def join_command(endpoint: str, node_rank: int) -> str:
    return f"python stages/train.py --join {endpoint} --node-rank {node_rank}"


def check_endpoint(endpoint: str, key: str, listen: bool) -> tuple[str, int]:
    """(host, port) of `endpoint`, refused in one line naming `key` when its host does not resolve or (`listen`:
    the first machine, which hosts the rendezvous) its port cannot be listened on here."""
    parsed = split_endpoint(endpoint)
    if parsed is None:
        raise PipelineError(f"{key}: {endpoint!r} is not HOST:PORT (a port from 1 to 65535)")
    host, port = parsed
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PipelineError(f"{key}: host {host!r} of {endpoint} does not resolve ({exc.strerror})") from None
    if listen:
        # The rendezvous store listens on every interface of the first machine, at this port.
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError as exc:
                raise PipelineError(f"{key}: this machine cannot listen on port {port} of {endpoint} ({exc.strerror})") from None
    return parsed


_cpp_logs_quieted = False


def quiet_cpp_logs() -> None:
    """For a joining machine's launcher, which waits for the first machine's rendezvous store: its C++ client logs
    every connection retry with a backtrace. Call before torch is first imported (torch reads the level when it
    loads); the training processes get the level as it was."""
    global _cpp_logs_quieted
    if "TORCH_CPP_LOG_LEVEL" not in os.environ:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
        _cpp_logs_quieted = True


def _quiet_launcher_logs() -> None:
    """torchrun's agent logs every failure as a report and a traceback, and the rendezvous store logs each retry
    with a C++ backtrace; the launcher reports failures in one line instead. LOGLEVEL set by the user (torch
    elastic's own variable) keeps them, for debugging a rendezvous."""
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(train: TrainParams, script: str, params_path: str, node_rank: int = 0, endpoint: str = "") -> None:
    """Run `script` in train.num_processes processes on this machine through torchrun, with the other machines
    at the rendezvous `endpoint` when train.nnodes > 1 (this machine: `node_rank`); return when they are done.
    A failure of the rendezvous or of a process becomes one PipelineError line."""
    args = [f"--nproc_per_node={train.num_processes}", "--max_restarts=0"]
    if train.nnodes == 1:
        args.append("--standalone")
    else:
        args += [f"--nnodes={train.nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=static",
                 f"--rdzv_endpoint={endpoint}", f"--rdzv_conf=timeout={train.rdzv_timeout_s}"]
    args += [script, "--params", params_path]
    processes = f"{train.num_processes} process{'es' if train.num_processes > 1 else ''}"
    print(f"train: launching {processes}: torchrun {' '.join(args)}", flush=True)
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    if _cpp_logs_quieted:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    _quiet_launcher_logs()
    os.environ[LAUNCHED] = str(os.getpid())   # the processes' launcher (exit_with_launcher)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as exc:
        raise PipelineError(_process_failure(exc)) from None
    except (DistError, RendezvousError) as exc:
        raise PipelineError(_rendezvous_failure(exc, train, node_rank, endpoint)) from None
    except SignalException as exc:   # torchrun has stopped the processes it started
        raise PipelineError(f"train: stopped by {exc.sigval.name}; rerun to continue from the last checkpoint") from None
    finally:
        del os.environ[LAUNCHED]


def _process_failure(exc) -> str:
    """The error line a failed training process handed over (`report_to_launcher`), or which process failed."""
    reported = sorted((rank, failure.message) for rank, failure in exc.failures.items()
                      if failure.error_file_data.get(_REPORTED))
    if reported:
        return reported[0][1]
    rank, failure = exc.get_first_failure()
    how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
    return f"train: training process {rank} failed ({how}); its error is above"


def _rendezvous_failure(exc: BaseException, train: TrainParams, node_rank: int, endpoint: str) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    joined = re.search(r"(\d+)/(\d+) clients joined", message)
    if node_rank == 0 and joined:
        return (f"train: {joined[1]} of the {joined[2]} machines (train.nnodes) joined the rendezvous at {endpoint} "
                f"within train.rdzv_timeout_s ({train.rdzv_timeout_s} s); run the join command printed above on each "
                "other machine")
    if node_rank > 0 and ("connect" in message or "timed out" in message.lower()):
        return (f"--join {endpoint}: no first machine answered there within train.rdzv_timeout_s "
                f"({train.rdzv_timeout_s} s); start the stage on the first machine (its train.rdzv_endpoint: {endpoint})")
    return f"train: the rendezvous at {endpoint} failed: {message}"


def report_to_launcher(message: str) -> bool:
    """In a process `launch` started: hand the error line to the launcher through torchrun's error file (the
    launcher prints it once for all processes) and return True. False elsewhere: a process that torchrun run
    by hand started prints its error itself."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (os.environ.get(LAUNCHED) and error_file):
        return False
    Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time()), _REPORTED: True}))
    return True


def start_process_group(device: str) -> None:
    """Join the run's process group now, before any model is loaded, so that a run the processes do not agree on
    stops at once; the Trainer (accelerate) then uses this group. On GPUs, gloo beside NCCL: the checks and the
    checkpoint files go through the CPU."""
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo" if device == "cpu" else "cuda:nccl,cpu:gloo",
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def exit_with_launcher() -> None:
    """In a process `launch` started, first thing: be sent SIGTERM when the launcher (the train stage's own process,
    torchrun's agent) dies, even by SIGKILL, which gives it no chance to stop its processes; otherwise they would
    go on holding the GPUs after `dvc repro` was killed. Linux only (prctl); elsewhere nothing changes."""
    import ctypes
    import signal
    import sys

    launcher = os.environ.get(LAUNCHED, "")
    if not sys.platform.startswith("linux") or not launcher.isdigit():
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1: PR_SET_PDEATHSIG, for the parent's death
    if os.getppid() != int(launcher):   # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def refuse_differences(params: dict[str, Any], inputs: dict[str, Path]) -> None:
    """Stop every process with the same one line when the machines would not train the same run: `params`
    (sections of the resolved params) or the contents of `inputs` differ from the first process's. The inputs
    are hashed once a machine (by its first process), and only when there are several machines."""
    import torch.distributed as dist

    from qlora_pipeline.checkpoints import digest_tree

    node_rank, nodes = machine()
    first_on_machine = int(os.environ.get("LOCAL_RANK", 0)) == 0
    digests = {name: digest_tree(path) for name, path in inputs.items()} if nodes > 1 and first_on_machine else {}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (node_rank, _flatten(params), digests))
    _, first_params, first_digests = everyone[0]
    for other_node, other_params, other_digests in everyone[1:]:
        where = f"machine {other_node + 1} (node rank {other_node})"
        for key in sorted(first_params.keys() | other_params.keys()):
            if first_params.get(key) != other_params.get(key):
                raise PipelineError(
                    f"params key '{key}' differs between the machines: {first_params.get(key)!r} on the first, "
                    f"{other_params.get(key)!r} on {where}; give every machine the same params"
                )
        for name, digest in other_digests.items():
            if first_digests.get(name) != digest:
                raise PipelineError(
                    f"{inputs[name]} differs between the machines (sha256 {first_digests.get(name, '')[:12]} on the "
                    f"first, {digest[:12]} on {where}); give every machine the first one's (dvc pull, or a copy)"
                )


def _everyones(value: Any) -> list:
    """Every process's `value`, on every process (outside a process group: this one's alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def agree_on_any(value: bool) -> bool:
    """True on every process when `value` is true on any."""
    return any(_everyones(bool(value)))


def smallest_over_processes(value: float) -> float:
    """The smallest of the processes' `value`s, on every process."""
    return min(_everyones(float(value)))


def _read_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def share_resume_point(resume_from: Path | None, scratch: Path) -> Path | None:
    """The checkpoint every process resumes from: the first machine's (`resume_from` there); each process of the
    other machines, which cannot read the first machine's workspace, gets its files in its own `scratch`
    directory. A collective call of every process; outside a process group, `resume_from`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return resume_from
    node_rank, nodes = machine()
    sent = [None]
    if dist.get_rank() == 0 and resume_from is not None:
        sent = [(resume_from.name, _read_files(resume_from) if nodes > 1 else {})]
    dist.broadcast_object_list(sent, src=0)
    if node_rank == 0 or sent[0] is None:
        return resume_from if node_rank == 0 else None
    name, files = sent[0]
    _write_files(scratch / name, files)
    return scratch / name


def gather_to_first_machine(checkpoint: Path) -> None:
    """Each process of the other machines sends what it wrote into its own copy of `checkpoint` (outside any
    workspace: its random-number state) to global rank 0, which writes it into its `checkpoint`, the first
    machine's: that checkpoint then holds what every process needs to resume. A collective call of every
    process; nothing to do on one machine."""
    import torch.distributed as dist

    node_rank, nodes = machine()
    if nodes == 1 or not dist.is_initialized():
        return
    sends = node_rank > 0 and checkpoint.is_dir()
    everyone: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_read_files(checkpoint) if sends else {}, everyone, dst=0)
    for files in everyone or []:
        _write_files(checkpoint, files)
