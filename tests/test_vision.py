"""Vision-language models: image rows through loading, prompts, generation and scoring, for both
families (LLaVA, Qwen2-VL); the built-in image task and its step truth."""

import base64
import io
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, image_rows, run_prime, tiny_vlm_dir

import batching
import data
import rollout
import vision


@pytest.mark.parametrize("family,size", [("llava", 32), ("qwen2_vl", 56), ("qwen2_5_vl", 56)])
def test_generation_and_scoring_agree(tmp_path, family, size):
    """The HF engine samples with images (left-padded prompts of different lengths); the
    trainer's path (training_batch, micro_batches, response_logprobs) scores the same tokens
    with the same log-probs: the positions (LLaVA: from the mask; Qwen2-VL: 3D, built by the
    model) and the image tokens are right."""
    torch.manual_seed(0)
    path = tiny_vlm_dir(tmp_path / family, family)
    tokenizer = data.load_tokenizer(path)
    assert tokenizer.image_inputs.family == ("llava" if family == "llava" else "qwen2_vl")
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    rows = image_rows(4, size)
    prompts = data.prompt_token_ids(tokenizer, rows)
    per_image = tokenizer.image_inputs.tokens_per_image(rows[0]["images"])
    assert [p.count(model.config.image_token_id) for p in prompts] == per_image * 4
    assert per_image == ([16] if family == "llava" else [4])
    assert len({len(p) for p in prompts}) == 3  # ragged: left padding matters
    engine = rollout.HFRollout(model, tokenizer, max_response_len=6)
    responses, engine_logps = engine.generate(prompts, images=[r["images"] for r in rows])
    groups = batching.Groups(prompts, responses, rows, engine_logps, torch.zeros(4))
    args = type(
        "A", (), dict(granularity="token", micro_batch_size=3, max_tokens_per_micro_batch=0)
    )()
    batch, engine_logp, _, _ = batching.training_batch(
        groups, tokenizer, args, engine.pad_id, torch.device("cpu"), with_truth=False
    )
    mask, scored = batch[2], torch.zeros_like(batch[2])
    splits = list(batching.micro_batches(args, batch, torch.arange(4)))
    assert len(splits) == 2 and all("pixel_values" in inputs for _, inputs, _ in splits)
    with torch.no_grad():
        for idx, inputs, r in splits:
            logp = batching.response_logprobs(model, inputs, r, {1.0}, share_prompts=True)[1.0]
            scored[idx] = batching.padded(logp, mask.shape[1]) * mask[idx]
    gap = ((scored - engine_logp).abs() * mask).max().item()
    assert gap < 1e-5, gap
    # the engine's own log-probs are far from uniform: a position error would show
    assert (engine_logp * mask).sum() / mask.sum() > -5.0


def test_qwen2_vl_needs_its_own_positions(tmp_path):
    """What vision.forward_inputs guards against: 2D position ids given to Qwen2-VL change its
    scores (it copies them to all three M-RoPE rows)."""
    path = tiny_vlm_dir(tmp_path / "q", "qwen2_vl")
    tokenizer = data.load_tokenizer(path)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    rows = image_rows(2, 56)
    ids, attn = batching.left_pad(data.prompt_token_ids(tokenizer, rows), tokenizer.pad_token_id)
    pixels = vision.collate(data.row_pixels(tokenizer, rows))
    inputs = vision.forward_inputs(model.config, ids, attn, pixels)
    assert "position_ids" not in inputs and inputs["mm_token_type_ids"].sum() == 8
    with torch.no_grad():
        right = model(**inputs).logits
        wrong = model(**inputs, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    assert (right - wrong).abs().max() > 1e-2


def test_vllm_gets_one_placeholder_per_image(tmp_path):
    path = tiny_vlm_dir(tmp_path / "l", "llava")
    tokenizer = data.load_tokenizer(path)
    image_id = tokenizer.image_inputs.image_token_id
    row = dict(image_rows(1, 32)[0])
    row["images"] = row["images"] * 2
    row["prompt"] = [
        {"role": "user", "content": f"{vision.MARKER}{vision.MARKER}and{vision.MARKER}"}
    ]
    row["images"] = row["images"] + row["images"][:1]
    ids = data.prompt_token_ids(tokenizer, [row])[0]
    assert ids.count(image_id) == 48
    collapsed = tokenizer.image_inputs.collapse(ids)
    assert collapsed.count(image_id) == 3 and len(collapsed) == len(ids) - 45


def png_bytes(array):
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_image_rows_from_parquet_and_jsonl(tmp_path):
    """verl's layout: parquet stores {"bytes", "path"} structs; jsonl gives paths (relative to
    the file). Both decode to the same RGB arrays; bad rows are named by file, row and field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes(image))
    row = {
        "data_source": "geo",
        "ability": "math",
        "prompt": [{"role": "user", "content": "<image>What is it?"}],
        "reward_model": {"ground_truth": "1", "style": "rule"},
    }
    pq.write_table(
        pa.Table.from_pylist([dict(row, images=[{"bytes": png_bytes(image), "path": None}])]),
        tmp_path / "train.parquet",
    )
    (tmp_path / "rows.jsonl").write_text(json.dumps(dict(row, images=["img/a.png"])) + "\n")
    for name in ("train.parquet", "rows.jsonl"):
        rows, _ = data.load_rows([str(tmp_path / name)])
        assert np.array_equal(rows[0]["images"][0], image)
    bad = [
        dict(row, images=[]),
        dict(row, images=["img/a.png", "img/a.png"]),
        dict(row, images=["img/missing.png"]),
        dict(row, images=[{"bytes": "bm90IGFuIGltYWdl"}]),
        dict(row, images=[{"bytes": None, "path": None}]),
    ]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bad))
    f = data.RowFile(str(tmp_path / "bad.jsonl"))
    errors = []
    for i in range(len(f)):
        with pytest.raises(data.DataError) as e:
            data.validate_row(*reversed(f.row(i)))
        errors.append(str(e.value))
    where = str(tmp_path / "bad.jsonl")
    assert errors[0] == f"{where}:1: field 'prompt' has <image> markers but the row has no 'images'"
    assert errors[1].startswith(f"{where}:2: field 'images' has 2 images for 1 <image> markers")
    assert (
        errors[2] == f"{where}:3: field 'images[0]' no such image file: {tmp_path}/img/missing.png"
    )
    assert errors[3] == f"{where}:4: field 'images[0]' 'bytes' must be image bytes, got str"
    assert errors[4].startswith(f"{where}:5: field 'images[0]' must be image bytes")


def test_text_model_refuses_image_rows(tiny_model_dir):
    tokenizer = data.load_tokenizer(tiny_model_dir)
    assert tokenizer.image_inputs is None
    with pytest.raises(data.DataError, match="need a vision-language --model"):
        data.prompt_token_ids(tokenizer, image_rows(1, 8))


def test_image_task_and_its_step_truth():
    rng = random.Random(0)
    row = data.image_addition_row(37, 45, rng)
    image = row["images"][0]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert data.image_addition_solution(37, 45) == "a=37;b=45;7+5=12;3+4+1=8;\\boxed{82}"
    # the same seed draws the same image; another draw of the same numbers differs (noise)
    assert np.array_equal(data.image_addition_row(37, 45, random.Random(0))["images"][0], image)
    assert not np.array_equal(data.image_addition_row(37, 45, rng)["images"][0], image)
    cases = {
        "a=37;b=45;7+5=12;3+4+1=8;\\boxed{82}": (-1, data.NO_ERROR),
        "a=31;b=45;1+5=6;3+4=7;\\boxed{76}": (0, data.PERCEPTION),
        "a=37;b=46;7+6=13;3+4+1=8;\\boxed{83}": (1, data.PERCEPTION),
        "a=37;b=45;7+5=11;3+4+1=8;\\boxed{81}": (2, data.ARITHMETIC),
        "a=37;b=45;7+5=12;3+4+1=8;\\boxed{83}": (4, data.ARITHMETIC),
        "a=37;b=45;7+5=12": (2, data.ARITHMETIC),
    }  # stopped early: its last step
    for text, (first, kind) in cases.items():
        assert data.first_wrong_step(row, text) == first, text
        assert data.step_kind(row, first) == kind, text
    # the text task's steps are all arithmetic
    assert data.step_kind(data.addition_row(345, 678), 0) == data.ARITHMETIC
    stream = data.ImageAdditionStream(0, data.image_addition_rows(50, data.EVAL_SEED))
    held_out = {
        (r["extra_info"]["a"], r["extra_info"]["b"])
        for r in data.image_addition_rows(50, data.EVAL_SEED)
    }
    drawn = stream.take(200)
    assert all(10 <= r["extra_info"]["a"] <= 99 for r in drawn)
    assert not {(r["extra_info"]["a"], r["extra_info"]["b"]) for r in drawn} & held_out


def test_image_task_runs_end_to_end(tmp_path, fake_verifier):
    """--task image-addition with a small LLaVA: two PRIME steps on image rows (policy, PRM and
    reference all see the images), the PRM's first-error hit split by the kind of the first
    wrong step, and a checkpoint that loads back as a vision-language model."""
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_vlm_dir(tmp_path / "llava", "llava")
    out = run_prime(model_dir, tmp_path / "run", task="image-addition", save_every=2)
    last = out["metrics"][-1]
    assert {
        "prm/first_error_hit",
        "prm/first_error_hit_perception",
        "prm/first_error_hit_arithmetic",
    } <= set(last)
    # an untrained model's responses go wrong at their first step, reading a: perception
    assert 0 <= last["prm/first_error_hit_perception"] <= 1
    assert last["prm/first_error_hit_arithmetic"] != last["prm/first_error_hit_arithmetic"]  # nan
    policy = os.path.join(out["run_dir"], "checkpoint-000002", "policy")
    trained = AutoModelForImageTextToText.from_pretrained(policy)
    initial = AutoModelForImageTextToText.from_pretrained(model_dir)
    name = "model.vision_tower.embeddings.patch_embedding.weight"
    assert not torch.equal(trained.get_parameter(name), initial.get_parameter(name))
    assert data.load_tokenizer(policy).image_inputs.family == "llava"
    # the processor as the model shipped it (vLLM reads its patch_size to expand images)
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(policy).patch_size == 8
    # samples.jsonl carries each sample's image; render_samples draws it beside the rewards
    with open(os.path.join(out["run_dir"], "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(samples[0]["images"][0])))
    assert image.size == (48, 48) and len(samples[0]["rewards"]) == len(samples[0]["tokens"])
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import render_samples

    page = render_samples.render(samples)
    assert page.count("<img src='data:image/png;base64,") == len(samples)


def test_a_sampled_image_placeholder_ends_the_response_before_it(tmp_path):
    """The policy can sample the image token (it is in the vocabulary), but the model would take
    it for an image in training: generation stops there and the response is cut before it."""
    model_dir = tiny_vlm_dir(tmp_path / "llava", "llava")
    tokenizer = data.load_tokenizer(model_dir)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    image_id = tokenizer.image_inputs.image_token_id
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
    with torch.no_grad():  # an untied head whose bias makes the placeholder the likeliest token
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[image_id] = 8.0
    model.lm_head = head
    rows = image_rows(8, 32)
    prompts = data.prompt_token_ids(tokenizer, rows)
    engine = rollout.HFRollout(model, tokenizer, max_response_len=6)
    torch.manual_seed(0)
    responses, logps = engine.generate(prompts, images=[r["images"] for r in rows])
    assert all(image_id not in r for r in responses)
    assert [len(lp) for lp in logps] == [len(r) for r in responses]
    assert any(len(r) < 6 and tokenizer.eos_token_id not in r for r in responses)  # cut short
    # the vLLM engine's answer is cut the same way
    assert rollout.cut_placeholders(
        [[5, 6, image_id], [5, 2]], [[-1.0, -2.0, -3.0], [-1.0, -2.0]], [image_id]
    ) == ([[5, 6], [5, 2]], [[-1.0, -2.0], [-1.0, -2.0]])


def test_an_unknown_vision_language_family_is_refused_in_one_line(tmp_path):
    path = tiny_vlm_dir(tmp_path / "llava", "llava")
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    config["model_type"] = "idefics3"
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    with pytest.raises(data.DataError, match="idefics3: vision-language models supported are"):
        data.load_tokenizer(path)
