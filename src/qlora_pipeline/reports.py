"""What the stages write for people to look at: DVC plot data (dvclive logs, CSV tables) and Markdown reports.

The plots themselves are declared in dvc.yaml (`plots:`), so `dvc plots show` and `dvc plots diff`
render them for one run or side by side for several.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlora_pipeline import outputs


STEP_LOG_FIELDS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "seconds"]


def step_log_csv(step_rows: list[dict]) -> str:
    """The run's step log as one table (metrics/train_log.csv)."""
    return _csv(step_rows, STEP_LOG_FIELDS)


def write_training_log(directory: Path, step_rows: list[dict], eval_rows: list[dict]) -> None:
    """The run's per-step metrics in dvclive's layout in `directory`: plots/metrics/{train,eval}/<name>.tsv
    (step and value, no timestamps) and metrics.json (the last values). Written once the run is complete,
    from the run log, so a resumed run's log equals an uninterrupted one's and a killed run leaves none.

    dvclive's Metric writes the files; its Live front end is not used: it inspects the git repo (and
    fails in one without commits, dvclive 3.49) and would register experiments of its own."""
    from dvclive.plots import Metric

    summary: dict[str, Any] = {}
    writers: dict[str, Metric] = {}
    for row in _by_step(step_rows, eval_rows):
        values = {f"train/{name}": row.get(name) for name in ("loss", "learning_rate", "grad_norm", "tokens")}
        values["eval/loss"] = row.get("eval_loss")
        for name, value in values.items():
            if value is None:
                continue
            if name not in writers:
                writers[name] = Metric(name, str(directory / "plots"))
            metric = writers[name]
            metric.step = row["step"]
            metric.dump(value)
            group, leaf = name.split("/")
            summary.setdefault(group, {})[leaf] = value
        summary["step"] = row["step"]
    outputs.write_json(directory / "metrics.json", summary)


def _by_step(step_rows: list[dict], eval_rows: list[dict]) -> list[dict]:
    merged: dict[int, dict] = {row["step"]: dict(row) for row in step_rows}
    for row in eval_rows:
        merged.setdefault(row["step"], {"step": row["step"]})["eval_loss"] = row["loss"]
    return [merged[step] for step in sorted(merged)]


def _csv(rows: list[dict], fields: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def per_task_csv(metrics: dict[str, Any], models: Sequence[str]) -> str:
    """Exact match per task family of each of `models` (long format: task, series, value)."""
    rows = [{"task": task, "series": series, "exact_match": value}
            for series in models
            for task, value in sorted((metrics[series].get("exact_match_per_task") or {}).items())]
    return _csv(rows, ["task", "series", "exact_match"])


def evaluation_markdown(metrics: dict[str, Any], samples: list[dict], merge_record: dict[str, Any],
                        models: Sequence[str]) -> str:
    """The evaluation as a page: the headline figures of `models` (base, trained, merged), what merging cost,
    accuracy per task, and each sample's answers. `merge_record`: what models/merged was made with."""
    trained = ("the 4-bit base with the adapter applied on the fly, as trained (4-bit layers computing in "
               f"{metrics['trained_compute_dtype']})" if metrics["trained_in_4bit"]
               else "the base with the adapter applied on the fly, as trained")
    merging = metrics["merging"]
    lines = ["# Evaluation: base, trained and merged", "",
             f"{metrics['eval_rows']} held-out rows; answers generated greedily for {metrics['generated_rows']}. "
             f"Base and merged run in {metrics['dtype']}. Trained: {trained}. Merged: models/merged, the adapter "
             f"folded into the {merge_record['base']} base weights and saved in {merge_record['dtype']}.", "",
             "| figure | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models),
             "| answer loss | " + " | ".join(str(metrics[m]["loss"]) for m in models) + " |",
             "| perplexity | " + " | ".join(str(metrics[m]["perplexity"]) for m in models) + " |"]
    if metrics["base"].get("exact_match") is not None:
        lines.append("| exact match | " + " | ".join(str(metrics[m]["exact_match"]) for m in models) + " |")
    lines += ["", f"Merging changed the answer loss by {merging['loss_change']:+}"
              + (f" and exact match by {merging['exact_match_change']:+}" if "exact_match_change" in merging else "")
              + f"; {merging['answers_changed']} of {metrics['generated_rows']} generated answers differ between the "
              "trained and the merged model."]
    per_task = metrics["base"].get("exact_match_per_task") or {}
    if per_task:
        lines += ["", "## Exact match per task", "", "| task | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        lines += ["| " + " | ".join([task, *(str(metrics[m]["exact_match_per_task"].get(task)) for m in models)]) + " |"
                  for task in sorted(per_task)]
    lines += ["", "## Samples", "", "| task | prompt | reference | " + " | ".join(models) + " |", "|---|---|---|" + "---|" * len(models)]
    for sample in samples:
        cells = [sample.get("task") or "", _instruction(sample["prompt"]), sample["reference"], *(sample[m] for m in models)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _instruction(prompt: str) -> str:
    """The instruction (and input) of a templated prompt, without the template's boilerplate."""
    body = prompt.split("### Instruction:", 1)[-1].split("### Response:", 1)[0]
    return body.replace("### Input:", "/").strip()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:200]


def quantize_memory_csv(figures: dict[str, Any]) -> str:
    """Memory by module type, loaded in float32 and loaded for QLoRA (long format: module, series, MiB)."""
    rows = [{"module": kind, "series": series, "mib": round(sizes[key] / 2**20, 2)}
            for series, key in (("float32", "float32"), ("QLoRA (4-bit + float16)", "qlora"))
            for kind, sizes in figures["memory_by_module"].items()]
    return _csv(rows, ["module", "series", "mib"])
