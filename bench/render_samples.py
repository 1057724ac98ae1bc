"""Draw a run's samples.jsonl as one self-contained HTML page: every response's tokens coloured
by their implicit process reward beta*q_t (green credited, red blamed, white ~0), its outcome,
grouped by training step, so you can see what the PRM credits and blames and how that changes.

    python bench/render_samples.py RUN_DIR            # writes RUN_DIR/samples.html
    bash bench/screenshot_samples.sh RUN_DIR          # renders it in headless Chromium to a PNG
"""
import argparse
import html
import json
import os


def colour(reward: float, scale: float) -> str:
    """Background for a reward: darker with sqrt(|reward| / scale), scale = the page's largest
    |reward| (the square root keeps the many small rewards visible next to a few large ones)."""
    x = min(abs(reward) / scale, 1.0) ** 0.5 if scale > 0 else 0.0
    light = round(100 - 45 * x)
    return f"hsl({120 if reward >= 0 else 0}, 70%, {light}%)"


def render(samples: list[dict]) -> str:
    scale = max((abs(r) for s in samples for r in s["rewards"]), default=0.0)
    parts = ["<!doctype html><meta charset='utf-8'>"
             "<title>prime: token-level implicit rewards</title>",
             "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}"
             ".r{font-family:monospace;white-space:pre-wrap;line-height:1.9;margin:.3em 0 1em}"
             ".t{padding:1px 0;border-radius:2px}.ok{color:#080}.bad{color:#b00}</style>",
             "<h1>Token-level implicit process rewards</h1>",
             f"<p>Each token's background is its reward &beta;&middot;q<sub>t</sub>: green = "
             f"credited, red = blamed; full colour = &plusmn;{scale:.3g}, the largest on this "
             f"page. Hover a token for its value.</p>"]
    if not any(s["rewards"] for s in samples):
        parts.append("<p>No process rewards in these samples (an outcome-only run).</p>")
    for step in sorted({s["step"] for s in samples}):
        parts.append(f"<h2>step {step}</h2>")
        for s in (s for s in samples if s["step"] == step):
            ok = s["outcome"] >= 1
            parts.append(f"<div>outcome <b class='{'ok' if ok else 'bad'}'>{s['outcome']:g}</b>"
                         + (f" &mdash; prompt: <code>{html.escape(s['prompt'])}</code>"
                            if s.get("prompt") else "") + "</div>")
            for image in s.get("images", []):  # what the model saw (a vision-language task)
                parts.append(f"<img src='data:image/png;base64,{image}' width='144' "
                             f"style='image-rendering:pixelated;float:left;margin:0 1em 0 0'>")
            rewards = s["rewards"] or [0.0] * len(s["tokens"])
            spans = "".join(f"<span class='t' style='background:{colour(r, scale)}' "
                            f"title='{r:+.4g}'>{html.escape(t)}</span>"
                            for t, r in zip(s["tokens"], rewards))
            parts.append(f"<div class='r'>{spans}</div><div style='clear:both'></div>")
    return "\n".join(parts) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a prime run directory with samples.jsonl")
    args = parser.parse_args()
    path = os.path.join(args.run_dir, "samples.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: samples are written at each eval of a training run")
    with open(path) as f:
        samples = [json.loads(line) for line in f]
    out = os.path.join(args.run_dir, "samples.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(render(samples))
    print(f"{len(samples)} samples -> {out}")


if __name__ == "__main__":
    main()
