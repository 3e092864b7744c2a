import pytest
import yaml

from qlora_pipeline.config import deep_update, load_params, parse_params
from qlora_pipeline.errors import PipelineError

from helpers import ROOT, default_params


def test_default_params_and_profiles_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.model.source == "embedded" and params.data.source == "embedded"
    tutorial = load_params(ROOT / "profiles" / "tutorial.yaml")
    assert tutorial.model.name == "distilbert/distilgpt2"
    assert tutorial.lora.target_modules == ["c_attn", "c_proj", "c_fc"]
    assert (tutorial.train.batch_size, tutorial.train.grad_accum, tutorial.train.epochs) == (2, 5, 3.0)
    assert tutorial.train.learning_rate == 2e-4


def test_every_default_key_has_a_comment():
    for line_no, line in enumerate((ROOT / "params.yaml").read_text().splitlines(), 1):
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"params.yaml line {line_no} has no comment: {line!r}"


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"lora": {"rank": 8}}, "params key 'lora.rank' is unknown"),
        ({"trian": {}}, "params key 'trian' is unknown"),
        ({"lora": {"r": 0}}, "params key 'lora.r': must be > 0"),
        ({"lora": {"r": "eight"}}, "params key 'lora.r': expected int"),
        ({"lora": {"r": 8.5}}, "params key 'lora.r': expected int"),
        ({"train": {"learning_rate": 0}}, "params key 'train.learning_rate': must be > 0"),
        ({"train": {"learning_rate": -1e-4}}, "params key 'train.learning_rate': must be > 0"),
        ({"train": {"batch_size": True}}, "params key 'train.batch_size': expected int"),
        ({"model": {"source": "s3"}}, "params key 'model.source': expected 'hub' | 'local' | 'embedded' | 'random'"),
        ({"data": {"source": "ftp"}}, "params key 'data.source'"),
        ({"lora": {"dropout": 1.5}}, "params key 'lora.dropout': must be in [0, 1)"),
        ({"lora": {"target_modules": []}}, "params key 'lora.target_modules'"),
        ({"lora": {"target_modules": "all"}}, "params key 'lora.target_modules'"),
        ({"subset": {"train_size": -3}}, "params key 'subset.train_size': must be > 0"),
        ({"tokenize": {"train_on": "prompt"}}, "params key 'tokenize.train_on'"),
    ],
)
def test_bad_params_name_the_key(overlay, message):
    with pytest.raises(PipelineError) as info:
        parse_params(deep_update(default_params(), overlay))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_data_columns_need_instruction_and_output():
    raw = default_params()
    raw["data"]["columns"] = {"instruction": "question"}
    with pytest.raises(PipelineError, match=r"params key 'data.columns'.*missing \['output'\]"):
        parse_params(raw)


def test_missing_key_and_scientific_notation():
    raw = default_params()
    del raw["train"]["optim"]
    with pytest.raises(PipelineError, match="params key 'train.optim' is missing"):
        parse_params(raw)
    raw = deep_update(default_params(), {"train": {"learning_rate": "2e-4"}})  # YAML 1.1 reads this as a string
    assert parse_params(raw).train.learning_rate == 2e-4


def test_unreadable_params_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\nmodel: [unclosed\n")
    with pytest.raises(PipelineError, match=r"params.yaml line \d+: not valid YAML"):
        load_params(bad)
    with pytest.raises(PipelineError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(PipelineError, match="expected a mapping"):
        load_params(bad)
