"""Stage subset: a seeded shuffle of the raw rows, cut into disjoint train and eval splits.

    python stages/subset.py   # data/raw/rows.jsonl -> data/subset/{train,eval}.jsonl
"""

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths


def main() -> None:
    from qlora_pipeline import outputs
    from qlora_pipeline.config import load_params
    from qlora_pipeline.splits import make_subset

    params = load_params()
    paths.require(paths.RAW_DATA)
    rows = outputs.read_jsonl(paths.RAW_DATA / "rows.jsonl")
    train, held_out = make_subset(rows, params.subset.train_size, params.subset.eval_size, params.seed)
    with outputs.atomic_dir(paths.SUBSET) as out:
        outputs.write_jsonl(out / "train.jsonl", train)
        outputs.write_jsonl(out / "eval.jsonl", held_out)
    print(f"subset: {len(train)} train, {len(held_out)} eval rows of {len(rows)} (seed {params.seed})")


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.SUBSET])
