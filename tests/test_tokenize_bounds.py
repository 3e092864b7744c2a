"""Tokenizing costs what max_length needs, not what a row holds: a huge row is cut before it is tokenized, to
exactly the tokens the whole row would give, or refused with one line naming its file and row."""

import random

import pytest

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.sources import byte_tokenizer
from qlora_pipeline.tokenization import MAX_UNCUT_CHARS, Encoder, leading_ids, longest_token_chars, tokenize_split


PIECES = ["the", " cat", "  ", "\n", "\n\n", " 12345", "67", "!!", " é", "e\u0301", " 日本語", " 🙂", "\t", " don't",
          "<|endoftext|>", "x" * 30, " " * 9, "### Response:", "ß", " A", "\r\n", "1,000"]

# Llama-3's pre-tokenizer regex (tokenizer.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def trained_bpe(family: str):
    """A BPE tokenizer with real merges, trained here (seconds less than loading a hub one) with the
    pre-tokenizer of a model family: GPT-2 / SmolLM2 (byte-level regex), Llama 3 (its split regex, then
    bytes), Llama 2 / Mistral (metaspace)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "metaspace":
        core, alphabet = Tokenizer(models.BPE(unk_token="<unk>")), []
        core.pre_tokenizer = pre_tokenizers.Metaspace()
    else:
        core, alphabet = Tokenizer(models.BPE()), pre_tokenizers.ByteLevel.alphabet()
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if family == "gpt2" else \
            pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rng = random.Random(1)
    corpus = ["".join(rng.choice(PIECES) for _ in range(50)) for _ in range(300)]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<unk>"],
                                                         initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bpe():
    return trained_bpe("gpt2")


class Spy:
    """A `tokenizers.Tokenizer` that records the longest text it was asked to encode, alone or in a batch."""

    def __init__(self, core):
        self.core, self.longest = core, 0

    def encode(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.core.encode(text, **kwargs)

    def encode_batch(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.core.encode_batch(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.core, name)


def random_text(rng, pieces):
    return "".join(rng.choice(PIECES) for _ in range(pieces))


@pytest.mark.parametrize("family", ["gpt2", "llama3", "metaspace", "bytes"])
def test_cut_text_gives_the_whole_texts_first_tokens(family):
    """For many texts, counts and cut lengths, the first `count` tokens through the cut are the whole text's,
    and `more` says whether the whole text has more. (The byte tokenizer does not split text into words: only
    its special tokens give it places to cut at.) The whole text's tokens are transformers'."""
    tokenizer = byte_tokenizer() if family == "bytes" else trained_bpe(family)
    core = Encoder.of(tokenizer).core
    rng = random.Random(0)
    cut = 0
    for _ in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 300)))
        count = rng.randint(1, 40)
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        spy = Spy(core)
        # Fewer characters a token than the vocabulary allows: more cuts, each at most as safe.
        ids, more = leading_ids(spy, text, count, rng.choice([2, 4, 8, longest_token_chars(core)]), "t")
        assert (ids, more) == (whole[:count], len(whole) > count), (text, count)
        cut += spy.longest < len(text)
    assert cut > 50


def test_a_huge_row_is_cut_before_tokenizing(bpe):
    """A 2-million-character answer and prompt (prose) are tokenized only as far as max_length needs; the
    statistics are those of tokenizing them whole."""
    prose = " ".join(["The quick brown fox jumps over the lazy dog."] * 45_000)
    rows = [{"prompt": "Say hi.\n", "completion": "hi"}, {"prompt": "Summarize:\n", "completion": prose},
            {"prompt": prose, "completion": "short"}]
    spy = Spy(Encoder.of(bpe).core)
    kept, stats = tokenize_split(Encoder(spy, bpe.eos_token_id), rows, max_length=64, train_on="completion",
                                 where="data/formatted/train.jsonl")
    assert spy.longest <= 64 * longest_token_chars(spy.core)
    assert (stats["rows"], stats["rows_truncated"], stats["rows_dropped_prompt_too_long"]) == (2, 1, 1)
    whole = bpe("Summarize:\n", add_special_tokens=False)["input_ids"] + bpe(prose[:5000], add_special_tokens=False)["input_ids"]
    assert kept[1]["input_ids"] == whole[:64]


def test_a_huge_row_without_word_breaks_is_refused_naming_file_and_row(bpe):
    rows = [{"prompt": "Say hi.\n", "completion": "hi"}, {"prompt": "Decode:\n", "completion": "A" * (MAX_UNCUT_CHARS + 1)}]
    with pytest.raises(PipelineError, match=r"^data/formatted/eval.jsonl row 2 \(completion\): 1,000,001 characters "
                                            r"with no word break in the first [\d,]+ to cut them at"):
        tokenize_split(Encoder.of(bpe), rows, max_length=64, train_on="completion", where="data/formatted/eval.jsonl")


@pytest.mark.parametrize("family", ["gpt2", "llama3", "metaspace", "bytes"])
def test_a_split_tokenized_in_batches_is_the_split_tokenized_row_by_row(family):
    """tokenize_split encodes the short texts of each 256 rows in one call (encode_short): the rows are those
    tokenize_row makes one text at a time, over more than one batch of rows, with repeated and empty texts, rows
    cut at max_length, texts too long to batch (cut as before) and rows whose prompt fills max_length (dropped)."""
    from qlora_pipeline.tokenization import tokenize_row

    tokenizer = byte_tokenizer() if family == "bytes" else trained_bpe(family)
    encoder = Encoder.of(tokenizer)
    rng = random.Random(2)
    texts = [random_text(rng, rng.randint(0, 120)) for _ in range(300)] + ["", "same text", "same text"]
    rows = [{"prompt": rng.choice(texts), "completion": rng.choice(texts)} for _ in range(600)]
    rows.append({"prompt": "long:\n", "completion": random_text(rng, 9_000)})   # over encode_short's characters
    for max_length in (8, 64):
        one_by_one = [tokenize_row(encoder, row["prompt"], row["completion"], max_length, "completion")
                      for row in rows]
        one_by_one = [row for row in one_by_one if any(label != -100 for label in row["labels"])]
        kept, _ = tokenize_split(encoder, rows, max_length, "completion")
        assert kept == one_by_one and any(row["truncated"] for row in kept)
