"""The tokenize stage: prompt + answer + EOS, no padding stored, labels masking what is not trained on.

The prompt and the answer are tokenized separately and concatenated, so the boundary between them is
exact. EOS is appended to every answer and is a real label: the model learns where an answer ends,
whatever the pad token is (padding is added per batch later, and masked out of the loss by position).

Text is tokenized with the `tokenizers` library alone (an Encoder over models/base/tokenizer.json), not
through transformers, whose import loads torch (3 of the stage's 4 s on a CPU). The ids are transformers':
the download stage saves every tokenizer with transformers' save_pretrained, so tokenizer.json is the
state transformers tokenizes with, and transformers' `tokenizer(text, add_special_tokens=False)` is that
tokenizer's encode with no truncation or padding (tests/test_tokenization.py compares both, text by text,
on the embedded, byte-level, trained BPE and class-specific GPT-2 / Llama tokenizers).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from qlora_pipeline.errors import PipelineError

IGNORE_INDEX = -100  # label value that the loss skips

# A text whose first tokens cannot be had from a cut of it (below) is tokenized whole up to this many
# characters (about 2 s and 200 MB) and refused beyond (a 20 MB row took 51 s and 4.1 GB).
MAX_UNCUT_CHARS = 1_000_000
# tokenize_split tokenizes the texts of this many rows in one call (encode_short), those of at most
# _ENCODE_CHARS characters: a call's encodings (ids, offsets, token strings) stay in the tens of MB.
_ENCODE_ROWS = 256
_ENCODE_CHARS = 32_768


class Encoder(NamedTuple):
    """A model's tokenizer as this module uses it: `core`, a `tokenizers.Tokenizer` that neither truncates nor
    pads, and the id of the EOS token appended to every answer."""

    core: Any
    eos_id: int

    @classmethod
    def of(cls, tokenizer) -> Encoder:
        """The Encoder of a transformers fast tokenizer (one built in code, or loaded already)."""
        return cls(_plain(tokenizer.backend_tokenizer.to_str(), tokenizer.split_special_tokens), tokenizer.eos_token_id)


def _plain(tokenizer_json: str, split_special_tokens: bool):
    """A `tokenizers.Tokenizer` from its JSON, set as transformers' tokenizer(text) runs it: a tokenizer.json may
    carry truncation or padding settings, which transformers turns off for a call that asks for neither."""
    from tokenizers import Tokenizer

    core = Tokenizer.from_str(tokenizer_json)
    core.no_truncation()
    core.no_padding()
    core.encode_special_tokens = split_special_tokens
    return core


def load_encoder(model_dir: str | Path) -> Encoder:
    """The Encoder of a model directory the download stage wrote (tokenizer.json and tokenizer_config.json)."""
    model_dir = Path(model_dir)
    files = [model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"]
    for file in files:
        if not file.is_file():
            raise PipelineError(f"{file}: not found (the download stage saves the model's tokenizer there); "
                                "rerun dvc repro download@model")
    config = json.loads(files[1].read_text())
    core = _plain(files[0].read_text(), bool(config.get("split_special_tokens", False)))
    eos = config.get("eos_token")
    eos_id = core.token_to_id(eos["content"] if isinstance(eos, dict) else eos) if eos else None
    if eos_id is None:
        raise PipelineError(f"{files[1]}: no eos_token in the vocabulary (every answer ends with EOS)")
    return Encoder(core, eos_id)


def longest_token_chars(core) -> int:
    """At least the characters one token covers: its longest vocabulary entry (byte-level vocabularies
    spell each byte as one character, and a character is at least one byte)."""
    return max(map(len, core.get_vocab(with_added_tokens=True)))


def _cut_before_special_tokens(text: str, at: int, specials: list[str]) -> int:
    """`at`, moved back before every special (added) token of `text` that straddles it."""
    moved = True
    while moved:
        moved = False
        for token in specials:
            start = next((i for i in range(max(0, at - len(token) + 1), at) if text.startswith(token, i)), None)
            if start is not None:
                at, moved = start, True
    return at


def leading_ids(core, text: str, count: int, token_chars: int, where: str,
                encoded: Mapping[str, list[int]] | None = None) -> tuple[list[int], bool]:
    """The first `count` token ids of `text` (fewer if it has fewer), and whether it has more; time and memory
    bounded by `count`, not by the length of `text`.

    `count` tokens cover at most count * token_chars characters, so a longer text is tokenized cut to that
    length, moved back before any special token the cut would split. Such a cut changes no token before
    the last word (pre-token) it leaves: a fast tokenizer takes out the special tokens, splits the rest into
    words whose extent depends on the characters up to the one after them (the regex, whitespace and
    metaspace pre-tokenizers of GPT-2, Llama and the like) and tokenizes each word on its own. When the
    tokens before that last word are fewer than `count` (one enormous word, or a tokenizer that does not
    split text), the text is tokenized whole, up to MAX_UNCUT_CHARS characters, and refused beyond.
    `encoded`: short texts tokenized already (encode_short), whose first tokens are the cut's by the same rule.
    """
    if encoded is not None and text in encoded:
        ids = encoded[text]
        return ids[:count], len(ids) > count
    head_chars = count * token_chars
    if len(text) > head_chars:
        specials = [token.content for token in core.get_added_tokens_decoder().values()]
        encoding = core.encode(text[: _cut_before_special_tokens(text, head_chars, specials)], add_special_tokens=False)
        words = encoding.word_ids
        settled = encoding.ids[: words.index(words[-1])] if words else []
        if len(settled) >= count:
            return settled[:count], True
    if len(text) > MAX_UNCUT_CHARS:
        raise PipelineError(
            f"{where}: {len(text):,} characters with no word break in the first {head_chars:,} to cut them at "
            f"(a row is tokenized whole up to {MAX_UNCUT_CHARS:,}); shorten or drop the row"
        )
    ids = core.encode(text, add_special_tokens=False).ids
    return ids[:count], len(ids) > count


def encode_short(core, texts: list[str], max_chars: int, max_tokens: int) -> dict[str, list[int]]:
    """The first max_tokens + 1 token ids of each of `texts` of at most `max_chars` characters, tokenized whole in
    one call that the tokenizers library spreads over the cores (one text at a time, the tokenize stage's 985 rows
    of the Alpaca sample took 0.7 s of a GPU host's 2.3 s, bench/NOTES.md). leading_ids(..., count <= max_tokens)
    of such a text is the first `count` of them, and whether there are more."""
    short = [text for text in dict.fromkeys(texts) if len(text) <= max_chars]
    encodings = core.encode_batch(short, add_special_tokens=False)
    return {text: encoding.ids[: max_tokens + 1] for text, encoding in zip(short, encodings)}


def tokenize_row(encoder: Encoder, prompt: str, completion: str, max_length: int, train_on: str,
                 token_chars: int | None = None, where: str = "row",
                 encoded: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
    """One row as input_ids / labels, truncated to `max_length` tokens (the answer is cut first). `encoded`:
    texts tokenized already (encode_short)."""
    token_chars = token_chars or longest_token_chars(encoder.core)
    prompt_ids, prompt_cut = leading_ids(encoder.core, prompt, max_length, token_chars, f"{where} (prompt)", encoded)
    room = max_length - len(prompt_ids)
    if room:
        answer_ids, answer_cut = leading_ids(encoder.core, completion, room, token_chars, f"{where} (completion)",
                                             encoded)
    else:  # the prompt fills max_length
        answer_ids, answer_cut = [], True
    if not answer_cut:
        answer_ids.append(encoder.eos_id)
    input_ids = (prompt_ids + answer_ids)[:max_length]
    if train_on == "completion":
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    else:
        labels = list(input_ids)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_length": len(prompt_ids),
        "truncated": prompt_cut or answer_cut or len(prompt_ids) + len(answer_ids) > max_length,
    }


def read_split(split_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a tokenized split as the tokenize stage saved it (datasets' save_to_disk: the Arrow stream files
    state.json lists), read with pyarrow alone: the evaluate stage would otherwise import datasets for this, ~0.8 s
    of a GPU host's start-up (bench/NOTES.md). The training stage reads the splits with datasets, which trl uses."""
    import pyarrow as pa

    split_dir = Path(split_dir)
    try:
        files = [split_dir / file["filename"] for file in json.loads((split_dir / "state.json").read_text())["_data_files"]]
        tables = [pa.ipc.open_stream(pa.memory_map(str(file))).read_all() for file in files]
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise PipelineError(f"{split_dir}: not a tokenized split the tokenize stage wrote ({type(exc).__name__}: "
                            f"{exc}); rerun dvc repro tokenize") from None
    return pa.concat_tables(tables).to_pylist()


def model_context(model_dir: str | Path) -> tuple[int, str] | None:
    """The positions the model has (its context) and the config.json key that says so, when one does."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key], key
    return None


def refuse_over_context(model_dir: str | Path, key: str, tokens: int, what: str) -> None:
    """Stop naming the params key when `tokens` positions (`what`) exceed the model's context; past it a model
    with learned positions fails with a bare IndexError, and one with rotary positions computes nonsense."""
    context = model_context(model_dir)
    if context and tokens > context[0]:
        raise PipelineError(f"params key '{key}': {what} {tokens} tokens, more than the model's context of "
                            f"{context[0]} positions ({context[1]} in {Path(model_dir) / 'config.json'})")


def check_generation_context(model_dir: str | Path, prompts: list[str], max_new_tokens: int, where: str) -> None:
    """Refuse generating `max_new_tokens` after the longest of `prompts` (rows of the file `where`) past the
    model's context, naming evaluate.max_new_tokens and that row."""
    context = model_context(model_dir)
    if not context:
        return
    refuse_over_context(model_dir, "evaluate.max_new_tokens", max_new_tokens, "generating")
    core = load_encoder(model_dir).core
    token_chars = longest_token_chars(core)
    for index, prompt in enumerate(prompts):
        row = f"{where} row {index + 1}"
        ids, more = leading_ids(core, prompt, context[0], token_chars, f"{row} (prompt)")
        refuse_over_context(model_dir, "evaluate.max_new_tokens", len(ids) + max_new_tokens,
                            f"generating after the prompt of {row} ({'over ' if more else ''}{len(ids)} tokens) takes")


def tokenize_split(encoder: Encoder, rows: list[dict], max_length: int, train_on: str,
                   where: str = "rows") -> tuple[list[dict], dict[str, Any]]:
    """Tokenize a split (`where`: its file, for errors); rows left with no trained token are dropped.
    Returns the rows and their statistics."""
    kept, dropped = [], 0
    token_chars = longest_token_chars(encoder.core)
    for index, row in enumerate(rows):
        if index % _ENCODE_ROWS == 0:   # the next rows' texts at once; no more than that many held as encodings
            chunk = rows[index : index + _ENCODE_ROWS]
            encoded = encode_short(encoder.core, [r[key] for r in chunk for key in ("prompt", "completion")],
                                   min(max_length * token_chars, _ENCODE_CHARS), max_length)
        item = tokenize_row(encoder, row["prompt"], row["completion"], max_length, train_on, token_chars,
                            f"{where} row {index + 1}", encoded)
        if all(label == IGNORE_INDEX for label in item["labels"]):
            dropped += 1
            continue
        if "task" in row:
            item["task"] = row["task"]
        kept.append(item)
    if not kept:
        raise PipelineError(
            f"params key 'tokenize.max_length': all {dropped} prompts are {max_length} tokens or longer; nothing left to train on"
        )
    lengths = [len(r["input_ids"]) for r in kept]
    stats = {
        "rows": len(kept),
        "rows_truncated": sum(r["truncated"] for r in kept),
        "rows_dropped_prompt_too_long": dropped,
        "tokens": sum(lengths),
        "trained_tokens": sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in kept),
        "length_mean": round(statistics.fmean(lengths), 2),
        "length_median": statistics.median(lengths),
        "length_max": max(lengths),
    }
    return kept, stats
