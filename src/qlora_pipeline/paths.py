"""Where each stage reads and writes, relative to the project root (the same paths as in dvc.yaml)."""

from pathlib import Path

BASE_MODEL = Path("models/base")          # download (model): safetensors + tokenizer + source.json
RAW_DATA = Path("data/raw")               # download (data): rows.jsonl + source.json
SUBSET = Path("data/subset")              # subset: train.jsonl, eval.jsonl
FORMATTED = Path("data/formatted")        # format: train.jsonl, eval.jsonl (prompt / completion)
TOKENIZED = Path("data/tokenized")        # tokenize: train/, eval/ (Arrow datasets)
ADAPTER = Path("models/adapter")          # train: the LoRA adapter
TRAIN_LIVE = Path("dvclive/train")        # train: per-step train and held-out loss, as a dvclive log
CHECKPOINTS = Path("checkpoints/train")   # train: resumable checkpoints of an unfinished run (persistent)
MERGED = Path("models/merged")            # merge: float16 merged model, safetensors
METRICS = Path("metrics")
REPORTS = Path("reports")

# Which stage makes each input, for the error a stage gives when one is missing.
PRODUCERS = {
    BASE_MODEL: "download@model", RAW_DATA: "download@data", SUBSET: "subset", FORMATTED: "format",
    TOKENIZED: "tokenize", ADAPTER: "train", MERGED: "merge",
}


def require(*inputs: Path) -> None:
    """Stop with one line if an input is missing or a model in it has a damaged safetensors file."""
    from safetensors import SafetensorError, safe_open

    from qlora_pipeline.errors import PipelineError

    for path in inputs:
        if not path.exists():
            stage = PRODUCERS.get(path)
            made_by = f"; stage {stage} makes it: dvc repro {stage}" if stage else ""
            raise PipelineError(f"{path}: not found{made_by}")
        for weights in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
            try:
                # Reading the header checks that the file holds every byte the header promises. (numpy, not
                # pt: opening reads no tensor, and a stage that needs no torch, tokenize, is spared loading it.)
                with safe_open(weights, framework="numpy"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise PipelineError(f"{weights}: damaged safetensors file ({exc}); rerun the stage that made it") from None
