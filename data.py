"""Datasets and prompts for prime: what a fork replaces to train on another task.

A row follows the schema of PRIME-RL/Eurus-2-RL-Data:

    {"data_source": str, "ability": "math" | "code",
     "prompt": [{"role": "system", "content": str}, {"role": "user", "content": str}],
     "reward_model": {"ground_truth": str, "style": "rule"},   # code: a JSON string of tests
     "extra_info": {...}}                                       # optional, carried along

`load_rows` reads such rows from .parquet (as the dataset ships) and .jsonl files and names the
file, row and field of anything malformed. `addition_rows` generates the built-in offline task: 3-digit addition whose worked
solution (one carry-annotated step per digit) ends in \\boxed{sum}, so the policy's answers can be
checked by the same math verifier that scores real data.
"""
import json
import random

ABILITIES = ("math", "code")


# ----------------------------------------------------------------------------------------------
# The built-in task: 3-digit addition with a worked solution
def addition_question(a: int, b: int) -> str:
    return f"{a}+{b}="


def addition_solution(a: int, b: int) -> str:
    """Column addition, least significant digit first: '345+678=' ->
    '5+8=13,4+7+1=12,3+6+1=10,\\boxed{1023}'. Each step is one digit column plus the carry, so a
    wrong answer has a first wrong step: the token-level credit a process reward can give."""
    steps, carry = [], 0
    for da, db in zip(reversed(f"{a:03d}"), reversed(f"{b:03d}")):
        s = int(da) + int(db) + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    return ",".join(steps) + f",\\boxed{{{a + b}}}"


def addition_row(a: int, b: int) -> dict:
    return {"data_source": "embedded/addition", "ability": "math",
            "prompt": [{"role": "user", "content": addition_question(a, b)}],
            "reward_model": {"ground_truth": str(a + b), "style": "rule"}}


def addition_pairs(n: int, seed: int, exclude: frozenset = frozenset()) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs of 3-digit numbers, none in `exclude` (keeps eval problems out of
    training: 'fresh problems of the same family')."""
    rng, pairs = random.Random(seed), {}
    while len(pairs) < n:
        pair = (rng.randint(100, 999), rng.randint(100, 999))
        if pair not in exclude:
            pairs[pair] = None  # a dict keeps insertion order, so the list is seed-deterministic
    return list(pairs)


def addition_rows(n: int, seed: int, exclude: frozenset = frozenset()) -> list[dict]:
    return [addition_row(a, b) for a, b in addition_pairs(n, seed, exclude)]


# Fixed seeds keep the held-out set identical across runs, so eval numbers are comparable.
EVAL_SEED, VALID_SEED = 1234, 4321


def embedded_eval_rows(n: int) -> list[dict]:
    return addition_rows(n, EVAL_SEED)


class AdditionStream:
    """An endless stream of fresh training problems, never one of the held-out eval problems."""

    def __init__(self, seed: int, eval_rows: list[dict]):
        self.rng = random.Random(seed)
        self.exclude = {row["prompt"][-1]["content"] for row in eval_rows}

    def state_dict(self) -> dict:  # the data position, for exact resume
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])

    def take(self, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            a, b = self.rng.randint(100, 999), self.rng.randint(100, 999)
            if addition_question(a, b) not in self.exclude:
                rows.append(addition_row(a, b))
        return rows


class RowStream:
    """Rows of a loaded dataset, reshuffled every epoch (seeded)."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.rng, self.order = rows, random.Random(seed), []

    def state_dict(self) -> dict:  # the data position, for exact resume
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            out.append(self.rows[self.order.pop()])
        return out


# ----------------------------------------------------------------------------------------------
# Loading Eurus-2-style rows
def validate_row(row, where: str) -> dict:
    """Raise a ValueError naming `where` (file:row) and the field when `row` breaks the schema."""
    def fail(field, why):
        raise ValueError(f"{where}: field '{field}' {why}")
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
    return row


def _read_rows(path: str):
    """(row number, row) pairs of one .parquet or .jsonl file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet
        yield from enumerate(pyarrow.parquet.read_table(path).to_pylist(), 1)
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield lineno, ValueError(f"{path}:{lineno}: not valid JSON ({e})")
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")


def load_rows(paths: list[str], skip_bad_rows: bool = False) -> tuple[list[dict], list[str]]:
    """(rows, errors) from .parquet and .jsonl files, every row validated. A bad row raises a
    ValueError naming file, row and field; with skip_bad_rows it is left out and its error
    returned, so the caller can count and report what was skipped."""
    rows, errors = [], []
    for path in paths:
        for number, row in _read_rows(path):
            try:
                if isinstance(row, Exception):
                    raise row
                rows.append(validate_row(row, f"{path}:{number}"))
            except ValueError as e:
                if not skip_bad_rows:
                    raise
                errors.append(str(e))
    if not rows:
        raise ValueError(f"no usable rows in {paths}" + (f" ({len(errors)} bad, first: {errors[0]})" if errors else ""))
    return rows, errors


# ----------------------------------------------------------------------------------------------
# Prompts
def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The chat rendered with the tokenizer's chat template, ready for the assistant's turn
    (add_generation_prompt=True). A tokenizer without a template (a base model) gets a plain
    fallback: "Role: content" per message, blank lines between, then "Assistant:"."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"


def prompt_token_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """Each row's prompt (see prompt_text) as token ids; the template carries any special tokens."""
    return [tokenizer(prompt_text(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"] for r in rows]
