"""Packed training passes: the rows of a pass laid end to end in one sequence, each attending only to itself.

Why: padding each pass to its longest row spends about half of a pass's compute on pad tokens with the
Alpaca rows (bench/NOTES.md). Packed, a pass computes only its rows' tokens, plus at most
`pad_to_multiple_of - 1` pad tokens at the end (which keep the number of distinct shapes small for CUDA graphs).

What stays the same as a padded pass, so that packing is an execution choice and not a change of what is
optimized:
- Attention: each row attends causally to its own tokens only (variable-length attention over the row
  boundaries `cu_seq_lens`), never to another row of the pack.
- Positions restart at 0 for every row (`position_ids`), as in a padded batch.
- The loss: the first token of every row gets label -100. In a padded row the shift of the causal loss never
  makes the first token a target; packed, it would be predicted from the previous row's last token. With it
  masked, the trained tokens, their count (the Trainer counts `labels[:, 1:] != -100`) and so the loss
  normalization are exactly those of the padded pass.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

# The name under which the packed attention is registered with transformers' attention functions.
ATTENTION = "qlora_packed"
# Keys of a packed batch beside input_ids and labels; transformers passes these model kwargs on to attention.
BOUNDARY_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pack(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1, segments: int | None = None) -> dict[str, Any]:
    """One packed sequence of `examples` (each with `input_ids` and `labels`), as a batch of one row.

    The tail of pad tokens is a segment of its own (possibly empty). With `segments`, `cu_seq_lens_*` always has
    `segments + 1` entries (empty segments at the end), so that passes with fewer rows keep the same shapes."""
    import torch

    lengths = [len(example["input_ids"]) for example in examples]
    total = sum(lengths)
    padded = -(-total // pad_to_multiple_of) * pad_to_multiple_of
    pad = padded - total
    input_ids = torch.full((1, padded), pad_token_id, dtype=torch.long)
    labels = torch.full((1, padded), -100, dtype=torch.long)
    position_ids = torch.empty((1, padded), dtype=torch.long)
    start = 0
    for example, length in zip(examples, lengths):
        input_ids[0, start:start + length] = torch.as_tensor(example["input_ids"])
        labels[0, start + 1:start + length] = torch.as_tensor(example["labels"][1:])
        position_ids[0, start:start + length] = torch.arange(length)
        start += length
    position_ids[0, total:] = torch.arange(pad)
    ends = torch.tensor(lengths).cumsum(0).tolist() + [padded]
    ends += [padded] * ((segments or len(ends)) - len(ends))
    cu_seq_lens = torch.tensor([0, *ends], dtype=torch.int32)
    longest = max(lengths + [pad])
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}


def split_into_passes(lengths: list[int], max_tokens: float, max_rows: int, packing: bool) -> list[int]:
    """How many rows each pass of a step takes, in order: as many as fit `max_tokens` (packed: their sum;
    padded: the longest times the rows) and `max_rows`, and at least one."""
    sizes, count, longest, tokens = [], 0, 0, 0
    for length in lengths:
        grown = tokens + length if packing else max(longest, length) * (count + 1)
        if count and (grown > max_tokens or count == max_rows):
            sizes.append(count)
            count, longest, tokens = 0, 0, 0
            grown = length
        count, longest, tokens = count + 1, max(longest, length), tokens + length
    return sizes + [count] if count else sizes


def runs_by_length(cuda_graphs: bool, packing: bool) -> bool:
    """Whether a run's steps execute their rows by length (sorted_passes): padded passes replayed from CUDA graphs,
    where a second pass costs one launch. Eager, it would cost the pass's ~700 launches; packed, there is no padding
    to save."""
    return cuda_graphs and not packing


def sorted_passes(lengths: list[int], max_tokens: float, max_rows: int) -> tuple[list[int], list[int]]:
    """Padded passes of a step with less padding: the order to run its rows in (shortest first) and the rows of
    each pass, bounded as split_into_passes bounds them; a step that fits one pass runs as two halves.

    Why: a padded pass computes every row at its longest row's length. Ten random Alpaca rows a step, one pass,
    1.26 M tokens computed over the tutorial's 267 steps for 0.57 M real ones; two halves by length, 0.89 M. The
    step's rows, their loss and its normalization (the step's trained tokens) stay the same. Worth it where a pass
    costs little to launch (CUDA graphs: one launch a pass) and the GPU's work is what a step waits for."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = split_into_passes([lengths[i] for i in order], max_tokens, max_rows, packing=False)
    if len(sizes) == 1 and sizes[0] > 1:
        sizes = [sizes[0] // 2, sizes[0] - sizes[0] // 2]
    return order, sizes


def supports_packing(model) -> str | None:
    """Why packed passes cannot reproduce this model's padded passes, or None when they can."""
    config = model.config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if model.config._attn_implementation not in ("sdpa", "eager", ATTENTION):
        return f"the model uses {model.config._attn_implementation} attention"
    return None


def use_packed_attention(model) -> None:
    """Make `model` attend through `packed_attention` (registered once with transformers)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    model.set_attn_implementation(ATTENTION)


@functools.cache
def varlen_attention():
    """torch's variable-length flash attention and what it takes (causality as a window or a flag, grouped
    heads, a scale), or None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in parameters, "enable_gqa" in parameters, "scale" in parameters


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """Causal attention within each packed row. query: (1, heads, tokens, head_dim); key and value may have fewer
    (grouped) heads. Returns (1, tokens, heads, head_dim) and no weights, as transformers' attention functions do."""
    import torch
    import torch.nn.functional as F

    if cu_seq_lens_q is None:
        raise RuntimeError("packed attention needs the row boundaries of a packed batch (cu_seq_lens_q)")
    if dropout:
        raise RuntimeError("packed attention does not implement attention dropout")
    groups = query.shape[1] // key.shape[1]
    varlen = varlen_attention() if query.is_cuda else None
    if varlen is not None:
        varlen_attn, takes_window, takes_gqa, takes_scale = varlen
        # Flash attention computes in 16 bit: the autocast dtype, as scaled_dot_product_attention would under
        # autocast (queries and keys arrive in float32 after rotary embeddings of an upcast model).
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else dtype
        q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))   # (tokens, heads, head_dim)
        if groups > 1 and not takes_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        causal = {"window_size": (-1, 0)} if takes_window else {"is_causal": True}
        gqa = {"enable_gqa": True} if groups > 1 and takes_gqa else {}
        scale = {"scale": scaling} if takes_scale else {}
        if scaling is not None and not takes_scale and abs(scaling * q.shape[-1] ** 0.5 - 1) > 1e-6:
            raise RuntimeError("this torch's varlen_attn takes no scale, and the model scales attention its own way")
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **scale, **causal, **gqa)
        return out.unsqueeze(0), None
    # Elsewhere (the CPU): each row on its own, exactly the padded pass's attention.
    bounds = cu_seq_lens_q.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
            pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=groups > 1))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None
