"""Stage merge: fold the adapter into the base (merge.base), save a plain safetensors model with tokenizer and model card.

    python stages/merge.py   # models/base + models/adapter -> models/merged, metrics/merge.json
"""

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths


def main() -> None:
    import json

    from qlora_pipeline import outputs
    from qlora_pipeline.config import as_dict, load_params
    from qlora_pipeline.merging import merge, model_card
    from qlora_pipeline.quantization import resolve_device

    params = load_params()
    paths.require(paths.BASE_MODEL, paths.ADAPTER, paths.FORMATTED)
    with outputs.atomic_dir(paths.MERGED) as out:
        metrics = merge(paths.BASE_MODEL, paths.ADAPTER, paths.FORMATTED / "eval.jsonl", out, params.merge, params.quantize,
                        resolve_device("auto"))
        base_record = json.loads((paths.BASE_MODEL / "source.json").read_text())
        training_params = json.loads((paths.ADAPTER / "training_params.json").read_text())
        outputs.write_text(out / "README.md", model_card(base_record, training_params, metrics))
        # What made this model, for the evaluate stage's report.
        outputs.write_json(out / "merge_params.json", as_dict(params.merge))
        # Last in the block: a failure before it leaves the old model and metrics both.
        outputs.write_json(paths.METRICS / "merge.json", metrics)
    print(f"merge: {paths.MERGED} ({metrics['base']} base, {metrics['dtype']}, on {metrics['device']}"
          f"{'' if metrics['full_precision_device'] == metrics['device'] else ', float32 copies on the CPU'}), max |logit diff| "
          f"vs trained {metrics['max_abs_logit_diff_vs_trained']}, vs unmerged {metrics['max_abs_logit_diff_vs_unmerged']}")


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.MERGED, paths.METRICS / "merge.json"])
