#!/usr/bin/env bash
# The paper's recipe (PRIME, Cui et al. 2025, arXiv 2502.01456, Sec. 4 / App. of the official
# code's run script) on one node of 8 GPUs: Eurus-2-7B-SFT as policy, implicit PRM and reference,
# trained online on Eurus-2-RL-Data.
#
#   bash run_math.sh                     # after setting the paths below
#   NPROC=4 bash run_math.sh --steps 10  # extra flags are passed to prime.py
#
# Needs: pip install -r requirements-gpu.txt, the model folder and the data as .jsonl
# (Eurus-2-RL-Data rows: data_source, prompt, ability, reward_model.ground_truth).
set -euo pipefail

MODEL=${MODEL:-/path/to/Eurus-2-7B-SFT}            # policy, PRM and reference start here (paper Sec. 4.1)
DATA=${DATA:-/path/to/eurus2_rl_train.jsonl}        # Eurus-2-RL-Data, math and code rows
EVAL_DATA=${EVAL_DATA:-/path/to/eurus2_rl_validation.jsonl}
RUN_DIR=${RUN_DIR:-runs/prime-eurus2-7b}
NPROC=${NPROC:-8}
STEPS=${STEPS:-500}                                 # not fixed by the paper's text: choose by budget

torchrun --nproc_per_node="$NPROC" prime.py \
  --model "$MODEL" --data "$DATA" --eval-data "$EVAL_DATA" --run-dir "$RUN_DIR" \
  --rollout vllm \
  --steps "$STEPS" \
  --prompts-per-step 256 `# 256 prompts per step after filtering (official config)` \
  --samples-per-prompt 4 `# K = 4 (paper Sec. 4.1)` \
  --filter-low 0.2 --filter-high 0.8 `# online accuracy filter (paper Sec. 3.4)` \
  --max-prompt-len 1024 --max-response-len 3072 `# official config` \
  --temperature 1.0 --top-p 1.0 `# official rollout sampling` \
  --lr 5e-7 --weight-decay 0.01 --grad-clip 1.0 `# policy optimizer (official config)` \
  --prm-lr 1e-6 --prm-weight-decay 0.0 --prm-grad-clip 10.0 `# implicit PRM optimizer (official config)` \
  --beta 0.05 `# beta of r = beta * log(pi_phi / pi_ref) (paper Sec. 4.1)` \
  --prm-update after --reference sft --granularity token --reward-norm batch_norm `# official defaults` \
  --rloo-variant official --whiten --gamma 1.0 `# advantage estimator (paper Eq. 5, official code)` \
  --clip-eps 0.2 --ppo-epochs 1 --mini-batch-size 256 `# PPO (official config)` \
  --kl-coef 0.0 --entropy-coef 0.0 `# no KL penalty, no entropy bonus (paper Sec. 4.1)` \
  --micro-batch-size 16 --max-tokens-per-micro-batch 16384 `# per forward, length-sorted: memory, not the recipe` \
  --gradient-checkpointing `# activations recomputed in the backward pass: memory, not the recipe` \
  --vllm-sleep `# vLLM's KV cache freed (weights offloaded) while the trainer runs: memory, not the recipe` \
  --vllm-gpu-memory-utilization 0.3 `# vLLM's share of each GPU next to the FSDP shards: memory, not the recipe` \
  --eval-every 16 --save-every 16 `# official config` \
  --eval-samples 16 --eval-temperature 0.3 --eval-top-p 0.95 `# avg@16: what the PRIME authors now report (greedy moves between vLLM versions)` \
  "$@"
