"""Datasets and prompts for prime: what a fork replaces to train on another task.

A row follows the schema of PRIME-RL/Eurus-2-RL-Data:

    {"data_source": str, "ability": "math" | "code",
     "prompt": [{"role": "system", "content": str}, {"role": "user", "content": str}],
     "reward_model": {"ground_truth": str, "style": "rule"},   # code: a JSON string of tests
     "extra_info": {...}}                                       # optional, carried along

- The built-in task: N-digit addition (3 by default) whose worked solution (one carry-annotated
  step per column) ends in \\boxed{sum}, scored by the same math verifier as real data, with its
  step truth (`first_wrong_step`: where a wrong answer went wrong).
- The built-in image task (--task image-addition): two 2-digit numbers rendered in an image, a
  worked answer that reads them (perception steps), then adds (arithmetic steps).
- `data_files`, `RowFile`, `RowStream`: .parquet (as the dataset ships) and .jsonl files, folders
  and globs, read and checked as rows are drawn (file, row and field named for anything bad); a
  row may carry `images` (verl's multimodal layout: one <image> marker per image in its prompt);
  `load_rows` reads an eval set whole. `load_task`: what a run trains and evaluates on.
- Prompts through the tokenizer's chat template. (The trainer's batches are batching.py's.)
"""
import bisect
import glob
import json
import os
import random
import re

import numpy as np
import torch

import distributed
import sandbox
import vision

ABILITIES = ("math", "code")


class DataError(ValueError):
    """A data file or row that cannot be used, named by file, row and field (one line for the
    user)."""


# ----------------------------------------------------------------------------------------------
# The built-in task: N-digit addition (3 by default) with a worked solution, one step per column
STEP_SEPARATOR = ","  # ends each step of a worked solution


def addition_question(a: int, b: int) -> str:
    return f"{a}+{b}="


def addition_solution(a: int, b: int, digits: int = 3) -> str:
    """Column addition, least significant digit first: '345+678=' ->
    '5+8=13,4+7+1=12,3+6+1=10,\\boxed{1023}'. Each step is one digit column plus the carry, so a
    wrong answer has a first wrong step: the token-level credit a process reward can give. An
    early mistake decides the outcome (its carry runs through every later column)."""
    steps, carry = [], 0
    for da, db in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}")):
        s = int(da) + int(db) + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    return STEP_SEPARATOR.join(steps) + f"{STEP_SEPARATOR}\\boxed{{{a + b}}}"


def solution_tokens(digits: int) -> int:
    """Tokens a worked solution and its EOS may take (48 for 3 digits, --max-response-len's
    default)."""
    return 10 * digits + 18


def addition_row(a: int, b: int, digits: int = 3) -> dict:
    return {"data_source": "embedded/addition" + (f"{digits}" if digits != 3 else ""),
            "ability": "math",
            "prompt": [{"role": "user", "content": addition_question(a, b)}],
            "reward_model": {"ground_truth": str(a + b), "style": "rule"}}


def worked_steps(row: dict) -> list[str] | None:
    """The steps of a built-in row's worked solution (the boxed answer last), or None for rows
    without step truth (any other data)."""
    source = row.get("data_source", "")
    if source == IMAGE_TASK:
        a, b = row["extra_info"]["a"], row["extra_info"]["b"]
        return image_addition_solution(a, b).split(IMAGE_STEP_SEPARATOR)
    match = re.fullmatch(r"(\d+)\+(\d+)=", row["prompt"][-1]["content"])
    if not source.startswith("embedded/addition") or match is None:
        return None
    a, b = map(int, match.groups())
    return addition_solution(a, b, len(match.group(1))).split(STEP_SEPARATOR)


def step_separator(row: dict) -> str:
    return IMAGE_STEP_SEPARATOR if row.get("data_source") == IMAGE_TASK else STEP_SEPARATOR


def first_wrong_step(row: dict, text: str) -> int | None:
    """The task's step truth: for a built-in row, the index of the first step (the boxed answer
    is the last) where `text` departs from the worked solution, or -1 if it does not; None for
    rows without step truth (any other data)."""
    truth = worked_steps(row)
    if truth is None:
        return None
    steps = text.split(step_separator(row))
    first = next((i for i in range(max(len(truth), len(steps)))
                  if i >= len(truth) or i >= len(steps) or steps[i] != truth[i]), -1)
    return min(first, len(steps) - 1)  # a response that stops early went wrong in its last step


# what kind of step went wrong first: none (right, or no step truth), reading the image, adding
NO_ERROR, PERCEPTION, ARITHMETIC = 0, 1, 2


def step_kind(row: dict, step: int | None) -> int:
    """The kind of a row's step `step` (first_wrong_step's answer): the image task's first two
    steps read the numbers off the image (PERCEPTION); every other step of a built-in task is
    ARITHMETIC; NO_ERROR for -1 or None."""
    if step is None or step < 0:
        return NO_ERROR
    return PERCEPTION if row.get("data_source") == IMAGE_TASK and step < 2 else ARITHMETIC


def step_truth(tokenizer, rows, responses, width):
    """(step ends [B, width], first wrong step [B] (-1 where none), its kind [B] (step_kind)) of
    `responses` (token-id lists) to `rows`, steps split at the task's separator; None if no row
    has step truth."""
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    first = [first_wrong_step(row, text) for row, text in zip(rows, texts)]
    if all(f is None for f in first):
        return None
    ends = torch.zeros(len(rows), width)
    for separator in {step_separator(row) for row in rows}:
        which = [i for i, row in enumerate(rows) if step_separator(row) == separator]
        ends[which] = step_end_mask(tokenizer, [responses[i] for i in which], separator, width)
    return (ends, torch.tensor([-1 if f is None else f for f in first]),
            torch.tensor([step_kind(row, f) for row, f in zip(rows, first)]))


def random_pair(rng: random.Random, digits: int) -> tuple[int, int]:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    return rng.randint(lo, hi), rng.randint(lo, hi)


def addition_pairs(n: int, seed: int, exclude: frozenset = frozenset(),
                   digits: int = 3) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs of `digits`-digit numbers, none in `exclude` (keeps eval problems
    out of training: 'fresh problems of the same family')."""
    rng, pairs = random.Random(seed), {}
    while len(pairs) < n:
        pair = random_pair(rng, digits)
        if pair not in exclude:
            pairs[pair] = None  # a dict keeps insertion order, so the list is seed-deterministic
    return list(pairs)


def addition_rows(n: int, seed: int, exclude: frozenset = frozenset(),
                  digits: int = 3) -> list[dict]:
    return [addition_row(a, b, digits) for a, b in addition_pairs(n, seed, exclude, digits)]


# Fixed seeds keep the held-out set identical across runs, so eval numbers are comparable.
EVAL_SEED, VALID_SEED = 1234, 4321


def embedded_eval_rows(n: int, digits: int = 3) -> list[dict]:
    return addition_rows(n, EVAL_SEED, digits=digits)


class AdditionStream:
    """An endless stream of fresh training problems, never one of the held-out eval problems."""
    counts = {}  # nothing to skip or drop (see RowStream)

    def __init__(self, seed: int, eval_rows: list[dict], digits: int = 3):
        self.rng, self.digits = random.Random(seed), digits
        self.exclude = {row["prompt"][-1]["content"] for row in eval_rows}

    def state_dict(self) -> dict:  # the data position, for exact resume
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])

    def take(self, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            a, b = random_pair(self.rng, self.digits)
            if addition_question(a, b) not in self.exclude:
                rows.append(addition_row(a, b, self.digits))
        return rows


# ----------------------------------------------------------------------------------------------
# The built-in image task (--task image-addition): an image shows two 2-digit numbers; the worked
# answer reads them off the image, then adds column by column:
#     a=37;b=45;7+5=12;3+4+1=8;\boxed{82}
# so each step is either PERCEPTION (the first two) or ARITHMETIC, and the first wrong step of any
# response is known. Rendered with numpy (a 3x5 bitmap font, no image library needed): each digit
# in a 12x12 cell of a 48x48 image (a 4x4 grid of 12-pixel patches), shifted, dimmed and noised at
# random, so reading is learnt, not given.
IMAGE_TASK, IMAGE_STEP_SEPARATOR, IMAGE_SIZE = "embedded/image-addition", ";", 48
DIGIT_CELLS = [5, 6, 9, 10]  # the 12-pixel patches (row-major, 4 a row) of a's and b's digits
IMAGE_SOLUTION_TOKENS = 40  # a worked answer (at most 32 tokens) and its EOS, room to err
FONT = ["111101101101111", "010110010010111", "111001111100111", "111001111001111",
        "101101111001001", "111100111001111", "111100111101111", "111001001001001",
        "111101111101111", "111101111001111"]  # 0-9: 5 rows of 3 pixels


def render_numbers(a: int, b: int, rng: random.Random):
    """RGB uint8 [48, 48, 3]: a on the second row of cells, b on the third, right-aligned,
    each glyph drawn 2x (6x10 pixels), the whole shifted by up to 2 pixels, with random
    brightness and noise."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
    for row, number in ((1, a), (2, b)):
        for col, digit in zip((1, 2), f"{number:02d}"):
            glyph = np.array([int(p) for p in FONT[int(digit)]], np.float32).reshape(5, 3)
            y, x = 12 * row + 1 + dy, 12 * col + 3 + dx
            image[y:y + 10, x:x + 6] = np.kron(glyph, np.ones((2, 2))) * rng.uniform(0.5, 1.0)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 0.15, (IMAGE_SIZE,) * 2 + (3,))
    return (np.clip(image[..., None] + noise, 0, 1) * 255).astype(np.uint8)


def image_addition_solution(a: int, b: int) -> str:
    """Read both numbers, then column addition (addition_solution's steps)."""
    columns = addition_solution(a, b, 2).replace(STEP_SEPARATOR, IMAGE_STEP_SEPARATOR)
    return f"a={a}{IMAGE_STEP_SEPARATOR}b={b}{IMAGE_STEP_SEPARATOR}{columns}"


def image_addition_row(a: int, b: int, rng: random.Random) -> dict:
    return {"data_source": IMAGE_TASK, "ability": "math",
            "prompt": [{"role": "user", "content": f"{vision.MARKER}Add the two numbers."}],
            "reward_model": {"ground_truth": str(a + b), "style": "rule"},
            "images": [render_numbers(a, b, rng)], "extra_info": {"a": a, "b": b}}


def image_addition_rows(n: int, seed: int, exclude: frozenset = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    return [image_addition_row(a, b, rng) for a, b in addition_pairs(n, seed, exclude, 2)]


class ImageAdditionStream(AdditionStream):
    """AdditionStream's fresh problems (never a held-out pair), as image rows."""

    def __init__(self, seed: int, eval_rows: list[dict]):
        self.rng, self.digits = random.Random(seed), 2
        self.exclude = {(r["extra_info"]["a"], r["extra_info"]["b"]) for r in eval_rows}

    def take(self, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            a, b = random_pair(self.rng, 2)
            if (a, b) not in self.exclude:
                rows.append(image_addition_row(a, b, self.rng))
        return rows


class RowStream:
    """Training rows drawn from `files` (RowFile), reshuffled every epoch (seeded), checked as they
    are drawn, so start-up does not grow with the dataset: a bad row stops the run naming its
    file, row and field (with skip_bad_rows it is skipped), a prompt longer than max_prompt_len
    tokens is dropped, and both are counted in `counts` (logged every step)."""

    def __init__(self, files, seed: int, tokenizer, max_prompt_len: int,
                 skip_bad_rows: bool = False):
        self.files, self.tokenizer, self.max_prompt_len = files, tokenizer, max_prompt_len
        self.skip_bad_rows = skip_bad_rows
        self.starts = [0]  # global row index of each file's first row
        for f in files:
            self.starts.append(self.starts[-1] + len(f))
        self.rng, self.order, self.usable = random.Random(seed), [], None
        self.counts = {"skipped_bad_rows": 0, "dropped_long_prompts": 0}

    def state_dict(self) -> dict:  # the data position, for exact resume
        return {"rng": self.rng.getstate(), "order": list(self.order), "usable": self.usable,
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])
        self.order, self.usable, self.counts = (list(state["order"]), state["usable"],
                                                dict(state["counts"]))

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self.order:
                if self.usable == 0:  # a whole epoch without a usable row
                    raise DataError(f"--data: no usable rows "
                                    f"({self.counts['skipped_bad_rows']} bad, "
                                    f"{self.counts['dropped_long_prompts']} prompts longer than "
                                    f"--max-prompt-len {self.max_prompt_len} tokens)")
                self.order, self.usable = list(range(self.starts[-1])), 0
                self.rng.shuffle(self.order)
            i = self.order.pop()
            f = bisect.bisect_right(self.starts, i) - 1
            where, row = self.files[f].row(i - self.starts[f])
            try:
                row = validate_row(row, where)
            except DataError as e:
                if not self.skip_bad_rows:
                    raise DataError(f"{e} (--skip-bad-rows skips such rows)") from None
                self.counts["skipped_bad_rows"] += 1
                continue
            if len(prompt_token_ids(self.tokenizer, [row])[0]) > self.max_prompt_len:
                self.counts["dropped_long_prompts"] += 1
                continue
            self.usable += 1
            out.append(row)
        return out


def step_end_mask(tokenizer, responses, separator, width):
    """1 on each response token whose text contains `separator` (it ends a reasoning step), as
    [B, width] for responses given as token-id lists. Tokens are decoded one by one: a token's
    text is its span of the response, so step boundaries fall on token boundaries."""
    distinct = sorted({token for ids in responses for token in ids})  # each decoded once
    texts = tokenizer.batch_decode([[token] for token in distinct])
    is_end = {token: separator in text for token, text in zip(distinct, texts)}
    ends = torch.zeros(len(responses), width)
    for i, ids in enumerate(responses):
        ends[i, :len(ids)] = torch.tensor([float(is_end[token]) for token in ids])
    return ends


# ----------------------------------------------------------------------------------------------
# Loading Eurus-2-style rows
def validate_row(row, where: str) -> dict:
    """Raise a DataError naming `where` (file:row) and the field when `row` breaks the schema."""
    def fail(field, why):
        raise DataError(f"{where}: field '{field}' {why}")
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        fail("<row>", f"must be a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        fail("prompt", "must be a non-empty list of chat messages")
    for i, msg in enumerate(prompt):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)):
            fail(f"prompt[{i}]", "must be {'role': str, 'content': str}")
    if row.get("ability") not in ABILITIES:
        fail("ability", f"must be one of {ABILITIES}, got {row.get('ability')!r}")
    truth = (row.get("reward_model") or {}).get("ground_truth")
    if not isinstance(truth, str) or not truth.strip():
        fail("reward_model.ground_truth", "must be a non-empty string")
    if not isinstance(row.get("data_source", ""), str):
        fail("data_source", "must be a string")
    if not isinstance(row.get("extra_info") or {}, dict):
        fail("extra_info", "must be an object when present")
    images = row.get("images")
    if images is None or (isinstance(images, list) and not images):
        if any(vision.MARKER in m["content"] for m in prompt):
            fail("prompt", f"has {vision.MARKER} markers but the row has no 'images'")
        return row
    if not isinstance(images, list):
        fail("images", "must be a list of images (bytes, {'bytes': ...}, or paths)")
    markers = sum(m["content"].count(vision.MARKER) for m in prompt)
    if markers != len(images):
        fail("images", f"has {len(images)} images for {markers} {vision.MARKER} markers in the "
             f"prompt (one marker per image, in order)")
    decoded = []
    for i, image in enumerate(images):
        try:
            decoded.append(vision.decode(image, os.path.dirname(where.rsplit(":", 1)[0])))
        except ValueError as e:
            fail(f"images[{i}]", str(e))
    return dict(row, images=decoded)  # decoded once, as RGB arrays


def data_files(spec: str, split: str) -> list[str]:
    """The .parquet / .jsonl files of a --data or --eval-data value: comma-separated files, folders
    or globs. A folder gives the files under it whose name starts with the split's name (what
    `huggingface-cli download ... --local-dir D` leaves: D/data/train-*.parquet for "train",
    D/data/validation-*.parquet for "validation"), or, if none is so named, every data file in
    it."""
    files = []
    for part in filter(None, spec.split(",")):
        if os.path.isdir(part):
            found = sorted(p for p in glob.glob(os.path.join(part, "**", "*"), recursive=True)
                           if p.endswith(SUFFIXES))
            named = [p for p in found if os.path.basename(p).startswith(split)]
            matched = named or found
        else:
            matched = (sorted(glob.glob(part)) if glob.has_magic(part) else
                       [part] if os.path.isfile(part) else [])
        if not matched:
            raise DataError(f"{part}: no such file, or no .parquet / .jsonl file in that folder "
                            f"or glob")
        bad = [p for p in matched if not p.endswith(SUFFIXES)]
        if bad:
            raise DataError(f"{bad[0]}: expected a .parquet or .jsonl file")
        files += matched
    return files


SUFFIXES = (".parquet", ".jsonl")


class RowFile:
    """The rows of one .parquet or .jsonl file, read one at a time on demand, so that start-up does
    not grow with the file: a parquet file is held as an Arrow table (columnar, compact), a jsonl
    file as the byte offset of each non-blank line. row(i) -> (where, row, or the DataError of a
    line that is not JSON)."""

    def __init__(self, path: str):
        self.path = path
        if not path.endswith(SUFFIXES):
            raise DataError(f"{path}: expected a .parquet or .jsonl file")
        if path.endswith(".parquet"):
            import pyarrow.parquet
            self.table = pyarrow.parquet.read_table(path)
            missing = [c for c in ("prompt", "ability", "reward_model")
                       if c not in self.table.column_names]
            if missing:
                raise DataError(f"{path}: no column '{missing[0]}' (Eurus-2-RL-Data rows have "
                                f"prompt, ability, reward_model)")
            self.numbers = None
            self.size = self.table.num_rows
        else:
            self.offsets, self.numbers, offset = [], [], 0
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self.offsets.append(offset)
                        self.numbers.append(number)
                    offset += len(line)
            self.size = len(self.offsets)

    def __len__(self):
        return self.size

    def has_code_rows(self) -> bool:
        """Whether any row's ability is "code" (they need the sandbox), without parsing every
        row."""
        if self.numbers is None:
            return "code" in self.table.column("ability").unique().to_pylist()
        with open(self.path, "rb") as f:
            return re.search(rb'"ability"\s*:\s*"code"', f.read()) is not None

    def row(self, i: int):
        if self.numbers is None:
            return f"{self.path}:{i + 1}", self.table.slice(i, 1).to_pylist()[0]
        where = f"{self.path}:{self.numbers[i]}"
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            line = f.readline()
        try:
            return where, json.loads(line)
        except ValueError as e:  # json.JSONDecodeError, or bytes that are not UTF-8
            return where, DataError(f"{where}: not valid JSON ({e})")


def open_files(spec: str, split: str, skip_bad_rows: bool = False) -> list[RowFile]:
    """The RowFiles of a --data value. Each file's first row is checked now, so a file of the
    wrong kind fails at once; the rest are checked as they are drawn (RowStream)."""
    files = [RowFile(path) for path in data_files(spec, split)]
    if not sum(map(len, files)):
        raise DataError(f"{spec}: no rows")
    for f in files:
        if len(f) and not skip_bad_rows:
            validate_row(*reversed(f.row(0)))
    return files


def load_rows(paths: list[str], skip_bad_rows: bool = False) -> tuple[list[dict], list[str]]:
    """(rows, errors): every row of .parquet and .jsonl files, validated (the eval set, which is
    used whole). A bad row raises a DataError naming file, row and field; with skip_bad_rows it
    is left out and its error returned, so the caller can count and report what was skipped."""
    rows, errors = [], []
    for file in map(RowFile, paths):
        for i in range(len(file)):
            try:
                rows.append(validate_row(*reversed(file.row(i))))
            except DataError as e:
                if not skip_bad_rows:
                    raise
                errors.append(str(e))
    if not rows:
        raise DataError(f"no usable rows in {paths}"
                        + (f" ({len(errors)} bad, first: {errors[0]})" if errors else ""))
    return rows, errors


def load_task(args, embedded_model):
    """(model path, tokenizer, training stream, eval rows, data counts) for a run's Args. Files are
    opened and the eval rows read and checked before the embedded model is built (by
    `embedded_model(cache_dir)` when --model is empty), so a bad file fails in seconds; training
    rows are checked as they are drawn (RowStream). Code rows need the sandbox, or
    --allow-unsandboxed-code."""
    train, evals = open_task("" if args.eval_only else args.data, args.eval_data,
                             args.skip_bad_rows)
    if has_code_rows(train, evals):
        try:  # generated code runs sandboxed, or not at all unless the user says otherwise
            sandbox.require_sandbox(args.allow_unsandboxed_code)
        except sandbox.SandboxUnavailable as e:
            raise DataError(str(e)) from None
    model_path = args.model or distributed.local_first(
        lambda: embedded_model(os.path.expanduser(args.cache_dir), task=args.task,
                               digits=args.task_digits))
    tokenizer = load_tokenizer(model_path)
    verbose = distributed.rank() == 0
    return model_path, tokenizer, *task_streams(train, evals, tokenizer, args.seed,
                                                args.max_prompt_len, args.skip_bad_rows,
                                                args.eval_size, args.task_digits, verbose,
                                                args.task)


def load_tokenizer(model_path):
    """The model's tokenizer (left padding); a vision-language model's carries its image
    processor and placeholders as `image_inputs` (vision.ImageInputs; None for a text model)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    try:
        tokenizer.image_inputs = vision.ImageInputs.load(model_path, tokenizer)
    except ValueError as e:  # a vision-language family prime does not know
        raise DataError(f"--model {model_path}: {e}") from None
    return tokenizer


def open_task(train: str, evals: str, skip_bad_rows: bool = False):
    """(training RowFiles, (eval rows, errors) or None) of --data and --eval-data ('' = none): the
    files are opened and the eval rows read and checked, the training rows left for RowStream."""
    return (open_files(train, "train", skip_bad_rows) if train else [],
            load_rows(data_files(evals, "validation"), skip_bad_rows) if evals else None)


def has_code_rows(train, evals) -> bool:
    return (any(f.has_code_rows() for f in train)
            or any(r["ability"] == "code" for r in (evals or ([], []))[0]))


def task_streams(train, evals, tokenizer, seed, max_prompt_len, skip_bad_rows, eval_size, digits=3,
                 verbose=True, task="addition"):
    """(training stream, eval rows, counts for the step-0 metrics): RowStream over the training
    files, or the built-in `task` without them; the eval rows whose prompts fit, or the
    built-in held-out problems."""
    counts = {}
    if evals:
        eval_rows, counts = drop_long_prompts(tokenizer, *evals, max_prompt_len, verbose)
    elif task == "image-addition":
        eval_rows = image_addition_rows(eval_size, EVAL_SEED)
    else:
        eval_rows = embedded_eval_rows(eval_size, digits)
    if not train and task == "image-addition":
        return ImageAdditionStream(seed, eval_rows), eval_rows, counts
    if not train:
        return AdditionStream(seed, eval_rows, digits), eval_rows, counts
    counts["data/train_rows"] = sum(map(len, train))
    if verbose:
        print(f"data (train): {counts['data/train_rows']} rows in {len(train)} files, checked as "
              f"they are drawn (bad rows and prompts longer than --max-prompt-len are counted in "
              f"metrics.jsonl)")
    return RowStream(train, seed, tokenizer, max_prompt_len, skip_bad_rows), eval_rows, counts


def drop_long_prompts(tokenizer, rows, errors, max_prompt_len: int,
                      verbose=True) -> tuple[list, dict]:
    """(the eval rows whose prompt fits max_prompt_len tokens, counts for the step-0 metrics: rows
    kept, bad rows skipped, prompts dropped). Nothing vanishes silently: printed too."""
    lengths = [len(p) for p in prompt_token_ids(tokenizer, rows)]
    kept = [r for r, n in zip(rows, lengths) if n <= max_prompt_len]
    dropped = len(rows) - len(kept)
    if verbose:
        print(f"data (eval): {len(kept)} rows; {len(errors)} bad rows skipped"
              + (f" (first: {errors[0]})" if errors else "")
              + f"; {dropped} longer than --max-prompt-len dropped")
    if not kept:
        raise DataError(f"--eval-data: no rows left once prompts longer than --max-prompt-len "
                        f"({max_prompt_len} tokens) are dropped")
    return kept, {"data/eval_rows": len(kept), "data/eval_skipped_bad_rows": len(errors),
                  "data/eval_dropped_long_prompts": dropped}


# ----------------------------------------------------------------------------------------------
# Prompts
def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The chat rendered with the tokenizer's chat template, ready for the assistant's turn
    (add_generation_prompt=True). A tokenizer without a template (a base model) gets a plain
    fallback: "Role: content" per message, blank lines between, then "Assistant:"."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return ("\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
            + "\n\nAssistant:")


def prompt_token_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """Each row's prompt (see prompt_text) as token ids; the template carries any special
    tokens. A row with images: each <image> marker becomes the model's image placeholder,
    expanded to its image tokens (vision.ImageInputs, which a vision-language model's tokenizer
    carries as `image_inputs`)."""
    out = []
    for r in rows:
        text = prompt_text(tokenizer, r["prompt"])
        if r.get("images"):
            if getattr(tokenizer, "image_inputs", None) is None:
                raise DataError("rows with images need a vision-language --model (LLaVA, "
                                "Qwen2-VL/Qwen2.5-VL) or --task image-addition")
            out.append(tokenizer.image_inputs.token_ids(tokenizer, text, r["images"]))
        else:
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def row_pixels(tokenizer, rows: list[dict]) -> list:
    """Each row's image tensors (vision.ImageInputs.pixels), or None for a row without images;
    a row repeated (a group's K responses) is processed once. None for text-only models."""
    if getattr(tokenizer, "image_inputs", None) is None:
        return None
    return tokenizer.image_inputs.each_pixels([r.get("images") for r in rows])
