"""The embedded default model: a tiny causal LM that is neither hopeless nor perfect at 3-digit
addition, built offline and cached, so `python prime.py` has a policy worth running RL on.

This is the task, not PRIME: a real run starts from an SFT checkpoint instead (--model). Built once
(about two minutes on 2 CPU cores), then loaded from the cache:
  1. a byte-level BPE tokenizer with a ChatML template (reads any text; digits stay single
     tokens so the model can learn column addition),
  2. a 2-layer Qwen2-style model from a config (no hub),
  3. a supervised warm-up on worked solutions, stopped as soon as greedy accuracy on a validation
     set (not the eval set: stopping on it would bias the starting number) reaches a middling
     level, which leaves room for RL to show.
"""
import os
import shutil

import torch

import data
import rollout

VERSION = "v1"  # bump when anything below changes, so stale caches are not reused
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# positions of the embedded model: prompt and response together (cli caps the lengths)
CONTEXT = 256
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def sft_batch(tokenizer, pairs, digits=3):
    """Prompt + worked solution + EOS; labels only on the solution and EOS (-100 elsewhere)."""
    prompts = data.prompt_token_ids(tokenizer, [data.addition_row(a, b, digits) for a, b in pairs])
    targets = [tokenizer(data.addition_solution(a, b, digits),
                         add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for a, b in pairs]
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    ids, labels, attn = [], [], []
    for p, t in zip(prompts, targets):
        pad = width - len(p) - len(t)
        ids.append(p + t + [tokenizer.pad_token_id] * pad)
        labels.append([-100] * len(p) + t + [-100] * pad)
        attn.append([1] * (len(p) + len(t)) + [0] * pad)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(labels)


def warm_up(model, tokenizer, target: float, seed: int, digits=3, max_steps=1000, batch_size=128,
            lr=1e-3, check_every=10):
    """Supervised steps on fresh problems until greedy validation accuracy >= target."""
    from tqdm import tqdm
    valid = data.addition_rows(300, data.VALID_SEED, digits=digits)
    exclude = frozenset(data.addition_pairs(500, data.EVAL_SEED, digits=digits)) | \
        frozenset(data.addition_pairs(300, data.VALID_SEED, digits=digits))
    stream = iter(data.addition_pairs(max_steps * batch_size, seed, exclude, digits))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    acc, bar = 0.0, tqdm(range(1, max_steps + 1), desc=f"warm-up (until {target:.0%} right)",
                         dynamic_ncols=True)
    for step in bar:
        ids, attn, labels = sft_batch(tokenizer, [next(stream) for _ in range(batch_size)], digits)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % check_every == 0:
            engine = rollout.HFRollout(model, tokenizer,
                                       max_response_len=data.solution_tokens(digits))
            acc = rollout.evaluate(engine, tokenizer, valid, progress=False)["accuracy"]
            model.requires_grad_(True)
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", valid_acc=f"{acc:.1%}")
            if acc >= target:
                break
    bar.close()
    print(f"warm-up: {step} steps, validation accuracy {acc:.1%}")
    return acc


def embedded_model(cache_dir: str, target: float = 0.3, seed: int = 0, digits: int = 3) -> str:
    """Path of the cached embedded model of the `digits`-digit task, building it first if needed
    (atomic: a crash mid-build leaves no half-written model behind)."""
    name = (f"embedded-addition-{VERSION}-seed{seed}-target{target}"
            + (f"-digits{digits}" if digits != 3 else ""))
    path = os.path.join(cache_dir, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    print(f"building the embedded default model in {path} (once)")
    train_text = [data.addition_question(a, b) + data.addition_solution(a, b, digits)
                  for a, b in data.addition_pairs(2000, seed, digits=digits)]
    tokenizer = build_tokenizer(train_text + [CHAT_TEMPLATE] + SPECIAL)
    model = build_model(tokenizer, seed)
    warm_up(model, tokenizer, target, seed, digits)
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # python bootstrap.py [DIGITS]: build (or find) the cached model
    import sys
    print(embedded_model(os.path.expanduser("~/.cache/prime"),
                         digits=int(sys.argv[1]) if sys.argv[1:] else 3))
