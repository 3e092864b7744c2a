"""Stage evaluate: base, trained and merged on the held-out rows (answer loss, perplexity, exact match, samples).

    python stages/evaluate.py   # models/base + models/adapter + models/merged + data -> metrics/eval.json, reports/eval_samples.jsonl, reports/eval.md, reports/eval_per_task.csv
"""

import entry  # first: the library of this checkout (see entry.py)
from qlora_pipeline import paths


def main() -> None:
    import json

    from qlora_pipeline import outputs, reports
    from qlora_pipeline.config import load_params
    from qlora_pipeline.evaluation import MODELS, evaluate
    from qlora_pipeline.quantization import resolve_device
    from qlora_pipeline.tokenization import check_generation_context

    params = load_params()
    paths.require(paths.BASE_MODEL, paths.ADAPTER, paths.MERGED, paths.TOKENIZED, paths.FORMATTED)
    cfg = params.evaluate
    prompts = [row["prompt"] for row in outputs.read_jsonl(paths.FORMATTED / "eval.jsonl")[: cfg.generate_rows]]
    check_generation_context(paths.BASE_MODEL, prompts, cfg.max_new_tokens, str(paths.FORMATTED / "eval.jsonl"))
    metrics, samples = evaluate(
        paths.BASE_MODEL, paths.ADAPTER, paths.MERGED, paths.TOKENIZED / "eval",
        outputs.read_jsonl(paths.FORMATTED / "eval.jsonl"), params.quantize, cfg.batch_size, cfg.max_new_tokens,
        cfg.generate_rows, resolve_device("auto"),
    )
    merge_record = json.loads((paths.MERGED / "merge_params.json").read_text())
    outputs.write_texts({
        paths.REPORTS / "eval_samples.jsonl": outputs.jsonl_text(samples),
        paths.REPORTS / "eval.md": reports.evaluation_markdown(metrics, samples, merge_record, MODELS),
        paths.REPORTS / "eval_per_task.csv": reports.per_task_csv(metrics, MODELS),
        paths.METRICS / "eval.json": outputs.json_text(metrics),
    })
    print("evaluate: answer loss " + " -> ".join(f"{metrics[m]['loss']} ({m})" for m in MODELS)
          + (", exact match " + " -> ".join(str(metrics[m]["exact_match"]) for m in MODELS) if "exact_match" in metrics["base"] else ""))


if __name__ == "__main__":
    entry.run(main, __doc__, [paths.REPORTS / "eval_samples.jsonl", paths.REPORTS / "eval.md",
                              paths.REPORTS / "eval_per_task.csv", paths.METRICS / "eval.json"])
