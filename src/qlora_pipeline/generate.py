"""Try a model of the pipeline on one instruction, with the prompt template it was trained with.

    qlora-generate "Add the two numbers." --input "12 + 30"                   # models/merged
    qlora-generate "Add the two numbers." --input "12 + 30" --model models/adapter
    qlora-generate "Add the two numbers." --input "12 + 30" --model models/base

The template is the one recorded for the format stage in dvc.lock (what the data was formatted with),
else `format.template` of params.yaml. An adapter directory is loaded on top of the base it names, as it
was trained: the base quantized as its training_params.json records (4 bit, if it was).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from qlora_pipeline.errors import PipelineError, run_stage


def trained_template(project: Path) -> str:
    """The template of the format stage's last run (dvc.lock), else the one params.yaml names now."""
    lock = project / "dvc.lock"
    if lock.is_file():
        stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("format", {})
        template = stage.get("params", {}).get("params.yaml", {}).get("format", {}).get("template")
        if template:
            return template
    from qlora_pipeline.config import load_params

    return load_params(project / "params.yaml").format.template


def load_for_generation(model_dir: Path, project: Path):
    """A model directory (base or merged) or an adapter directory on top of its base as trained, in the evaluation dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.evaluation import inference_dtype, use_inference_attention
    from qlora_pipeline.quantization import resolve_device

    if not model_dir.is_dir():
        raise PipelineError(f"--model {model_dir}: no such directory (run the pipeline first: dvc repro)")
    device = resolve_device("auto")
    dtype = inference_dtype(device)
    use_inference_attention(device)
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.is_file():
        from qlora_pipeline.config import QuantizeParams
        from qlora_pipeline.merging import load_trained

        base_dir = project / json.loads(adapter_config.read_text())["base_model_name_or_path"]
        record = model_dir / "training_params.json"
        if not record.is_file():
            raise PipelineError(f"{record}: not found (the train stage writes it beside the adapter)")
        quantize = QuantizeParams(**json.loads(record.read_text())["quantize"])
        # Dequantized once on the CPU, as evaluation does there (the same arithmetic, without per-token dequantizing).
        model = load_trained(base_dir, model_dir, quantize, device, dtype, dequantize_once=device == "cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True, device_map={"": device}).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), device


def main(args: argparse.Namespace) -> None:
    from qlora_pipeline.decoding import decoding_method
    from qlora_pipeline.evaluation import generate_answers
    from qlora_pipeline.prompts import build_prompt

    project = Path(args.project)
    template = trained_template(project)
    model, tokenizer, device = load_for_generation(project / args.model, project)
    prompt = build_prompt(template, args.instruction, args.input)
    answer = generate_answers(model, tokenizer, [prompt], 1, args.max_new_tokens, device,
                              decoding_method(model, device)[0])[0]
    if args.show_prompt:
        print(prompt, end="")
    print(answer.strip())


def cli() -> None:
    parser = argparse.ArgumentParser(prog="qlora-generate", description=__doc__.splitlines()[0])
    parser.add_argument("instruction", help="the instruction, as in the instruction column of the data")
    parser.add_argument("--input", default="", help="the input (context) of the instruction, if any")
    parser.add_argument("--model", default="models/merged", help="models/merged, models/adapter or models/base")
    parser.add_argument("--project", default=".", help="the pipeline's directory (where dvc.lock is)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--show-prompt", action="store_true", help="print the templated prompt before the answer")
    args = parser.parse_args()
    run_stage(lambda: main(args))


if __name__ == "__main__":
    sys.exit(cli())
