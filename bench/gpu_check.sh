#!/usr/bin/env bash
# GPU check: four PRIME steps of a ~100M-parameter model (built from a config, no download) under
# torchrun with the default flags: FSDP2 with bf16 compute, fp32 master weights and gradient
# reductions and a bf16 reference (--precision auto under torchrun on a GPU), the default batch
# sizes (64 prompts x K=4, mini-batch 128, micro-batch each process's share), the HF rollout engine;
# then the same with --no-share-prompts. Prints, over steps 2-4, the step time, rollout tokens/s,
# trained tokens/s, MFU and peak GPU memory. A few minutes on one H100.
#
#   bash bench/gpu_wheels.sh     # where pip can download: the wheels the GPU machine lacks, into .whl/
#   bash bench/gpu_check.sh      # on the GPU machine, .whl/ carried with the tree; NPROC=2 for two GPUs
#
# Only the model, the length of the run and of the responses (an untrained model does not stop),
# the filter (it answers nothing right) and the eval's size are set.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/prime-gpu-check}
NPROC=${NPROC:-1}
# The borrowed GPU machines have transformers 5.17 and no math-verify: what bench/gpu_wheels.sh fetched.
if ! python3 -c "import sys, math_verify, transformers as t
sys.exit(tuple(map(int, t.__version__.split('.')[:2])) < (5, 24))" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu_check: needs transformers>=5.24 and math-verify: run bash bench/gpu_wheels.sh, carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, '
            f'{torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\"}')"
rm -rf "$WORK/model" "$WORK"/run* && mkdir -p "$WORK"
python3 - "$WORK/model" <<'PY'
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
for share in "" --no-share-prompts; do
  run="$WORK/run${share:+-plain}"
  python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" prime.py --model "$WORK/model" \
    --run-dir "$run" --steps 4 --max-response-len 256 --filter-low 0 --filter-high 1 --eval-size 64 $share
  python3 - "$run" "$WORK/model" <<'PY'
import json, os, sys
import torch
from transformers import AutoConfig, AutoTokenizer
import data
run, model = sys.argv[1:]
args = json.load(open(os.path.join(run, "args.json")))
rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][2:]  # steps 2-4: step 1 warms CUDA up
mean = lambda key: sum(r[key] for r in rows) / len(rows)
c = AutoConfig.from_pretrained(model)
h, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
n = layers * (4 * h * h + 3 * h * inter) + c.vocab_size * h  # parameters in matmuls (tied head counted once)
prompt = sum(map(len, data.prompt_token_ids(AutoTokenizer.from_pretrained(model), data.addition_rows(256, 0)))) / 256
responses = mean("filter/kept_groups") * args["samples_per_prompt"]  # over all ranks
generated = responses * mean("rollout/response_len")
trained = responses * (prompt + mean("rollout/response_len"))
on_policy = args["ppo_epochs"] == 1 and responses <= args["mini_batch_size"]
# matmul FLOPs (attention's left out): generation 2N per token (prompt and response), reference 2N,
# PRM 6N, policy 6N per trained token, and 2N for the policy's old log-probs unless on-policy
flops = 2 * n * (responses * prompt + generated) + (14 + (0 if on_policy else 2)) * n * trained
seconds, peak = mean("perf/step_seconds"), 989e12  # H100 / H200 SXM: bf16 dense tensor-core peak
gib = max(r.get("perf/peak_gpu_gib", float("nan")) for r in rows)
print(f"{os.path.basename(run)}: steps 2-4, {args['world_size']} GPU(s), --precision {args['precision']}: "
      f"{seconds:.2f} s/step; rollout {mean('perf/rollout_tokens_per_s'):.0f} tokens/s per GPU "
      f"({mean('rollout/response_len'):.0f} tokens/response); {trained / seconds:.0f} trained tokens/s; "
      f"MFU {flops / seconds / args['world_size'] / peak:.1%} of {peak / 1e12:.0f} TFLOP/s; peak GPU memory "
      f"{gib:.1f} GiB; logp gap engine vs trainer {mean('rollout/logp_gap'):.2e}")
PY
done
