"""Stage train: QLoRA fine-tuning (4-bit base, LoRA adapter, trl's SFTTrainer).

    python stages/train.py   # models/base + data/tokenized -> models/adapter, metrics/train.json, metrics/train_log.csv, dvclive/train, checkpoints/train

With train.num_processes > 1 the stage relaunches itself through torchrun, one process per GPU (gloo
on the CPU): `python -m torch.distributed.run --standalone --nproc_per_node N stages/train.py`.
Launching it that way by hand works too; only the first process writes outputs.
"""

import os
import subprocess
import sys

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths
from qlora_pipeline.errors import PipelineError


def launch(num_processes: int, params_path: str) -> None:
    """Run this stage in `num_processes` processes through torchrun; stop as they stop."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
               __file__, "--params", params_path]
    print(f"train: launching {num_processes} processes: {' '.join(command[1:])}", flush=True)
    code = subprocess.run(command, check=False).returncode
    if code:
        raise PipelineError(f"train: the {num_processes} training processes failed (exit status {code}); "
                            "their errors are above")


def main(params_path: str = "params.yaml") -> None:
    from qlora_pipeline import checkpoints, outputs, paths, reports
    from qlora_pipeline.config import as_dict, load_params
    from qlora_pipeline.quantization import resolve_device
    from qlora_pipeline.execution import rows_per_process, world
    from qlora_pipeline.training import train

    params = load_params(params_path)
    paths.require(paths.BASE_MODEL, paths.TOKENIZED)
    num_processes = params.train.num_processes
    if num_processes == 1 and "WORLD_SIZE" not in os.environ:
        # One process trains on one GPU, the first visible: with more visible, the Trainer would spread
        # each batch over them with nn.DataParallel. (Set before anything initializes CUDA.)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"
        # Batch shapes change from step to step: growable segments keep the caching allocator from holding a
        # block of every size it has seen (peak reserved 4.4 -> 3.1 GiB on the reference experiment, one H200).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        # Check what can be checked before starting the processes, so bad params give one line.
        rows_per_process(params.train, num_processes)
        if resolve_device(params.train.device) == "cuda":
            import torch

            if torch.cuda.device_count() < num_processes:
                raise PipelineError(f"params key 'train.num_processes': {num_processes} processes need "
                                    f"{num_processes} GPUs, this machine has {torch.cuda.device_count()}")
        launch(num_processes, params_path)
        return

    main_process = world()[1] == 0
    with outputs.atomic_dir(paths.ADAPTER) if main_process else outputs.discarded_dir() as out:
        metrics, step_rows, eval_rows = train(
            paths.BASE_MODEL, paths.TOKENIZED, out, params.quantize, params.lora, params.train, params.seed,
            checkpoint_dir=paths.CHECKPOINTS,
        )
        # The resolved config beside the checkpoint: what produced this adapter.
        resolved = {key: as_dict(getattr(params, key)) for key in ("quantize", "lora", "train")}
        outputs.write_json(out / "training_params.json", {"seed": params.seed, **resolved})
    if not main_process:
        return
    outputs.write_text(paths.METRICS / "train_log.csv", reports.step_log_csv(step_rows))
    with outputs.atomic_dir(paths.TRAIN_LIVE) as live_dir:
        reports.write_training_log(live_dir, step_rows, eval_rows)
    outputs.write_json(paths.METRICS / "train.json", metrics)
    # Only now that every output is in place are the checkpoints of this run no longer needed.
    checkpoints.finish(paths.CHECKPOINTS)
    print(f"train: {metrics['steps']} steps, loss {metrics['train_loss']}, {metrics['runtime_s']} s, "
          f"{metrics['real_tokens_per_s']} tokens/s, peak {metrics['peak_memory_mb']} MiB")


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.ADAPTER, paths.METRICS / "train_log.csv", paths.TRAIN_LIVE,
                              paths.METRICS / "train.json"], params_option=True)
