"""Typed, validated params.

`params.yaml` is the one source of defaults; this module only describes the shape of each section
(names, types, allowed values, ranges) so that a typo or a bad value stops a stage with a one-line
error naming the key, before any model is loaded.

Why dataclasses with a table of ranges and not pydantic (weighed for issue 14): pydantic would replace the
~75 lines of _coerce / _build / _type_name with field annotations, but not say the same thing. Its errors are
its own sentences, several per union member (`int | Literal["auto"]` reports both), so a translation layer
would be needed to keep one line naming the key in this project's words; YAML's `2e-4`, a string, needs a
validator either way; it is not a dependency of the project (only a transitive one of dvc's); and importing it
and building eleven models costs every stage ~0.3 s, where this module takes 0.05 s and the subset and format
stages run in 0.1 s in all. The range table below already says each constraint once, next to its message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_pipeline.errors import PipelineError


@dataclass(frozen=True)
class ModelParams:
    source: Literal["hub", "local", "embedded", "random"]
    name: str
    revision: str
    trust_remote_code: bool
    allow_pickle: bool


@dataclass(frozen=True)
class DataParams:
    source: Literal["hub", "local", "embedded"]
    name: str
    revision: str
    columns: dict[str, str]
    duplicates: Literal["error", "drop"]


@dataclass(frozen=True)
class SubsetParams:
    train_size: int
    eval_size: int


@dataclass(frozen=True)
class FormatParams:
    template: Literal["alpaca", "alpaca-official"]


@dataclass(frozen=True)
class TokenizeParams:
    max_length: int
    train_on: Literal["completion", "all"]


@dataclass(frozen=True)
class QuantizeParams:
    load_in_4bit: bool
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"]


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | Literal["auto"]


@dataclass(frozen=True)
class TrainParams:
    epochs: float
    max_steps: int
    batch_size: int
    grad_accum: int
    max_memory: float | Literal["auto"]
    micro_batch_size: int | Literal["auto"]
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    optim: str
    weight_decay: float
    max_grad_norm: float
    gradient_checkpointing: bool | Literal["auto"]
    packing: bool | Literal["auto"]
    sdpa_cudnn: bool
    fused_activation: bool
    fused_layers: bool | Literal["auto"]
    pad_to_multiple_of: int | Literal["auto"]
    dequantized_cache_mb: float | Literal["auto"]
    upcast_non_quantized: bool
    token_metrics: bool
    cuda_graphs: bool | Literal["auto"]
    device: Literal["auto", "cpu", "cuda"]
    log_every_steps: int
    checkpoint_every_steps: int
    eval_every_steps: int
    num_processes: int
    nnodes: int
    rdzv_endpoint: str
    rdzv_timeout_s: int
    sharding: Literal["none", "fsdp", "auto"]


@dataclass(frozen=True)
class MergeParams:
    base: Literal["dequantized", "original"]
    dtype: Literal["float16", "bfloat16", "float32"]
    compare_prompts: int


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    max_new_tokens: int
    generate_rows: int


@dataclass(frozen=True)
class Params:
    seed: int
    model: ModelParams
    data: DataParams
    subset: SubsetParams
    format: FormatParams
    tokenize: TokenizeParams
    quantize: QuantizeParams
    lora: LoraParams
    train: TrainParams
    merge: MergeParams
    evaluate: EvaluateParams


# Range checks that a type cannot express: key -> (predicate, what it must be).
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy takes 32-bit seeds)"),
    "model.name": (bool, "non-empty"),
    # Every stage after the download loads the model with transformers' own code, and hub downloads take
    # no *.py: a model that needs its own code cannot run here, so the key only says so.
    "model.trust_remote_code": (lambda v: v is False, "false (models that need their own Python code are not "
                                "supported: use one whose architecture transformers has)"),
    "data.name": (bool, "non-empty"),
    "subset.train_size": (lambda v: v > 0, "> 0"),
    "subset.eval_size": (lambda v: v > 0, "> 0"),
    "tokenize.max_length": (lambda v: v >= 8, ">= 8"),
    "lora.r": (lambda v: v > 0, "> 0"),
    "lora.alpha": (lambda v: v > 0, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora.target_modules": (bool, "'auto' or a non-empty list of module names"),
    "train.epochs": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v == -1 or v > 0, "-1 (use epochs) or > 0"),
    "train.batch_size": (lambda v: v > 0, "> 0"),
    "train.grad_accum": (lambda v: v > 0, "> 0"),
    "train.micro_batch_size": (lambda v: v == "auto" or v > 0, "'auto' or > 0"),
    "train.learning_rate": (lambda v: v > 0, "> 0"),
    "train.pad_to_multiple_of": (lambda v: v == "auto" or v >= 1, "'auto' or >= 1"),
    "train.dequantized_cache_mb": (lambda v: v == "auto" or v >= 0, "'auto' or >= 0"),
    "train.max_memory": (lambda v: v == "auto" or v > 0, "'auto' or > 0 (GiB)"),
    "train.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.max_grad_norm": (lambda v: v > 0, "> 0"),
    "train.log_every_steps": (lambda v: v > 0, "> 0"),
    "train.checkpoint_every_steps": (lambda v: v >= 0, ">= 0 (0: no checkpoints)"),
    "train.num_processes": (lambda v: v >= 1, ">= 1"),
    "train.nnodes": (lambda v: v >= 1, ">= 1"),
    "train.rdzv_endpoint": (lambda v: v == "" or split_endpoint(v) is not None,
                            "'' or HOST:PORT (the first machine's address and a port from 1 to 65535)"),
    "train.rdzv_timeout_s": (lambda v: v > 0, "> 0 (seconds)"),
    "train.eval_every_steps": (lambda v: v >= 0, ">= 0 (0: no evaluation during training)"),
    "merge.compare_prompts": (lambda v: v > 0, "> 0"),
    "evaluate.batch_size": (lambda v: v > 0, "> 0"),
    "evaluate.max_new_tokens": (lambda v: v > 0, "> 0"),
    "evaluate.generate_rows": (lambda v: v >= 0, ">= 0"),
}


def split_endpoint(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a rendezvous endpoint `HOST:PORT` (an IPv6 host in brackets), or None when it is not one."""
    host, colon, port = endpoint.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or any(c.isspace() or c in "/[]" for c in host) or not port.isdigit():
        return None
    return (host, int(port)) if 1 <= int(port) <= 65535 else None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of strings"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise PipelineError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except PipelineError:
                continue
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML reads 2e-4 as a string (YAML 1.1 wants a dot); accept it as the number it clearly is.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise PipelineError(f"params key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise PipelineError(f"params key '{prefix or '<root>'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise PipelineError(f"params key '{where}' is unknown (known: {', '.join(sorted(known))})")
    values = {}
    for name in known:
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise PipelineError(f"params key '{key}' is missing")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], key)
            continue
        value = _coerce(raw[name], tp, key)
        check = _RANGES.get(key)
        if check and not check[0](value):
            raise PipelineError(f"params key '{key}': must be {check[1]}, got {raw[name]!r}")
        values[name] = value
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) and return it typed."""
    params = _build(Params, raw, "")
    missing = {"instruction", "output"} - set(params.data.columns)
    extra = set(params.data.columns) - {"instruction", "input", "output", "task"}
    if missing or extra:
        raise PipelineError(
            "params key 'data.columns': maps the fields instruction, output (required), input and task "
            f"(optional) to column names; missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every stage validates the whole file, so a typo anywhere stops early."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_params(raw)


def deep_update(base: dict, overlay: dict) -> dict:
    """Return `base` with `overlay` merged in, section by section (used by profiles)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "columns":
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def as_dict(params: Any) -> dict:
    """The resolved params as plain data, for saving beside an artifact."""
    return dataclasses.asdict(params)
