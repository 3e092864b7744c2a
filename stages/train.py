"""Stage train: QLoRA fine-tuning (4-bit base, LoRA adapter, trl's SFTTrainer).

    python stages/train.py   # models/base + data/tokenized -> models/adapter, metrics/train.json, metrics/train_log.csv, checkpoints/train
"""

import argparse

from qlora_pipeline.errors import run_stage


def main(params_path: str = "params.yaml") -> None:
    from qlora_pipeline import checkpoints, outputs, paths
    from qlora_pipeline.config import as_dict, load_params
    from qlora_pipeline.training import step_log_csv, train

    params = load_params(params_path)
    paths.require(paths.BASE_MODEL, paths.TOKENIZED)
    with outputs.atomic_dir(paths.ADAPTER) as out:
        metrics, step_rows = train(
            paths.BASE_MODEL, paths.TOKENIZED, out, params.quantize, params.lora, params.train, params.seed,
            checkpoint_dir=paths.CHECKPOINTS,
        )
        # The resolved config beside the checkpoint: what produced this adapter.
        resolved = {key: as_dict(getattr(params, key)) for key in ("quantize", "lora", "train")}
        outputs.write_json(out / "training_params.json", {"seed": params.seed, **resolved})
    outputs.write_text(paths.METRICS / "train_log.csv", step_log_csv(step_rows))
    outputs.write_json(paths.METRICS / "train.json", metrics)
    # Only now that every output is in place are the checkpoints of this run no longer needed.
    checkpoints.finish(paths.CHECKPOINTS)
    print(f"train: {metrics['steps']} steps, loss {metrics['train_loss']}, {metrics['runtime_s']} s, "
          f"{metrics['real_tokens_per_s']} tokens/s, peak {metrics['peak_memory_mb']} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    run_stage(lambda: main(parser.parse_args().params))
