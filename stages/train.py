"""Stage train: QLoRA fine-tuning (4-bit base, LoRA adapter, trl's SFTTrainer).

    python stages/train.py   # models/base + data/tokenized -> models/adapter, metrics/train.json, metrics/train_log.csv, dvclive/train, checkpoints/train

With train.num_processes > 1 the stage relaunches itself through torchrun, that many processes (one per GPU;
gloo on the CPU). With train.nnodes > 1 it does so on several machines: here, hosting the rendezvous at
train.rdzv_endpoint, and on each other machine through the command it prints,
`python stages/train.py --join HOST:PORT --node-rank K` (README: Several machines). Launching the stage with
torchrun by hand works too; only global rank 0 writes outputs.
"""

import contextlib
import os
import sys

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import distributed, paths
from qlora_pipeline.errors import PipelineError

if "--join" in sys.argv:
    distributed.quiet_cpp_logs()   # before anything loads torch


def launch(params, params_path: str, node_rank: int = 0, endpoint: str = "") -> None:
    """Check what can be checked before starting the processes, so that bad params give one line; then run
    this machine's processes through torchrun and stop as they stop."""
    from qlora_pipeline.execution import refuse_sharding, rows_per_process
    from qlora_pipeline.quantization import resolve_device

    train = params.train
    rows_per_process(train, train.num_processes * train.nnodes)
    device = resolve_device(train.device)
    refuse_sharding(train, device, train.num_processes * train.nnodes)
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < train.num_processes:
            raise PipelineError(f"params key 'train.num_processes': {train.num_processes} processes need "
                                f"{train.num_processes} GPUs, this machine has {torch.cuda.device_count()}")
    distributed.launch(train, __file__, params_path, node_rank, endpoint)


def join(params, params_path: str, endpoint: str, node_rank: int | None) -> None:
    """Another machine's part of a run on several: its processes, against the first machine's rendezvous."""
    nnodes = params.train.nnodes
    if nnodes == 1:
        raise PipelineError(f"--join {endpoint}: params key 'train.nnodes' is 1 on this machine; give it the first "
                            "machine's params")
    if node_rank is None and nnodes > 2:
        raise PipelineError(f"--node-rank: needed with train.nnodes {nnodes}, a different one from 1 to {nnodes - 1} "
                            "on each other machine")
    node_rank = 1 if node_rank is None else node_rank
    if not 1 <= node_rank < nnodes:
        raise PipelineError(f"--node-rank {node_rank}: must be from 1 to {nnodes - 1} with train.nnodes {nnodes} "
                            "(0 is the first machine's)")
    distributed.check_endpoint(endpoint, f"--join {endpoint}", listen=False)
    print(f"train: joining the run at {endpoint} as machine {node_rank + 1} of {nnodes}; the first machine writes "
          "the outputs, this one none", flush=True)
    launch(params, params_path, node_rank, endpoint)


def main(params_path: str = "params.yaml", join_endpoint: str | None = None, node_rank: int | None = None) -> None:
    from qlora_pipeline.config import load_params

    params = load_params(params_path)
    paths.require(paths.BASE_MODEL, paths.TOKENIZED)
    train = params.train
    if join_endpoint is not None:
        join(params, params_path, join_endpoint, node_rank)
        return
    if "WORLD_SIZE" in os.environ:   # one of the processes torchrun started
        distributed.exit_with_launcher()
        try:
            train_here(params)
        except PipelineError as exc:
            if distributed.report_to_launcher(str(exc)):
                sys.exit(2)
            raise
        return
    if train.nnodes > 1:
        endpoint = train.rdzv_endpoint
        if not endpoint:
            raise PipelineError("params key 'train.rdzv_endpoint' is needed with train.nnodes > 1: HOST:PORT of this "
                                "machine, reachable from the others")
        distributed.check_endpoint(endpoint, "params key 'train.rdzv_endpoint'", listen=True)
        others = "the other machine" if train.nnodes == 2 else f"the other {train.nnodes - 1} machines"
        print(f"train: waiting up to {train.rdzv_timeout_s} s for {others} to join at {endpoint}; on each, in its "
              "checkout (the same params, models/base and data/tokenized), run:", flush=True)
        for node_rank in range(1, train.nnodes):
            print(f"    {distributed.join_command(endpoint, node_rank)}", flush=True)
        launch(params, params_path, 0, endpoint)
        return
    if train.num_processes > 1:
        launch(params, params_path)
        return
    # One process trains on one GPU, the first visible: with more visible, the Trainer would spread
    # each batch over them with nn.DataParallel. (Set before anything initializes CUDA.)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"
    # Batch shapes change from step to step: growable segments keep the caching allocator from holding a
    # block of every size it has seen (peak reserved 4.4 -> 3.1 GiB on the reference experiment, one H200).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    train_here(params)


def train_here(params) -> None:
    """Train in this process; write the outputs if it is the first process of the first machine."""
    from qlora_pipeline import checkpoints, outputs, reports
    from qlora_pipeline.config import as_dict
    from qlora_pipeline.execution import world
    from qlora_pipeline.training import train

    main_process = world()[1] == 0
    # The other machines keep what the Trainer writes of checkpoints outside their workspace (distributed.py).
    first_machine = distributed.machine()[0] == 0
    with (outputs.atomic_dir(paths.ADAPTER) if main_process else outputs.discarded_dir()) as out, \
            (contextlib.nullcontext(paths.CHECKPOINTS) if first_machine else outputs.discarded_dir()) as checkpoint_dir:
        metrics, step_rows, eval_rows = train(
            paths.BASE_MODEL, paths.TOKENIZED, out, params.quantize, params.lora, params.train, params.seed,
            checkpoint_dir=checkpoint_dir,
        )
        # The resolved config beside the checkpoint: what produced this adapter.
        resolved = {key: as_dict(getattr(params, key)) for key in ("quantize", "lora", "train")}
        outputs.write_json(out / "training_params.json", {"seed": params.seed, **resolved})
        if main_process:
            # Every output is made before any replaces its old self, so a failure leaves the whole old set: the
            # step log, metrics and dvclive log are renamed into place here, the adapter as the block closes.
            with outputs.atomic_dir(paths.TRAIN_LIVE) as live_dir:
                reports.write_training_log(live_dir, step_rows, eval_rows)
                outputs.write_texts({paths.METRICS / "train_log.csv": reports.step_log_csv(step_rows),
                                     paths.METRICS / "train.json": outputs.json_text(metrics)})
    if not main_process:
        return
    # Only now that every output is in place are the checkpoints of this run no longer needed.
    checkpoints.finish(paths.CHECKPOINTS)
    print(f"train: {metrics['steps']} steps, loss {metrics['train_loss']}, {metrics['runtime_s']} s, "
          f"{metrics['real_tokens_per_s']} tokens/s, peak {metrics['peak_memory_mb']} MiB")


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.ADAPTER, paths.METRICS / "train_log.csv", paths.TRAIN_LIVE,
                              paths.METRICS / "train.json"], params_option=True, options={
        "--join": dict(dest="join_endpoint", metavar="HOST:PORT",
                       help="train on this machine together with the first one, whose rendezvous is at HOST:PORT"),
        "--node-rank": dict(type=int, metavar="K", help="this machine's rank with --join: 1 to train.nnodes - 1"),
    })
