"""Stage format: each row becomes a prompt (the template param) and its completion (the answer).

    python stages/format.py   # data/subset -> data/formatted/{train,eval}.jsonl
"""

import argparse

from qlora_pipeline.errors import run_stage


def main(params_path: str = "params.yaml") -> None:
    from qlora_pipeline import outputs, paths
    from qlora_pipeline.config import load_params
    from qlora_pipeline.prompts import format_rows

    params = load_params(params_path)
    paths.require(paths.SUBSET)
    with outputs.atomic_dir(paths.FORMATTED) as out:
        for split in ("train", "eval"):
            rows = outputs.read_jsonl(paths.SUBSET / f"{split}.jsonl")
            outputs.write_jsonl(out / f"{split}.jsonl", format_rows(rows, params.format.template))
    print(f"format: template {params.format.template!r} -> {paths.FORMATTED}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    run_stage(lambda: main(parser.parse_args().params))
