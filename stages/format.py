"""Stage format: each row becomes a prompt (the template param) and its completion (the answer).

    python stages/format.py   # data/subset -> data/formatted/{train,eval}.jsonl
"""

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths


def main() -> None:
    from qlora_pipeline import outputs
    from qlora_pipeline.config import load_params
    from qlora_pipeline.prompts import format_rows

    params = load_params()
    paths.require(paths.SUBSET)
    with outputs.atomic_dir(paths.FORMATTED) as out:
        for split in ("train", "eval"):
            rows = outputs.read_jsonl(paths.SUBSET / f"{split}.jsonl")
            outputs.write_jsonl(out / f"{split}.jsonl", format_rows(rows, params.format.template))
    print(f"format: template {params.format.template!r} -> {paths.FORMATTED}")


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.FORMATTED])
