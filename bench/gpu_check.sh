#!/usr/bin/env bash
# GPU check (issue 4): a few PRIME steps of a ~100M-parameter model (built from a config, no
# download) under torchrun on one GPU: FSDP2 with bf16 compute and fp32 master weights, the HF
# rollout engine, with --share-prompts (the default) and without. Prints rollout tokens/s, step time and peak GPU
# memory of each. About 4-6 minutes.
#
#   bash bench/gpu_check.sh            # NPROC=2 for two GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/prime-gpu-check}
NPROC=${NPROC:-1}
rm -rf "$OUT" && mkdir -p "$OUT"
python - "$OUT/model" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM, Qwen2Config
import bootstrap, data
text = [data.addition_question(a, b) + data.addition_solution(a, b) for a, b in data.addition_pairs(2000, 0)]
tok = bootstrap.build_tokenizer(text + [bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
torch.manual_seed(0)
config = Qwen2Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                     tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
model = AutoModelForCausalLM.from_config(config)
model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
PY
# An untrained model answers nothing right: the filter is off so every step trains. First as run
# by default (--share-prompts: each prompt's forward once for its 4 responses; FSDP2 under it is
# tested on CPU only), then the same with --no-share-prompts (one forward per sequence).
for share in "" --no-share-prompts; do
  run=run${share:+-plain}
  torchrun --nproc_per_node="$NPROC" prime.py --model "$OUT/model" --run-dir "$OUT/$run" --steps 4 \
    --prompts-per-step 64 --samples-per-prompt 4 --max-response-len 256 --filter-low 0 --filter-high 1 \
    --mini-batch-size 128 --micro-batch-size 32 --eval-size 64 --eval-every 4 $share
  python - "$OUT/$run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]  # steps 2..: step 1 includes CUDA warm-up
mean = lambda k: sum(r[k] for r in rows) / len(rows)
print(f"{sys.argv[1]}: steps 2-4: {mean('perf/step_seconds'):.2f} s/step, rollout {mean('perf/rollout_tokens_per_s'):.0f} "
      f"tokens/s per GPU, {mean('rollout/response_len'):.0f} tokens/response, peak GPU memory "
      f"{max(r['perf/peak_gpu_gib'] for r in rows):.1f} GiB, logp gap engine vs trainer {mean('rollout/logp_gap'):.2e}")
PY
done
