"""Dataset sources, the embedded tasks, subset, format and tokenization."""

import csv
import json

import pytest

from qlora_pipeline import tasks
from qlora_pipeline.config import DataParams
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.prompts import build_prompt, format_rows
from qlora_pipeline.sources import byte_tokenizer, fetch_dataset
from qlora_pipeline.splits import make_subset
from qlora_pipeline.tokenization import IGNORE_INDEX, Encoder, tokenize_row, tokenize_split

ALPACA_COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}
ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add.", "input": "1 + 2", "output": "3"},
]


def local(path, columns=ALPACA_COLUMNS, duplicates="error"):
    return DataParams("local", str(path), "main", columns, duplicates)


def test_tasks_are_deterministic_unique_and_correct():
    rows = tasks.generate()
    assert rows == tasks.generate() and len(rows) == tasks.NUM_ROWS
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
    assert {r["task"] for r in rows} == set(tasks.FAMILIES)
    for row in rows[:200]:
        if row["task"] == "add":
            a, b = map(int, row["input"].split(" + "))
            assert int(row["output"]) == a + b
        if row["task"] == "reverse_word":
            assert row["output"] == row["input"][::-1]
        if row["task"] == "to_json":
            assert json.loads(row["output"])["name"] in row["input"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_in_every_format(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    renamed = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in ROWS]
    if suffix == ".json":
        path.write_text(json.dumps(renamed))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    elif suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["q", "ctx", "a"])
            writer.writeheader()
            writer.writerows(renamed)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(renamed), path)
    rows, record = fetch_dataset(local(path, {"instruction": "q", "input": "ctx", "output": "a"}))
    assert rows == ROWS and record["rows"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "x", "input": ""}]', "row 1: missing column 'output'"),
        ('[{"instruction": "x", "output": "y"}, {"instruction": "x", "output": "  "}]', "row 2: empty output"),
        ('[{"instruction": "x", "output": 3}]', "row 1: column 'output' must be text, got int"),
        ('[{"instruction": "x", "output": "y"}, 7]', "row 2: expected an object"),
        ("[]", "no rows"),
        ('{"instruction": "x"}', "expected a JSON list of objects"),
        ('[{"instruction": "x", "output": "y"},', "not valid JSON"),
    ],
)
def test_bad_data_names_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PipelineError) as info:
        fetch_dataset(local(path))
    assert message in str(info.value) and "bad.json" in str(info.value)


def test_bad_jsonl_line_unreadable_and_missing_files(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    with pytest.raises(PipelineError, match="bad.jsonl line 2: not valid JSON"):
        fetch_dataset(local(path))
    binary = tmp_path / "rows.parquet"
    binary.write_bytes(b"\x00\x01not parquet")
    with pytest.raises(PipelineError, match="rows.parquet: cannot read"):
        fetch_dataset(local(binary))
    with pytest.raises(PipelineError, match="params key 'data.name': local data file .* does not exist"):
        fetch_dataset(local(tmp_path / "nope.json"))
    with pytest.raises(PipelineError, match="unsupported file type '.txt'"):
        (tmp_path / "rows.txt").write_text("x")
        fetch_dataset(local(tmp_path / "rows.txt"))


def test_subset_is_seeded_and_disjoint():
    rows = [{"i": i} for i in range(100)]
    train, held_out = make_subset(rows, 30, 20, seed=42)
    assert (train, held_out) == make_subset(rows, 30, 20, seed=42)
    assert train != make_subset(rows, 30, 20, seed=43)[0]
    assert not {r["i"] for r in train} & {r["i"] for r in held_out}
    with pytest.raises(PipelineError, match="params key 'subset.train_size': train_size \\+ eval_size = 101 exceeds the 100 rows"):
        make_subset(rows, 90, 11, seed=0)


def test_templates():
    with_input = build_prompt("alpaca", "Add.", "1 + 2")
    assert with_input.endswith("### Input:\n1 + 2\n\n### Response:\n")
    assert "### Input:\n\n\n" in build_prompt("alpaca", "Say hi.", "")  # the tutorial keeps an empty input section
    assert "### Input" not in build_prompt("alpaca-official", "Say hi.", "")
    assert build_prompt("alpaca-official", "Add.", "1 + 2") == with_input
    assert format_rows([{**ROWS[1], "task": "add"}], "alpaca") == [{"prompt": with_input, "completion": "3", "task": "add"}]


def test_tokenize_masks_prompt_and_ends_with_eos():
    tok = byte_tokenizer()
    item = tokenize_row(Encoder.of(tok), "Q: 1+2\nA: ", "3", max_length=64, train_on="completion")
    n_prompt = len("Q: 1+2\nA: ")
    assert item["input_ids"][-1] == tok.eos_token_id
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert item["labels"][n_prompt:] == [tok.convert_tokens_to_ids("3"), tok.eos_token_id]
    everything = tokenize_row(Encoder.of(tok), "Q: 1+2\nA: ", "3", max_length=64, train_on="all")
    assert everything["labels"] == everything["input_ids"]


def test_tokenize_counts_truncation_and_drops_rows_without_answer_tokens():
    tok = byte_tokenizer()
    rows = [
        {"prompt": "p" * 10, "completion": "a" * 5},   # 16 tokens: fits
        {"prompt": "p" * 10, "completion": "a" * 30},  # cut: answer loses its end and EOS
        {"prompt": "p" * 40, "completion": "a"},       # prompt alone fills max_length: nothing to train on
    ]
    kept, stats = tokenize_split(Encoder.of(tok), rows, max_length=20, train_on="completion")
    assert (stats["rows"], stats["rows_truncated"], stats["rows_dropped_prompt_too_long"]) == (2, 1, 1)
    assert all(len(r["input_ids"]) <= 20 for r in kept)
    assert kept[1]["input_ids"][-1] != tok.eos_token_id
    assert stats["trained_tokens"] == 6 + 10


def test_tokenize_refuses_when_every_prompt_is_too_long():
    rows = [{"prompt": "p" * 40, "completion": "a"}]
    with pytest.raises(PipelineError, match="params key 'tokenize.max_length': all 1 prompts are 20 tokens or longer"):
        tokenize_split(Encoder.of(byte_tokenizer()), rows, max_length=20, train_on="completion")


def test_duplicate_rows_stop_or_are_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, ROWS[0], ROWS[1]]))
    with pytest.raises(PipelineError, match=r"rows.jsonl row 3 repeats row 1 .*'data.duplicates' to drop"):
        fetch_dataset(local(path))
    rows, record = fetch_dataset(local(path, duplicates="drop"))
    assert rows == ROWS and record["rows"] == 2 and record["duplicates_dropped"] == 2
