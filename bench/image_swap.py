"""Image-swap control: does the implicit PRM of an image-addition run read the image?

    python prime.py --task image-addition --save-every 50 --run-dir runs/img   # a PRIME run
    python bench/image_swap.py --run runs/img

Samples responses to held-out problems with the run's trained policy, then scores every token's
implicit reward q_t = beta * log(pi_phi / pi_ref) twice with the run's trained PRM (its newest
checkpoint) against the reference (the model the run started from): once with each problem's own
image, once with another problem's image (the next one's), the text unchanged. Reading steps
("a=37", "b=45") should depend on the image and adding steps ("7+5=12") much less: the
table gives, per kind of step, the mean |change in beta*q| per token and the mean beta*q per
token with the true and the swapped image, and the mean |change| in the reference's own
log-probs there, as a yardstick: how much the image matters to the model itself at those tokens.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import batching  # noqa: E402
import bootstrap  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import prime  # noqa: E402
import rollout  # noqa: E402


def step_kinds(tokenizer, rows, responses, mask):
    """[B, R]: data.PERCEPTION on the tokens of each response's first two steps, ARITHMETIC on
    the rest (the boxed answer included), 0 off the mask."""
    ends = data.step_end_mask(tokenizer, responses, data.IMAGE_STEP_SEPARATOR, mask.shape[1])
    _, step = prime.step_index(ends, mask)
    kind = torch.where(step < 2, data.PERCEPTION, data.ARITHMETIC)
    return kind * mask.long()


def token_q(prm, ref, tokenizer, batch, images, beta, args):
    """(q [B, R], the reference's log-probs [B, R]) of a collated batch with `images` (a list per
    row) as the rows' images."""
    pixels = tokenizer.image_inputs.each_pixels(images)
    full = (*batch, pixels)
    logps = {name: prime.batched_logprobs(model, full, args, {1.0})[1.0]
             for name, model in (("prm", prm), ("ref", ref))}
    return prime.implicit_rewards(logps["prm"], logps["ref"], batch[2]) * beta, logps["ref"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory of a --task image-addition run")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems")
    parser.add_argument("--samples", type=int, default=2, help="responses per problem")
    parser.add_argument("--temperature", type=float, default=0.7)
    a = parser.parse_args()
    flags = checkpoint.read_args(a.run)
    if flags is None or flags.get("task") != "image-addition":
        parser.error(f"--run {a.run}: not the run directory of a --task image-addition run")
    newest = checkpoint.checkpoints(a.run)
    if not newest:
        parser.error(f"--run {a.run}: no checkpoint (run it with --save-every)")
    torch.manual_seed(0)
    reference = flags["model"] or bootstrap.embedded_model(
        os.path.expanduser(flags["cache_dir"]), task="image-addition")
    device = torch.device("cpu")
    tokenizer = data.load_tokenizer(reference)
    policy = distributed.load_model(os.path.join(newest[-1], "policy"), device, trained=False)
    prm = distributed.load_model(os.path.join(newest[-1], "prm"), device, trained=False)
    ref = distributed.load_model(reference, device, trained=False)
    rows = data.image_addition_rows(a.problems, data.EVAL_SEED)
    rows = [r for r in rows for _ in range(a.samples)]
    engine = rollout.HFRollout(policy, tokenizer, data.IMAGE_SOLUTION_TOKENS, a.temperature)
    prompts = data.prompt_token_ids(tokenizer, rows)
    responses, _ = engine.generate(prompts, images=[r["images"] for r in rows])
    batch = batching.collate(prompts, responses, engine.pad_id)
    mask = batch[2]
    args = prime.Args(micro_batch_size=64, share_prompts=False)
    true_images = [r["images"] for r in rows]
    # the next problem's image (a problem's samples are adjacent: skip past them)
    swapped = true_images[a.samples:] + true_images[:a.samples]
    q_true, ref_true = token_q(prm, ref, tokenizer, batch, true_images, flags["beta"], args)
    q_swap, ref_swap = token_q(prm, ref, tokenizer, batch, swapped, flags["beta"], args)
    kinds = step_kinds(tokenizer, rows, responses, mask)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    right = sum(data.first_wrong_step(r, t) == -1 for r, t in zip(rows, texts))
    print(f"{len(rows)} responses ({right} right) to {a.problems} held-out problems, "
          f"checkpoint {newest[-1]}\n")
    print("| steps | tokens | mean abs(change) in beta*q | mean beta*q, own image "
          "| ... swapped image | mean abs(change) in the reference's log pi |")
    print("|---|---:|---:|---:|---:|---:|")
    table = {}
    for name, kind in (("reading (a=.., b=..)", data.PERCEPTION), ("adding", data.ARITHMETIC)):
        on = kinds == kind
        n = int(on.sum())
        row = {"tokens": n, "abs_change": (q_swap - q_true).abs()[on].mean().item(),
               "q_true": q_true[on].mean().item(), "q_swapped": q_swap[on].mean().item(),
               "ref_abs_change": (ref_swap - ref_true).abs()[on].mean().item()}
        table[name] = row
        print(f"| {name} | {n} | {row['abs_change']:.4f} | {row['q_true']:+.4f} "
              f"| {row['q_swapped']:+.4f} | {row['ref_abs_change']:.3f} |")
    with open(os.path.join(a.run, "image_swap.json"), "w") as f:
        json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
