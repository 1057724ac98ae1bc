"""bootstrap.py: the embedded default's tokenizer, and its model built once per task and cached."""

import os

import pytest

import bootstrap
import data


def test_tokenizer_reads_any_text_and_renders_chat_prompts():
    tok = bootstrap.build_tokenizer(["345+678=5+8=13", bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    text = "Prove that x² ≥ 0 — für alle x ∈ ℝ. 你好"
    assert tok.decode(tok(text)["input_ids"]) == text
    ids = data.prompt_token_ids(tok, [data.addition_row(345, 678)])[0]
    assert tok.decode(ids) == "<|im_start|>user\n345+678=<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_embedded_model_is_built_once_per_task_and_atomically(tmp_path):
    """Builds the tokenizer and model and warms it up for 10 steps (tens of seconds)."""
    # target 0: the warm-up stops at its first check (10 steps), enough to build and cache a model
    path = bootstrap.embedded_model(str(tmp_path), target=0.0, digits=4)
    assert os.path.basename(path).endswith("-digits4") and os.path.isfile(
        os.path.join(path, "config.json")
    )
    # no .tmp folder left behind
    assert [p for p in os.listdir(tmp_path)] == [os.path.basename(path)]
    stamp = os.path.getmtime(os.path.join(path, "config.json"))
    # cached: not built again
    assert bootstrap.embedded_model(str(tmp_path), target=0.0, digits=4) == path
    assert os.path.getmtime(os.path.join(path, "config.json")) == stamp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    solution = data.addition_solution(1234, 5678, 4)
    assert tok.decode(tok(solution)["input_ids"]) == solution
