"""Stage quantize-inspect: load the base in 4 bit and report what quantization and LoRA do to it.

    python stages/quantize_inspect.py   # models/base -> metrics/quantize.json, reports/quantize.md, reports/quantize_memory.csv
"""

import argparse

from qlora_pipeline.errors import run_stage


def main(params_path: str = "params.yaml") -> None:
    import json

    from qlora_pipeline import outputs, paths, quantization, reports
    from qlora_pipeline.config import load_params

    params = load_params(params_path)
    paths.require(paths.BASE_MODEL)
    device = quantization.resolve_device("auto")
    figures = quantization.inspect(paths.BASE_MODEL, params.quantize, params.lora, device)
    record = json.loads((paths.BASE_MODEL / "source.json").read_text())
    outputs.write_text(paths.REPORTS / "quantize.md", quantization.report_markdown(figures, record))
    outputs.write_json(paths.METRICS / "quantize.json",
                       {k: v for k, v in figures.items() if k not in ("replaced_modules", "memory_by_module")})
    outputs.write_text(paths.REPORTS / "quantize_memory.csv", reports.quantize_memory_csv(figures))
    print(f"quantize-inspect: {figures['params_4bit']:,} of {figures['params_total']:,} parameters in 4 bit, "
          f"{figures['size_fp32_mb']} MB -> {figures['size_4bit_mb']} MB; "
          f"LoRA {figures['lora_trainable_params']:,} trainable ({figures['lora_trainable_percent']} %)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    run_stage(lambda: main(parser.parse_args().params))
