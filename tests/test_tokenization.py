"""The tokenize stage tokenizes with the `tokenizers` library alone (tokenization.load_encoder): the same ids,
word boundaries, vocabulary and EOS as transformers' tokenizer loaded from the same directory, for every kind of
tokenizer the download stage saves."""

import json
import random

import pytest

from qlora_pipeline.config import ModelParams
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.sources import byte_tokenizer, embedded_tokenizer, fetch_model
from qlora_pipeline.tokenization import load_encoder, longest_token_chars
from test_tokenize_bounds import PIECES, trained_bpe

# Text as the pipeline tokenizes it: prompts of the templates, answers of the embedded tasks, and the pieces
# that stress pre-tokenizers (whitespace runs, accents, emoji, CRLF, special tokens inside text).
TEXTS = PIECES + ["### Instruction:\n", "Below is an instruction that describes a task.", " 3 + 4 = 7", "[1, 2, 3]",
                  '{"a": 1}', "<|im_start|>", "<|im_end|>", "</s>", "<s>", "<unk>"]


def class_specific(family: str):
    """A tokenizer of transformers' own GPT-2 or Llama class (as a hub model's loads), on trained merges."""
    from transformers import GPT2Tokenizer, LlamaTokenizer

    core = trained_bpe("gpt2" if family == "gpt2-class" else "metaspace").backend_tokenizer
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(core.to_str())["model"]["merges"]]
    tokenizer_class = GPT2Tokenizer if family == "gpt2-class" else LlamaTokenizer
    return tokenizer_class(vocab=core.get_vocab(), merges=merges)


BUILD = {"bytes": byte_tokenizer, "embedded": embedded_tokenizer, "gpt2-class": class_specific,
         "llama-class": class_specific, **{family: trained_bpe for family in ("gpt2", "llama3", "metaspace")}}


@pytest.mark.parametrize("family", list(BUILD))
def test_encoder_tokenizes_as_transformers(tmp_path, family):
    from transformers import AutoTokenizer

    tokenizer = BUILD[family]() if family in ("bytes", "embedded") else BUILD[family](family)
    # What the download stage does with every tokenizer before saving it (sources.fetch_model).
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    reference, encoder = AutoTokenizer.from_pretrained(tmp_path), load_encoder(tmp_path)
    assert encoder.eos_id == reference.eos_token_id is not None
    assert encoder.core.get_vocab(with_added_tokens=True) == reference.get_vocab()
    assert longest_token_chars(encoder.core) == max(map(len, reference.get_vocab()))
    assert ([t.content for t in encoder.core.get_added_tokens_decoder().values()]
            == [t.content for t in reference.added_tokens_decoder.values()])
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(TEXTS) for _ in range(rng.randint(0, 60)))
        expected, got = reference(text, add_special_tokens=False), encoder.core.encode(text, add_special_tokens=False)
        assert (got.ids, got.word_ids) == (expected["input_ids"], expected.word_ids()), text


def test_tokenizer_files_missing_or_without_eos_give_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"tokenizer.json: not found .*rerun dvc repro download@model"):
        load_encoder(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((tiny_model_dir / name).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|no such token|>"}))
    with pytest.raises(PipelineError, match=r"tokenizer_config.json: no eos_token in the vocabulary"):
        load_encoder(tmp_path)


def test_a_model_with_only_a_python_tokenizer_is_refused_at_download(tmp_path):
    """ByT5's tokenizer exists in Python only: the pipeline needs tokenizer.json, so the download stops naming
    the key rather than the tokenize stage failing later."""
    from transformers import ByT5Tokenizer

    fetch_model(ModelParams("random", "tiny-gpt2", "main", False, False), 0, tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").unlink()
    ByT5Tokenizer().save_pretrained(tmp_path / "model")
    with pytest.raises(PipelineError, match=r"^params key 'model.name': .* has only a Python tokenizer \(ByT5Tokenizer\)"):
        fetch_model(ModelParams("local", str(tmp_path / "model"), "main", False, False), 0, tmp_path / "out")


def test_read_split_gives_the_rows_datasets_loads(tmp_path):
    """The evaluate stage reads a tokenized split with pyarrow alone: the rows datasets.load_from_disk gives, in
    order, with every column, also when save_to_disk wrote several files."""
    import datasets

    from qlora_pipeline.tokenization import read_split

    rows = [{"input_ids": list(range(i, 2 * i + 3)), "labels": [-100] * i + [7, 8, 9], "task": f"t{i % 3}"}
            for i in range(40)]
    datasets.Dataset.from_list(rows).select(range(5, 40)).save_to_disk(str(tmp_path / "eval"), num_shards=3)
    assert len(list((tmp_path / "eval").glob("*.arrow"))) == 3
    assert read_split(tmp_path / "eval") == datasets.load_from_disk(str(tmp_path / "eval")).to_list() == rows[5:]
