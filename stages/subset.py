"""Stage subset: a seeded shuffle of the raw rows, cut into disjoint train and eval splits.

    python stages/subset.py   # data/raw/rows.jsonl -> data/subset/{train,eval}.jsonl
"""

import argparse

from qlora_pipeline.errors import run_stage


def main(params_path: str = "params.yaml") -> None:
    from qlora_pipeline import outputs, paths
    from qlora_pipeline.config import load_params
    from qlora_pipeline.splits import make_subset

    params = load_params(params_path)
    paths.require(paths.RAW_DATA)
    rows = outputs.read_jsonl(paths.RAW_DATA / "rows.jsonl")
    train, held_out = make_subset(rows, params.subset.train_size, params.subset.eval_size, params.seed)
    with outputs.atomic_dir(paths.SUBSET) as out:
        outputs.write_jsonl(out / "train.jsonl", train)
        outputs.write_jsonl(out / "eval.jsonl", held_out)
    print(f"subset: {len(train)} train, {len(held_out)} eval rows of {len(rows)} (seed {params.seed})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    run_stage(lambda: main(parser.parse_args().params))
