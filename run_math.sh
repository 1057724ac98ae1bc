#!/usr/bin/env bash
# The paper's recipe (PRIME, Cui et al. 2025, arXiv 2502.01456, Sec. 4 / App. of the official
# code's run script) on one node of 8 GPUs: Eurus-2-7B-SFT as policy, implicit PRM and reference,
# trained online on Eurus-2-RL-Data.
#
#   bash run_math.sh                     # after setting the paths below
#   NPROC=4 bash run_math.sh --steps 10  # extra flags are passed to prime.py
#   NNODES=2 NODE_RANK=0 MASTER=host0 bash run_math.sh   # on each of 2 nodes (NODE_RANK=1 on the
#                                        # second): torchrun's c10d rendezvous at MASTER:PORT; RUN_DIR
#                                        # must be on storage every node sees (rank 0 writes it)
#
# Needs: pip install -r requirements-gpu.txt, the model folder and the data as downloaded:
#   huggingface-cli download PRIME-RL/Eurus-2-RL-Data --repo-type dataset --local-dir data/eurus2
# (a folder gives its train-* files to --data and its validation-* files to --eval-data).
set -euo pipefail

MODEL=${MODEL:-/path/to/Eurus-2-7B-SFT}            # policy, PRM and reference start here (paper Sec. 4.1)
DATA=${DATA:-data/eurus2}                           # Eurus-2-RL-Data, math and code rows (train-*)
EVAL_DATA=${EVAL_DATA:-data/eurus2}                 # its validation-* files
RUN_DIR=${RUN_DIR:-runs/prime-eurus2-7b}
NPROC=${NPROC:-8}                                   # GPUs per node
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-127.0.0.1}
PORT=${PORT:-29500}
STEPS=${STEPS:-500}                                 # not fixed by the paper's text: choose by budget

if [ "$NNODES" -gt 1 ]; then
  LAUNCH=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$MASTER:$PORT" --rdzv-id prime)
else
  LAUNCH=()
fi
torchrun ${LAUNCH[@]+"${LAUNCH[@]}"} --nproc_per_node="$NPROC" prime.py \
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
