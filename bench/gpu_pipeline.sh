#!/usr/bin/env bash
# The whole pipeline on a GPU, stage by stage, with the commands dvc.yaml gives (no DVC: the GPU machine
# lacks it): the tutorial profile with distilgpt2-shaped random weights and ../shared/data/alpaca_sample_1k.json.
# The model is a local directory (random distilgpt2 + the embedded model's tokenizer files, as
# model.source: random makes it), since the embedded model's package is too large to send to the GPU machine.
#   bash bench/gpu_pipeline.sh DATA_JSON TOKENIZER_DIR OUT_DIR
set -euo pipefail
data=$(realpath "$1"); tokenizer=$(realpath "$2"); out=$(realpath -m "$3"); mkdir -p "$out"
work=$(mktemp -d); cp -r dvc.yaml stages src "$work/"
python3 - "$data" "$work/params.yaml" "$tokenizer" "$work/random-distilgpt2" <<'PY'
import sys, yaml, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from qlora_pipeline.sources import RANDOM_CONFIGS
params = yaml.safe_load(open("profiles/tutorial.yaml"))
spec = dict(RANDOM_CONFIGS["distilgpt2"])
torch.manual_seed(params["seed"])
AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).save_pretrained(sys.argv[4])
AutoTokenizer.from_pretrained(sys.argv[3]).save_pretrained(sys.argv[4])
params["model"].update(source="local", name=sys.argv[4])
params["data"].update(source="local", name=sys.argv[1], duplicates="drop")
params["subset"].update(train_size=885, eval_size=100)   # 985 distinct rows in the sample
yaml.safe_dump(params, open(sys.argv[2], "w"), sort_keys=False)
PY
cd "$work"
total_start=$(date +%s.%N)
for stage in "download.py model" "download.py data" subset.py format.py tokenize_data.py quantize_inspect.py train.py merge.py evaluate.py; do
  start=$(date +%s.%N)
  python3 stages/$stage > "$out/stage.log" 2>&1 || { tail -20 "$out/stage.log"; exit 1; }
  printf '%-22s %6.1f s   %s\n' "$stage" "$(awk "BEGIN {print $(date +%s.%N) - $start}")" "$(tail -1 "$out/stage.log")" | tee -a "$out/gpu_pipeline.txt"
done
printf '%-22s %6.1f s\n' "whole pipeline" "$(awk "BEGIN {print $(date +%s.%N) - $total_start}")" | tee -a "$out/gpu_pipeline.txt"
cp metrics/train.json "$out/gpu_pipeline_train.json"; cp metrics/eval.json "$out/gpu_pipeline_eval.json"
