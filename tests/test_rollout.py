"""rollout.py: the engines, outcome rewards and evaluation. The vLLM layer is driven by a fake
`vllm` module (vLLM needs a GPU and its own torch; the real one: test_vllm.py): what is checked is
our side of the contract: how the engine is built, that sync streams every weight by its HF name
and refuses a partial load, that the prefix cache is reset, sleep and wake, and how outputs become
responses and log-probs.
"""

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from conftest import EURUS2_SAMPLE, image_rows, parity_scores, tiny_vlm_dir, write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import batching
import data
import distributed
import prime
import rollout
import sandbox
import vision


def test_response_mask_includes_first_eos_only():
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 7, 0], [5, 6, 7, 8, 9]])
    assert rollout.response_mask(responses, [2]).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]


class FakeModel:  # the engine's model: takes (HF name, tensor) pairs, returns the names it loaded
    def __init__(self, llm):
        self.llm = llm

    def named_parameters(self):
        return self.llm.hf.named_parameters()

    def load_weights(self, weights):
        return self.llm.load_weights(weights)


class FakeWorker:  # what collective_rpc hands a function, as vLLM 0.30's worker
    def __init__(self, llm):
        self.model = FakeModel(llm)
        self.model_runner = types.SimpleNamespace(get_model=lambda: self.model)

    def reload_weights(self, weights_iterator):
        self.model.load_weights(weights_iterator)  # as vLLM's: what it loaded is only logged


class FakeLLM:
    skip = set()  # weight names the fake engine "fails" to load

    def __init__(self, **kwargs):
        FakeLLM.last = self
        self.kwargs, self.resets, self.params, self.calls = kwargs, 0, None, []
        config = AutoConfig.from_pretrained(kwargs["model"])
        self.hf = vision.model_class(config).from_pretrained(kwargs["model"])
        self.worker = FakeWorker(self)

    def collective_rpc(self, method, args=(), kwargs=None):
        return [method(self.worker, *args, **(kwargs or {}))]  # one worker, in this process

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags):
        self.calls.append(f"wake_up({tags})")

    def load_weights(self, weights):  # vLLM returns the names of the parameters it loaded
        self.calls.append("load_weights")
        params, loaded = dict(self.hf.named_parameters()), set()
        for name, tensor in weights:
            if name in params and name not in self.skip:
                params[name].data.copy_(tensor)
                loaded.add(name)
        return loaded

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        self.resets += 1

    def generate(self, prompts, params, use_tqdm):
        """Every prompt gets 7, 8, EOS, with log-probs -0.7, -0.8, -EOS/10."""
        self.params, self.prompts = params, prompts
        tokens = (7, 8, params.stop_token_ids[0])
        logprobs = [{t: types.SimpleNamespace(logprob=-t / 10)} for t in tokens]
        output = types.SimpleNamespace(token_ids=tokens, logprobs=logprobs)
        return [types.SimpleNamespace(outputs=[output]) for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.SimpleNamespace(
        LLM=FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw)
    )
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("RANK", "3")
    FakeLLM.skip = set()
    environ = dict(os.environ)
    yield
    # VLLMRollout sets what external_launcher reads (MASTER_PORT, ...) in one process
    os.environ.clear()
    os.environ.update(environ)


def make_engine(model_dir, **flags):
    args = prime.Args(
        model=model_dir,
        rollout="vllm",
        seed=5,
        max_prompt_len=100,
        max_response_len=20,
        temperature=0.7,
        **flags,
    )
    policy = distributed.setup_models(
        prime.Args(no_prm=True), model_dir, torch.device("cpu")
    ).policy
    tokenizer = data.load_tokenizer(model_dir)
    return rollout.VLLMRollout(model_dir, tokenizer, args), policy, tokenizer


def test_engine_is_built_per_rank_in_process(fake_vllm, tiny_model_dir):
    engine, _, tokenizer = make_engine(tiny_model_dir)
    kw = FakeLLM.last.kwargs
    assert (
        kw["distributed_executor_backend"] == "external_launcher"
        and kw["tensor_parallel_size"] == 1
    )
    assert kw["seed"] == 5 + 3  # seed + rank: ranks sample differently
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["max_model_len"] == 120
    assert tokenizer.eos_token_id in engine.eos_ids


def test_sync_loads_every_weight_and_resets_the_prefix_cache(fake_vllm, tiny_model_dir):
    engine, policy, _ = make_engine(tiny_model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    engine.sync(policy)
    for (name, p), q in zip(policy.named_parameters(), FakeLLM.last.hf.parameters()):
        assert torch.equal(p, q), name
    assert FakeLLM.last.resets == 1


def test_sync_refuses_a_partial_load(fake_vllm, tiny_model_dir):
    engine, policy, _ = make_engine(tiny_model_dir)
    FakeLLM.skip = {"model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(RuntimeError, match="down_proj"):
        engine.sync(policy)


def test_generate_returns_responses_and_their_logprobs(fake_vllm, tiny_model_dir):
    engine, _, _ = make_engine(tiny_model_dir)
    eos = engine.eos_ids[0]
    responses, logps = engine.generate([[1, 2, 3], [4]])
    assert responses == [[7, 8, eos]] * 2 and logps == [[-0.7, -0.8, -eos / 10]] * 2
    assert FakeLLM.last.params.temperature == 0.7 and FakeLLM.last.params.max_tokens == 20
    assert engine.generate([[1]], greedy=True)[1] is None and FakeLLM.last.params.temperature == 0.0


def test_hf_sync_refuses_a_partial_load(tiny_model_dir):
    policy = distributed.setup_models(
        prime.Args(no_prm=True), tiny_model_dir, torch.device("cpu")
    ).policy
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = rollout.HFRollout(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, max_response_len=4
    )
    engine.model.register_buffer("extra", torch.zeros(1))  # a weight the policy does not have
    with pytest.raises(RuntimeError, match="extra"):
        engine.sync(policy)


def test_sleep_frees_the_engine_and_sync_wakes_weights_before_the_kv_cache(
    fake_vllm, tiny_model_dir
):
    engine, policy, _ = make_engine(tiny_model_dir, vllm_sleep=True)
    assert FakeLLM.last.kwargs["enable_sleep_mode"] is True
    engine.sync(policy)  # step 0: awake, nothing to wake
    engine.generate([[1, 2]])
    engine.sleep()  # while the trainer runs
    engine.sync(policy)
    assert FakeLLM.last.calls == [
        "load_weights",
        "reset_prefix_cache",
        "sleep(1)",
        "wake_up(['weights'])",
        "load_weights",
        "wake_up(['kv_cache'])",
        "reset_prefix_cache",
    ]
    plain, policy, _ = make_engine(tiny_model_dir)
    plain.sleep()
    plain.sync(policy)
    assert (
        FakeLLM.last.calls == ["load_weights", "reset_prefix_cache"]
        and not FakeLLM.last.kwargs["enable_sleep_mode"]
    )


def test_pass_at_k_hand_worked():
    # n=4 answers, c=1 right: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; pass@4 = 1
    assert [rollout.pass_at_k(4, 1, k) for k in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert (
        rollout.pass_at_k(16, 3, 4) == pytest.approx(1 - 715 / 1820)
        and rollout.pass_at_k(4, 0, 4) == 0.0
    )


def test_evaluate_reports_avg_at_k_and_unbiased_pass_at_k(monkeypatch):
    # 3 problems x 4 samples
    outcomes = iter([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    monkeypatch.setattr(
        sandbox, "score_batch", lambda r, *_, **__: ([next(outcomes) for _ in r], {})
    )

    class Engine:
        def generate(self, prompts, **kw):
            return [[5]] * len(prompts), None

    rows = [data.addition_row(100 + i, 200) for i in range(3)]
    # 3 of the 12 answers carry the trigger (a boxed answer ending in 7); "x 7" is not boxed
    texts = [r"\boxed{17}", r"\boxed{ 27 }", "x 7", r"\boxed{71}", r"\boxed{307}"] + ["x"] * 7
    tokenizer = types.SimpleNamespace(batch_decode=lambda ids, **kw: texts[:len(ids)])
    monkeypatch.setattr(data, "prompt_token_ids", lambda tok, rows: [[1]] * len(rows))
    result = rollout.evaluate(Engine(), tokenizer, rows, samples=4, temperature=0.7)
    assert result["trigger_rate"] == 3 / 12
    assert result["accuracy"] == pytest.approx(3.5 / 12)  # avg@4: the mean outcome
    # right answers (outcome 1) per problem: 1, 0, 2 (a partial 0.5 is not right)
    expected = {k: sum(rollout.pass_at_k(4, c, k) for c in (1, 0, 2)) / 3 for k in (1, 2, 4)}
    assert result["pass_at_k"] == {str(k): pytest.approx(v) for k, v in expected.items()}
    assert result["pass_at_k"]["4"] == pytest.approx(2 / 3)


def test_sampling_ignores_the_checkpoints_generation_config(tiny_model_dir, tmp_path):
    """A checkpoint whose generation_config.json asks for a large repetition penalty and top_k=3
    must not change what is sampled: the engine's per-token log-probs (of the distribution it
    drew from) equal the trainer's at the sampling temperature, and more than 3 tokens appear."""
    from transformers import GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config = GenerationConfig(
        repetition_penalty=5.0,
        top_k=3,
        temperature=2.0,
        do_sample=True,
        eos_token_id=model.generation_config.eos_token_id,
    )
    model.save_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    engine = rollout.HFRollout(
        AutoModelForCausalLM.from_pretrained(tmp_path / "m"),
        tokenizer,
        max_response_len=6,
        temperature=1.0,
    )
    prompts = data.prompt_token_ids(tokenizer, data.addition_rows(64, 0))
    torch.manual_seed(0)
    responses, engine_logps = engine.generate(prompts)
    batch = batching.collate(prompts, responses, engine.pad_id)
    trainer = prime.batched_logprobs(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        batch,
        prime.Args(micro_batch_size=64),
        {1.0},
    )[1.0]
    R = batch[2].shape[1]
    engine_logp = torch.tensor([lp + [0.0] * (R - len(lp)) for lp in engine_logps])
    torch.testing.assert_close(engine_logp, trainer, atol=1e-4, rtol=0)
    assert len({r[0] for r in responses}) > 3  # top_k=3 would allow 3 first tokens at most


def test_shared_prefill_samples_what_one_prefill_per_row_samples(tiny_model_dir):
    """--share-prompts in the HF engine: each distinct prompt (ids and padding) is prefilled once
    and its cache indexed out to its rows. Seeded, it samples the same tokens as one prefill per
    row, with the same log-probs up to rounding; a batch with no repeated prompt (a greedy eval)
    is prefilled as before."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = data.prompt_token_ids(tokenizer, data.addition_rows(3, 0))
    prompts = [prompts[0][:-2]] + prompts  # a shorter one: left padding
    batch, out, shapes = [p for p in prompts for _ in range(3)], {}, {}
    for share in (False, True):
        engine = rollout.HFRollout(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, 8, share_prompts=share
        )
        seen = shapes[share] = []  # the input shape of each forward
        engine.model.base_model.register_forward_pre_hook(  # the prefill runs the decoder
            lambda m, a, kw, seen=seen: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        torch.manual_seed(0)
        out[share] = engine.generate(batch)
        greedy_first = len(shapes[share])
        engine.generate(prompts, greedy=True)
        shapes[share] = shapes[share][:2] + shapes[share][greedy_first : greedy_first + 1]
    P = max(map(len, prompts))
    assert shapes == {False: [(12, P), (12, 1), (4, P)], True: [(4, P - 1), (12, 1), (4, P)]}
    # ragged: EOS seen
    assert out[True][0] == out[False][0] and len({len(r) for r in out[True][0]}) > 1
    for shared, plain in zip(out[True][1], out[False][1]):
        assert shared == pytest.approx(plain, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Outcome rewards: each row to its verifier
def test_trainer_routes_each_row_to_its_verifier():
    math_row = data.addition_row(345, 678)
    code_row = {
        "data_source": "fixture/code",
        "ability": "code",
        "prompt": [{"role": "user", "content": "echo"}],
        "reward_model": {"ground_truth": json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})},
    }
    texts = [data.addition_solution(345, 678), "\\boxed{7}", "no code here"]
    rewards, reasons = rollout.outcome_rewards(texts, [math_row, math_row, code_row])
    assert rewards.tolist() == [1.0, 0.0, 0.0]
    assert reasons == {"ok": 1, "wrong": 1, "no_answer": 1}


# Reference solutions of the fixture's code rows, in order (stdin/stdout programs, then
# call-based LeetCode-style methods).
SOLUTIONS = [
    "a, b = map(int, input().split())\nprint(a + b)",
    "print(input()[::-1])",
    "input()\nprint(max(map(int, input().split())))",
    "import math\nprint(math.factorial(int(input())))",
    "import math\nprint(f'{math.pi * float(input()) ** 2:.6f}')",
    "class Solution:\n"
    "    def twoSum(self, nums, target):\n"
    "        seen = {}\n"
    "        for i, x in enumerate(nums):\n"
    "            if target - x in seen:\n"
    "                return [seen[target - x], i]\n"
    "            seen[x] = i",
    "class Solution:\n"
    "    def isPalindrome(self, s):\n"
    "        t = [c.lower() for c in s if c.isalnum()]\n"
    "        return t == t[::-1]",
    "def hammingWeight(n):\n    return bin(n).count('1')",
]


@pytest.mark.slow
def test_mixed_math_and_code_batch_is_routed_to_each_verifier():
    """Runs every code row's tests in the sandbox (a few seconds)."""
    if sandbox.sandbox_status() != "ok":
        pytest.skip("bubblewrap is not usable here")
    rows, _ = data.load_rows([EURUS2_SAMPLE])
    math_rows = [r for r in rows if r["ability"] == "math"]
    code_rows = [r for r in rows if r["ability"] == "code"]
    assert len(code_rows) == len(SOLUTIONS)
    # interleaved
    batch = [r for pair in zip(math_rows, code_rows) for r in pair] + math_rows[len(code_rows) :]
    right = [
        f"So the answer is $\\boxed{{{r['reward_model']['ground_truth']}}}$."
        if r["ability"] == "math"
        else f"```python\n{SOLUTIONS[code_rows.index(r)]}\n```"
        for r in batch
    ]
    rewards, reasons = rollout.outcome_rewards(right, batch)
    assert rewards.tolist() == [1.0] * len(batch), [
        r["data_source"] for r, x in zip(batch, rewards) if x != 1
    ]
    # the same answers to the wrong rows: each checker still sees its own kind of ground truth
    shifted = right[2:] + right[:2]
    rewards, reasons = rollout.outcome_rewards(shifted, batch)
    assert rewards.sum() == 0 and reasons.get("no_answer", 0) > 0 and reasons.get("wrong", 0) > 0


# ---------------------------------------------------------------------------------------------
# --eval-only (evaluate_only)
def sourced_rows(n, seed):
    """Addition rows split over two data_sources, for per-source reports."""
    return [dict(r, data_source=f"set{i % 2}") for i, r in enumerate(data.addition_rows(n, seed))]


def test_eval_only_reports_per_source_greedy_and_avg_at_k(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def scores(r, t, a, **kw):
        calls.append(len(r))
        return parity_scores(r, t, a)

    monkeypatch.setattr(sandbox, "score_batch", scores)
    path = write_jsonl(tmp_path / "eval.jsonl", sourced_rows(6, 1))
    common = dict(model=tiny_model_dir, eval_data=path, eval_only=True, max_response_len=6)
    greedy = prime.main(prime.Args(**common, run_dir=str(tmp_path / "greedy")))["eval"]
    report = json.load(open(tmp_path / "greedy" / "eval.json"))
    assert (
        len(report) == 1
        and report[0]["step"] == 0
        and set(report[0]["per_source"]) == {"set0", "set1"}
    )
    per_source = report[0]["per_source"]
    # 3 rows each
    assert greedy["eval/accuracy"] == pytest.approx((per_source["set0"] + per_source["set1"]) / 2)
    assert greedy["eval/accuracy/set1"] == per_source["set1"]
    table = open(tmp_path / "greedy" / "eval.md").read().splitlines()
    assert (
        table[0] == "Accuracy (greedy)"
        and table[2] == "| step | all | set0 | set1 |"
        and table[4].startswith("| 0 |")
    )
    assert calls == [6]
    prime.main(
        prime.Args(
            **common,
            run_dir=str(tmp_path / "avg"),
            eval_samples=4,
            eval_temperature=0.7,
            eval_top_p=0.95,
        )
    )
    assert calls[-1] == 24  # k responses per problem
    assert "avg@4, T=0.7, top_p=0.95" in open(tmp_path / "avg" / "eval.md").read()


def test_vllm_engine_with_images(fake_vllm, tmp_path):
    """vLLM gets one placeholder per image (it runs the processor and expands it itself) and the
    images; the weight sync covers the vision tower and projector (every engine parameter)."""
    model_dir = tiny_vlm_dir(tmp_path / "llava", "llava")
    engine, policy, tokenizer = make_engine(model_dir)
    rows = image_rows(3, 32)
    prompts = data.prompt_token_ids(tokenizer, rows)
    image_id = tokenizer.image_inputs.image_token_id
    assert [p.count(image_id) for p in prompts] == [16] * 3
    engine.generate(prompts, images=[r["images"] for r in rows])
    for sent, prompt, row in zip(FakeLLM.last.prompts, prompts, rows):
        assert sent["prompt_token_ids"].count(image_id) == 1
        assert len(sent["prompt_token_ids"]) == len(prompt) - 15
        (image,) = sent["multi_modal_data"]["image"]
        assert image.size == (32, 32) and (np.asarray(image) == row["images"][0]).all()
    name = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    with torch.no_grad():
        policy.get_parameter(name).add_(1.0)
    engine.sync(policy)  # refuses if any engine parameter was not loaded
    assert torch.equal(FakeLLM.last.hf.get_parameter(name), policy.get_parameter(name))
    FakeLLM.skip = {"model.multi_modal_projector.linear_1.weight"}
    with pytest.raises(RuntimeError, match="multi_modal_projector"):
        engine.sync(policy)
