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
`--task image-addition` builds its vision-language twin: a tiny LLaVA (a 1-layer CLIP-style vision
tower on 48x48 images, 12-pixel patches: 16 image tokens, then the same 2-layer text model), warmed
up the same way on data.py's image rows.
"""
import os
import random
import shutil

import torch

import data
import rollout
import vision

VERSION = "v1"  # bump when anything below changes, so stale caches are not reused
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# positions of the embedded model: prompt and response together (cli caps the lengths)
CONTEXT = 256
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(corpus: list[str], special=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL + list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def text_config(tokenizer):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                       eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


def build_model(tokenizer, seed: int, task: str = "addition"):
    """(model, processor): the text model, or (image-addition) a LLaVA of a CLIP-style tower and
    the same text model, with the LlavaProcessor that goes with it (None for text)."""
    from transformers import (
        AutoModelForCausalLM,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    torch.manual_seed(seed)
    processor = None
    if task == "image-addition":
        size = data.IMAGE_SIZE
        tower = CLIPVisionConfig(image_size=size, patch_size=12, hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4)
        config = LlavaConfig(vision_config=tower, text_config=text_config(tokenizer),
                             image_token_id=tokenizer.convert_tokens_to_ids(vision.MARKER),
                             vision_feature_layer=-1, vision_feature_select_strategy="default",
                             tie_word_embeddings=True)
        model = LlavaForConditionalGeneration(config)
        # the whole processor, as a LLaVA checkpoint ships it (vLLM runs it on the images)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                  crop_size={"height": size, "width": size}),
            tokenizer=tokenizer, patch_size=tower.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:
        model = AutoModelForCausalLM.from_config(text_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def task_digits(task, digits):
    return 2 if task == "image-addition" else digits


def task_rows(task, pairs, seed, digits=3):
    """The built-in task's rows for (a, b) pairs (images rendered with `seed`) and their worked
    solutions."""
    if task == "image-addition":
        rng = random.Random(seed)
        return ([data.image_addition_row(a, b, rng) for a, b in pairs],
                [data.image_addition_solution(a, b) for a, b in pairs])
    return ([data.addition_row(a, b, digits) for a, b in pairs],
            [data.addition_solution(a, b, digits) for a, b in pairs])


def sft_batch(tokenizer, rows, solutions):
    """(input_ids, attention_mask, labels, the images' tensors or None): prompt + worked solution
    + EOS, right-padded, labels only on the solution and EOS (-100 elsewhere)."""
    prompts = data.prompt_token_ids(tokenizer, rows)
    targets = [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for s in solutions]
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    ids, labels, attn = [], [], []
    for p, t in zip(prompts, targets):
        pad = width - len(p) - len(t)
        ids.append(p + t + [tokenizer.pad_token_id] * pad)
        labels.append([-100] * len(p) + t + [-100] * pad)
        attn.append([1] * (len(p) + len(t)) + [0] * pad)
    pixels = data.row_pixels(tokenizer, rows)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(labels), \
        vision.collate(pixels) if pixels else None


def warm_up(model, tokenizer, target: float, seed: int, digits=3, max_steps=1000, batch_size=128,
            lr=1e-3, check_every=10, task="addition"):
    """Supervised steps on fresh problems until greedy validation accuracy >= target."""
    from tqdm import tqdm
    digits = task_digits(task, digits)
    valid_pairs = data.addition_pairs(300, data.VALID_SEED, digits=digits)
    valid, _ = task_rows(task, valid_pairs, data.VALID_SEED, digits)
    exclude = frozenset(data.addition_pairs(500, data.EVAL_SEED, digits=digits)) | \
        frozenset(valid_pairs)
    if task == "image-addition":  # 8,100 two-digit pairs in all: drawn with replacement
        rng = random.Random(seed)
        pairs = [p for p in (data.random_pair(rng, digits) for _ in range(max_steps * batch_size
                                                                           * 2))
                 if p not in exclude][:max_steps * batch_size]
    else:
        pairs = data.addition_pairs(max_steps * batch_size, seed, exclude, digits)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    acc, bar = 0.0, tqdm(range(1, max_steps + 1), desc=f"warm-up (until {target:.0%} right)",
                         dynamic_ncols=True)
    for step in bar:
        batch = task_rows(task, pairs[(step - 1) * batch_size:step * batch_size], seed + step,
                          digits)
        ids, attn, labels, pixels = sft_batch(tokenizer, *batch)
        loss = model(**vision.forward_inputs(model.config, ids, attn, pixels), labels=labels).loss
        if task == "image-addition":
            loss = loss + alignment_loss(model, tokenizer, batch[0], pixels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % check_every == 0:
            engine = rollout.HFRollout(model, tokenizer, max_response_len=solution_tokens(task,
                                                                                       digits))
            acc = rollout.evaluate(engine, tokenizer, valid, progress=False)["accuracy"]
            model.requires_grad_(True)
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", valid_acc=f"{acc:.1%}")
            if acc >= target:
                break
    bar.close()
    print(f"warm-up: {step} steps, validation accuracy {acc:.1%}")
    return acc


def alignment_loss(model, tokenizer, rows, pixels):
    """LLaVA's first stage (feature alignment), for the image task: the image tokens of the four
    cells that hold digits should read, through the text model's own (tied) output layer, as
    those digits. Without it the tiny model does not learn to read at all in 400 steps (the
    vision tower and the text model's routing must be found together); with it, reading takes
    off after ~200 (measured on this task)."""
    features = model.model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    logits = model.lm_head(torch.stack(list(features))[:, data.DIGIT_CELLS])  # [B, 4, V]
    digits = [f"{r['extra_info']['a']:02d}{r['extra_info']['b']:02d}" for r in rows]
    targets = torch.tensor([tokenizer.convert_tokens_to_ids(list(d)) for d in digits])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def solution_tokens(task, digits):
    return data.IMAGE_SOLUTION_TOKENS if task == "image-addition" else data.solution_tokens(digits)


def embedded_model(cache_dir: str, target: float = 0.3, seed: int = 0, digits: int = 3,
                   task: str = "addition") -> str:
    """Path of the cached embedded model of the built-in task (`digits`-digit addition, or
    image-addition), building it first if needed (atomic: a crash mid-build leaves no
    half-written model behind)."""
    if task == "image-addition":
        name = f"embedded-image-addition-{VERSION}-seed{seed}-target{target}"
    else:
        name = (f"embedded-addition-{VERSION}-seed{seed}-target{target}"
                + (f"-digits{digits}" if digits != 3 else ""))
    path = os.path.join(cache_dir, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    print(f"building the embedded {task} model in {path} (once)")
    rows, solutions = task_rows(task, data.addition_pairs(2000, seed,
                                                          digits=task_digits(task, digits)),
                                seed, task_digits(task, digits))
    train_text = [r["prompt"][-1]["content"] + s for r, s in zip(rows, solutions)]
    special = [vision.MARKER] if task == "image-addition" else []
    tokenizer = build_tokenizer(train_text + [CHAT_TEMPLATE] + SPECIAL, special)
    model, processor = build_model(tokenizer, seed, task)
    tokenizer.image_inputs = None if processor is None else \
        vision.ImageInputs(model.config, processor.image_processor, tokenizer)
    warm_up(model, tokenizer, target, seed, digits, task=task)
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # python bootstrap.py [DIGITS | image-addition]: build (or find) it
    import sys
    which = sys.argv[1] if sys.argv[1:] else "3"
    print(embedded_model(os.path.expanduser("~/.cache/prime"),
                         task="image-addition" if which == "image-addition" else "addition",
                         digits=3 if which == "image-addition" else int(which)))
