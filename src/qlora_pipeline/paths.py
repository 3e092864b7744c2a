"""Where each stage reads and writes, relative to the project root (the same paths as in dvc.yaml)."""

from pathlib import Path

PARAMS = Path("params.yaml")
BASE_MODEL = Path("models/base")          # download (model): safetensors + tokenizer + source.json
RAW_DATA = Path("data/raw")               # download (data): rows.jsonl + source.json
SUBSET = Path("data/subset")              # subset: train.jsonl, eval.jsonl
FORMATTED = Path("data/formatted")        # format: train.jsonl, eval.jsonl (prompt / completion)
TOKENIZED = Path("data/tokenized")        # tokenize: train/, eval/ (Arrow datasets)
ADAPTER = Path("models/adapter")          # train: the LoRA adapter
CHECKPOINTS = Path("checkpoints/train")   # train: resumable checkpoints of an unfinished run (persistent)
MERGED = Path("models/merged")            # merge: float16 merged model, safetensors
METRICS = Path("metrics")
REPORTS = Path("reports")
