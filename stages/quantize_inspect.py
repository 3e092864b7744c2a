"""Stage quantize-inspect: what quantization and LoRA do to the base, from its shapes (no weight is read).

    python stages/quantize_inspect.py   # models/base -> metrics/quantize.json, reports/quantize.md, reports/quantize_memory.csv
"""

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths


def main() -> None:
    import json

    from qlora_pipeline import outputs, quantization, reports
    from qlora_pipeline.config import load_params

    params = load_params()
    paths.require(paths.BASE_MODEL)
    figures = quantization.inspect(paths.BASE_MODEL, params.quantize, params.lora)
    record = json.loads((paths.BASE_MODEL / "source.json").read_text())
    outputs.write_texts({
        paths.REPORTS / "quantize.md": quantization.report_markdown(figures, record),
        paths.METRICS / "quantize.json": outputs.json_text(
            {k: v for k, v in figures.items() if k not in ("replaced_modules", "memory_by_module")}),
        paths.REPORTS / "quantize_memory.csv": reports.quantize_memory_csv(figures),
    })
    print(f"quantize-inspect: {figures['params_4bit']:,} of {figures['params_total']:,} parameters in 4 bit, "
          f"{figures['size_fp32_mb']} MB -> {figures['size_4bit_mb']} MB; "
          f"LoRA {figures['lora_trainable_params']:,} trainable ({figures['lora_trainable_percent']} %)")


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.REPORTS / "quantize.md", paths.METRICS / "quantize.json",
                              paths.REPORTS / "quantize_memory.csv"])
