"""Stage tokenize: prompt + answer + EOS as token ids, labels masking the prompt; no padding stored.

    python stages/tokenize_data.py   # data/formatted + models/base tokenizer -> data/tokenized/{train,eval}, metrics/tokenize.json
"""

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths


def main() -> None:
    import datasets

    from qlora_pipeline import outputs
    from qlora_pipeline.config import load_params
    from qlora_pipeline.tokenization import load_encoder, refuse_over_context, tokenize_split

    params = load_params()
    paths.require(paths.BASE_MODEL, paths.FORMATTED)
    refuse_over_context(paths.BASE_MODEL, "tokenize.max_length", params.tokenize.max_length, "rows of up to")
    encoder = load_encoder(paths.BASE_MODEL)
    stats = {}
    with outputs.atomic_dir(paths.TOKENIZED) as out:
        for split in ("train", "eval"):
            rows = outputs.read_jsonl(paths.FORMATTED / f"{split}.jsonl")
            items, stats[split] = tokenize_split(encoder, rows, params.tokenize.max_length, params.tokenize.train_on,
                                                 str(paths.FORMATTED / f"{split}.jsonl"))
            columns = {key: [item.get(key, "") for item in items] for key in ("input_ids", "labels", "prompt_length", "task")}
            datasets.Dataset.from_dict(columns).save_to_disk(str(out / split))
        # Last in the block: a failure before it leaves the old data and metrics both.
        outputs.write_json(paths.METRICS / "tokenize.json", stats)
    print(f"tokenize: {stats['train']['rows']} train rows, mean {stats['train']['length_mean']} tokens, "
          f"{stats['train']['rows_truncated']} truncated at {params.tokenize.max_length}")


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.TOKENIZED, paths.METRICS / "tokenize.json"])
