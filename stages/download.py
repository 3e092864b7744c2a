"""Stage download: resolve the model or the dataset source and store it in the project.

    python stages/download.py model   # -> models/base (safetensors, tokenizer, source.json)
    python stages/download.py data    # -> data/raw (rows.jsonl, source.json)

Run through DVC as `dvc repro download` (two stages, download@model and download@data, so that
changing the data source never re-converts the model).
"""

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths


def main(what: str) -> None:
    from qlora_pipeline import outputs, sources
    from qlora_pipeline.config import as_dict, load_params

    params = load_params()
    if what == "model":
        with outputs.atomic_dir(paths.BASE_MODEL) as out:
            record = sources.fetch_model(params.model, params.seed, out)
            outputs.write_json(out / "source.json", {**record, "params": as_dict(params.model)})
        print(f"model: {record['architecture']}, {record['parameters']:,} parameters -> {paths.BASE_MODEL}")
    else:
        rows, record = sources.fetch_dataset(params.data)
        with outputs.atomic_dir(paths.RAW_DATA) as out:
            outputs.write_jsonl(out / "rows.jsonl", rows)
            outputs.write_json(out / "source.json", {**record, "params": as_dict(params.data)})
        print(f"data: {len(rows):,} rows -> {paths.RAW_DATA}")


if __name__ == "__main__":
    # The argument picks one of the two stages (download@model, download@data), and with it the output.
    entry.run(main, __doc__, what={"model": [paths.BASE_MODEL], "data": [paths.RAW_DATA]})
