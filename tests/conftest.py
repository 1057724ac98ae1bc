"""Shared fixtures: a tiny model built from a config, and a deterministic fake verifier."""
import pytest
import torch

import bootstrap
import data


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    corpus = [data.addition_question(a, b) + data.addition_solution(a, b) for a, b in data.addition_pairs(200, 0)]
    tokenizer = bootstrap.build_tokenizer(corpus + [bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    model = bootstrap.build_model(tokenizer, seed=0)
    # A few steps on answers of 1-5 digits + EOS, so sampled responses have ragged lengths
    # (token-mean and seq-mean losses differ only then).
    opt, gen = torch.optim.AdamW(model.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    prompt = data.prompt_token_ids(tokenizer, [data.addition_row(123, 456)])[0]
    for _ in range(30):
        n = int(torch.randint(1, 6, (), generator=gen))
        target = [digits[int(i)] for i in torch.randint(0, 10, (n,), generator=gen)] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        model(input_ids=ids, labels=torch.tensor([[-100] * len(prompt) + target])).loss.backward()
        opt.step()
        opt.zero_grad()
    path = str(tmp_path_factory.mktemp("tiny"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parity_scores(responses, truths, abilities):
    rewards = [float(len(r) % 2 == 0) for r in responses]
    return rewards, {"ok": int(sum(rewards)), "wrong": len(rewards) - int(sum(rewards))}


