"""Datasets and prompts for prime: what a fork replaces to train on another task.

A row follows the schema of PRIME-RL/Eurus-2-RL-Data:

    {"data_source": str, "ability": "math" | "code",
     "prompt": [{"role": "user", "content": str}, ...],
     "reward_model": {"ground_truth": str, "style": "rule"}}

`load_rows` reads such rows from jsonl files and names the file, row and field of anything
malformed. `addition_rows` generates the built-in offline task: 3-digit addition whose worked
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
    return row


def load_rows(paths: list[str]) -> list[dict]:
    """Rows from one or more .jsonl files, each validated (errors name file, row and field)."""
    rows = []
    for path in paths:
        if not path.endswith(".jsonl"):
            raise ValueError(f"{path}: only .jsonl files are supported for now")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
                rows.append(validate_row(row, f"{path}:{lineno}"))
    if not rows:
        raise ValueError(f"no rows in {paths}")
    return rows


# ----------------------------------------------------------------------------------------------
# Prompts
def prompt_token_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """Each row's chat messages rendered with the tokenizer's chat template, ready for the
    assistant's turn (add_generation_prompt=True), as token ids."""
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
