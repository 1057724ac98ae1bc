"""The vLLM rollout layer, driven by a fake `vllm` module (vLLM needs a GPU and its own torch).

What is checked is our side of the contract: how the engine is built, that sync streams every
weight by its HF name and refuses a partial load, that the prefix cache is reset, and how
outputs become responses and log-probs.
"""
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import prime


class FakeLLM:
    skip = set()  # weight names the fake engine "fails" to load

    def __init__(self, **kwargs):
        FakeLLM.last = self
        self.kwargs, self.resets, self.params = kwargs, 0, None
        self.hf = AutoModelForCausalLM.from_pretrained(kwargs["model"])
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self.load_weights,
                                                                   named_parameters=self.hf.named_parameters))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))

    def load_weights(self, weights):  # vLLM returns the names of the parameters it loaded
        params, loaded = dict(self.hf.named_parameters()), set()
        for name, tensor in weights:
            if name in params and name not in self.skip:
                params[name].data.copy_(tensor)
                loaded.add(name)
        return loaded

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, params, use_tqdm):
        self.params = params
        step = lambda t: {t: types.SimpleNamespace(logprob=-t / 10)}
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=(7, 8, params.stop_token_ids[0]),
                                                                     logprobs=[step(7), step(8), step(params.stop_token_ids[0])])])
                for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("RANK", "3")
    FakeLLM.skip = set()


def make_engine(model_dir):
    args = prime.Args(model=model_dir, rollout="vllm", seed=5, max_prompt_len=100, max_response_len=20, temperature=0.7)
    policy, _, _ = prime.setup_models(prime.Args(model=model_dir, no_prm=True), model_dir, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return prime.VLLMRollout(model_dir, tokenizer, args), policy, tokenizer


def test_engine_is_built_per_rank_in_process(fake_vllm, tiny_model_dir):
    engine, _, tokenizer = make_engine(tiny_model_dir)
    kw = FakeLLM.last.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["tensor_parallel_size"] == 1
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
    policy, _, _ = prime.setup_models(prime.Args(model=tiny_model_dir, no_prm=True), tiny_model_dir, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = prime.HFRollout(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, prime.Args())
    engine.model.register_buffer("extra", torch.zeros(1))  # a weight the policy does not have
    with pytest.raises(RuntimeError, match="extra"):
        engine.sync(policy)
