import json

import pytest

import bootstrap
import data
from verifier import math_reward


def test_addition_solution_hand_worked():
    assert data.addition_solution(345, 678) == "5+8=13,4+7+1=12,3+6+1=10,\\boxed{1023}"
    assert data.addition_solution(100, 200) == "0+0=0,0+0=0,1+2=3,\\boxed{300}"


def test_worked_solutions_score_1_and_wrong_sums_0():
    for row, (a, b) in zip(data.addition_rows(50, 7), data.addition_pairs(50, 7)):
        truth = row["reward_model"]["ground_truth"]
        assert math_reward(data.addition_solution(a, b), truth) == 1.0
        assert math_reward(f"\\boxed{{{a + b + 1}}}", truth) == 0.0


def test_training_stream_never_yields_eval_problems():
    eval_rows = data.addition_rows(300, 0)  # dense enough that a leak would show
    stream = data.AdditionStream(seed=1, eval_rows=eval_rows)
    held_out = {r["prompt"][0]["content"] for r in eval_rows}
    assert not held_out & {r["prompt"][0]["content"] for r in stream.take(5000)}
    assert data.embedded_eval_rows(20) == data.embedded_eval_rows(20)  # fixed across runs


def test_row_stream_covers_every_row_each_epoch():
    rows = [{"i": i} for i in range(5)]
    taken = data.RowStream(rows, seed=0).take(10)
    assert sorted(r["i"] for r in taken[:5]) == sorted(r["i"] for r in taken[5:]) == list(range(5))


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("breakage, field", [
    (lambda r: r.pop("prompt"), "prompt"),
    (lambda r: r.update(prompt=[{"role": "user"}]), "prompt[0]"),
    (lambda r: r.update(ability="poetry"), "ability"),
    (lambda r: r["reward_model"].update(ground_truth="  "), "reward_model.ground_truth"),
    (lambda r: r.pop("reward_model"), "reward_model.ground_truth"),
])
def test_load_rows_names_file_row_and_field(tmp_path, breakage, field):
    good = data.addition_rows(3, 0)
    bad = data.addition_row(111, 222)
    breakage(bad)
    path = write_jsonl(tmp_path / "rows.jsonl", good[:2] + [bad])
    with pytest.raises(ValueError) as e:
        data.load_rows([path])
    assert f"{path}:3" in str(e.value) and f"'{field}'" in str(e.value)


def test_load_rows_reads_valid_files_and_rejects_bad_json(tmp_path):
    rows = data.addition_rows(4, 0)
    assert data.load_rows([write_jsonl(tmp_path / "a.jsonl", rows)]) == rows
    (tmp_path / "b.jsonl").write_text('{"prompt": \n')
    with pytest.raises(ValueError, match="b.jsonl:1: not valid JSON"):
        data.load_rows([str(tmp_path / "b.jsonl")])


def test_tokenizer_reads_any_text_and_renders_chat_prompts():
    tok = bootstrap.build_tokenizer(["345+678=5+8=13", bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    text = "Prove that x² ≥ 0 — für alle x ∈ ℝ. 你好"
    assert tok.decode(tok(text)["input_ids"]) == text
    ids = data.prompt_token_ids(tok, [data.addition_row(345, 678)])[0]
    assert tok.decode(ids) == "<|im_start|>user\n345+678=<|im_end|>\n<|im_start|>assistant\n"


def test_trainer_routes_each_row_to_its_verifier():
    import prime
    math_row = data.addition_row(345, 678)
    code_row = {"data_source": "fixture/code", "ability": "code", "prompt": [{"role": "user", "content": "echo"}],
                "reward_model": {"ground_truth": json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})}}
    texts = [data.addition_solution(345, 678), "\\boxed{7}", "no code here"]
    rewards, reasons = prime.outcome_rewards(texts, [math_row, math_row, code_row])
    assert rewards.tolist() == [1.0, 0.0, 0.0]
    assert reasons == {"ok": 1, "wrong": 1, "no_answer": 1}
