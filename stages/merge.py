"""Stage merge: fold the adapter into the base, save a plain safetensors model with tokenizer and model card.

    python stages/merge.py   # models/base + models/adapter -> models/merged, metrics/merge.json
"""

import argparse

from qlora_pipeline.errors import run_stage


def main(params_path: str = "params.yaml") -> None:
    import json

    from qlora_pipeline import outputs, paths
    from qlora_pipeline.config import load_params
    from qlora_pipeline.merging import merge, model_card

    params = load_params(params_path)
    paths.require(paths.BASE_MODEL, paths.ADAPTER, paths.FORMATTED)
    with outputs.atomic_dir(paths.MERGED) as out:
        metrics = merge(paths.BASE_MODEL, paths.ADAPTER, paths.FORMATTED / "eval.jsonl", out, params.merge, params.quantize)
        base_record = json.loads((paths.BASE_MODEL / "source.json").read_text())
        training_params = json.loads((paths.ADAPTER / "training_params.json").read_text())
        outputs.write_text(out / "README.md", model_card(base_record, training_params, metrics))
    outputs.write_json(paths.METRICS / "merge.json", metrics)
    print(f"merge: {paths.MERGED} ({metrics['dtype']}), max |logit diff| vs unmerged {metrics['max_abs_logit_diff_vs_unmerged']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    run_stage(lambda: main(parser.parse_args().params))
