#!/usr/bin/env bash
# The whole pipeline on a GPU with `dvc repro`: the tutorial profile (profiles/tutorial.yaml) with
# distilgpt2-shaped random weights and an Alpaca-format JSON file, in a fresh git + DVC repository.
# The model is a local directory (random distilgpt2 + the given tokenizer, as model.source: random makes it),
# since the embedded model's package is too large to send to the GPU machine.
#   bash bench/gpu_pipeline.sh DATA_JSON TOKENIZER_DIR OUT_DIR
# Writes OUT_DIR/gpu_pipeline.txt: each stage's wall time in `dvc repro` (from DVC's "Running stage" lines),
# the no-op `dvc repro` that follows, then each stage run again under bench/stage_profile.py (imports,
# loading, quantizing, training, merging, evaluating), and the stages' metrics files.
set -euo pipefail
data=$(realpath "$1"); tokenizer=$(realpath "$2"); out=$(realpath -m "$3"); mkdir -p "$out"
bench=$(realpath "$(dirname "$0")")
work=$(mktemp -d); cp -r dvc.yaml stages src plots "$work/"
python3 - "$data" "$work/params.yaml" "$tokenizer" "$work/random-distilgpt2" <<'PY'
import sys, yaml
from transformers import AutoTokenizer
from qlora_pipeline.sources import random_model
params = yaml.safe_load(open("profiles/tutorial.yaml"))
random_model("distilgpt2", params["seed"]).save_pretrained(sys.argv[4])
AutoTokenizer.from_pretrained(sys.argv[3]).save_pretrained(sys.argv[4])
params["model"].update(source="local", name=sys.argv[4])
params["data"].update(source="local", name=sys.argv[1], duplicates="drop")
params["subset"].update(train_size=885, eval_size=100)   # 985 distinct rows in the sample
yaml.safe_dump(params, open(sys.argv[2], "w"), sort_keys=False)
PY
cd "$work"
export PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}"
# The GPU image's site-packages hold no bytecode and are not writable: without a cache elsewhere, every
# stage would recompile ~3,400 modules (~10 s a stage, measured). A user's installation caches them.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$HOME/.cache/pycache}; unset PYTHONDONTWRITEBYTECODE
git init -q && git config user.email bench@localhost && git config user.name bench
dvc init -q && git add -A && git commit -qm "bench: tutorial profile, random distilgpt2"
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }
start=$(date +%s.%N)
dvc repro 2>&1 | stamp > "$out/dvc_repro.log"
end=$(date +%s.%N)
noop_start=$(date +%s.%N); dvc repro > /dev/null 2>&1; noop_end=$(date +%s.%N)
{
  echo "dvc repro on $(python3 -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%FT%TZ)"
  # A stage runs from its "Running stage" line to the next one (or the end): its command plus DVC's own work.
  awk -v end="$end" '/Running stage/ { if (name) printf "  %-18s %6.1f s\n", name, $1 - t; t = $1; name = $4 }
       END { printf "  %-18s %6.1f s\n", name, end - t }' "$out/dvc_repro.log" | tr -d "':"
  printf '  %-18s %6.1f s\n' "whole dvc repro" "$(awk "BEGIN {print $end - $start}")"
  printf '  %-18s %6.1f s\n' "no-op dvc repro" "$(awk "BEGIN {print $noop_end - $noop_start}")"
  echo "the heavy stages again under bench/stage_profile.py (seconds, slowed by the profiler; parts can overlap):"
} | tee "$out/gpu_pipeline.txt"
for stage in "download.py model" tokenize_data.py quantize_inspect.py train.py merge.py evaluate.py; do
  # shellcheck disable=SC2086
  python3 "$bench/stage_profile.py" --out "$out" stages/$stage 2>&1 >/dev/null | grep '^profile' | tee -a "$out/gpu_pipeline.txt"
done
cp metrics/train.json "$out/gpu_pipeline_train.json"; cp metrics/eval.json "$out/gpu_pipeline_eval.json"
