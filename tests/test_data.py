"""data.py: the built-in task and its step truth, Eurus-2-style rows from .jsonl/.parquet files
(checked, with errors naming file, row and field), the training streams, prompts."""

import os

import pytest
from conftest import EURUS2_SAMPLE, write_jsonl

import bootstrap
import data
from verifier import math_reward


def test_addition_solution_hand_worked():
    assert data.addition_solution(345, 678) == "5+8=13,4+7+1=12,3+6+1=10,\\boxed{1023}"
    assert data.addition_solution(100, 200) == "0+0=0,0+0=0,1+2=3,\\boxed{300}"


def test_worked_solutions_score_1_and_wrong_sums_0():
    for row, (a, b) in zip(data.addition_rows(50, 7), data.addition_pairs(50, 7)):
        truth = row["reward_model"]["ground_truth"]
        assert math_reward(data.addition_solution(a, b), truth) == 1.0
        assert math_reward(f"\\boxed{{{a + b + 1}}}", truth) == 0.0


def test_training_stream_never_yields_eval_problems():
    eval_rows = data.addition_rows(300, 0)  # dense enough that a leak would show
    stream = data.AdditionStream(seed=1, eval_rows=eval_rows)
    held_out = {r["prompt"][0]["content"] for r in eval_rows}
    assert not held_out & {r["prompt"][0]["content"] for r in stream.take(5000)}
    assert data.embedded_eval_rows(20) == data.embedded_eval_rows(20)  # fixed across runs


@pytest.fixture(scope="module")
def tok():
    return bootstrap.build_tokenizer(
        ["345+678=5+8=13", bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL
    )


def test_row_stream_covers_every_row_each_epoch_and_resumes_exactly(tmp_path, tok):
    rows = [dict(data.addition_row(100 + i, 200), extra_info={"i": i}) for i in range(5)]
    files = [
        data.RowFile(write_jsonl(tmp_path / "a.jsonl", rows[:2])),
        data.RowFile(write_jsonl(tmp_path / "b.jsonl", rows[2:])),
    ]
    stream = data.RowStream(files, 0, tok, max_prompt_len=100)
    taken = stream.take(7)
    # every row once per epoch
    assert sorted(r["extra_info"]["i"] for r in taken[:5]) == list(range(5))
    state = stream.state_dict()
    rest = stream.take(6)
    again = data.RowStream(files, 0, tok, max_prompt_len=100)
    again.load_state_dict(state)
    assert again.take(6) == rest  # the data position survives a checkpoint


def test_row_stream_checks_rows_as_they_are_drawn(tmp_path, tok):
    rows = data.addition_rows(3, 0)
    long = dict(rows[1], prompt=[{"role": "user", "content": "1+" * 100 + "1="}])
    path = write_jsonl(tmp_path / "rows.jsonl", [rows[0], dict(rows[2], ability="poetry"), long])
    with pytest.raises(data.DataError, match=r"rows.jsonl:2: field 'ability' .*--skip-bad-rows"):
        data.RowStream([data.RowFile(path)], 0, tok, max_prompt_len=50).take(3)
    stream = data.RowStream([data.RowFile(path)], 0, tok, max_prompt_len=50, skip_bad_rows=True)
    assert stream.take(3) == [rows[0]] * 3 and stream.counts == {
        "skipped_bad_rows": 3,
        "dropped_long_prompts": 3,
    }
    # a whole epoch without one: no endless loop
    with pytest.raises(data.DataError, match="no usable rows"):
        data.RowStream([data.RowFile(path)], 0, tok, max_prompt_len=5, skip_bad_rows=True).take(1)


def test_parquet_rows_are_read_on_demand(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = data.addition_rows(4, 0)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    f = data.RowFile(str(tmp_path / "train.parquet"))
    assert (
        len(f) == 4
        and f.row(2) == (f"{tmp_path / 'train.parquet'}:3", rows[2])
        and not f.has_code_rows()
    )
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"question": "1+1"}]), tmp_path / "other.parquet"
    )
    with pytest.raises(data.DataError, match="other.parquet: no column 'prompt'"):
        data.RowFile(str(tmp_path / "other.parquet"))


def test_data_files_take_files_folders_and_globs_as_a_download_leaves_them(tmp_path):
    # huggingface-cli download PRIME-RL/Eurus-2-RL-Data --repo-type dataset --local-dir D leaves:
    d = tmp_path / "D"
    (d / "data").mkdir(parents=True)
    for name in (
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet",
    ):
        (d / "data" / name).write_bytes(b"")
    (d / "README.md").write_text("x")

    def names(paths):
        return [os.path.relpath(p, d) for p in paths]

    assert names(data.data_files(str(d), "train")) == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert names(data.data_files(str(d), "validation")) == [
        "data/validation-00000-of-00001.parquet"
    ]
    assert names(
        data.data_files(
            f"{d}/data/train-*.parquet,{d}/data/validation-00000-of-00001.parquet", "train"
        )
    ) == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/validation-00000-of-00001.parquet",
    ]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "rows.jsonl").write_text("")
    # no file named for the split: all
    assert data.data_files(str(other), "train") == [str(other / "rows.jsonl")]
    for spec in (str(tmp_path / "empty*.parquet"), str(tmp_path / "missing.jsonl")):
        with pytest.raises(data.DataError, match="no such file, or no .parquet / .jsonl file"):
            data.data_files(spec, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no such file, or no .parquet / .jsonl file"):
        data.data_files(str(tmp_path / "empty"), "train")
    with pytest.raises(data.DataError, match="expected a .parquet or .jsonl"):
        data.data_files(str(d / "README.md"), "train")


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda r: r.pop("prompt"), "prompt"),
        (lambda r: r.update(prompt=[{"role": "user"}]), "prompt[0]"),
        (lambda r: r.update(ability="poetry"), "ability"),
        (lambda r: r["reward_model"].update(ground_truth="  "), "reward_model.ground_truth"),
        (lambda r: r.pop("reward_model"), "reward_model.ground_truth"),
        (lambda r: r["reward_model"].update(ground_truth=42), "reward_model.ground_truth"),
        (lambda r: r.update(data_source=7), "data_source"),
        (lambda r: r.update(extra_info="x"), "extra_info"),
    ],
)
def test_load_rows_names_file_row_and_field(tmp_path, breakage, field):
    good = data.addition_rows(3, 0)
    bad = data.addition_row(111, 222)
    breakage(bad)
    path = write_jsonl(tmp_path / "rows.jsonl", good[:2] + [bad])
    with pytest.raises(ValueError) as e:
        data.load_rows([path])
    assert f"{path}:3" in str(e.value) and f"'{field}'" in str(e.value)


def test_load_rows_reads_valid_files_and_rejects_bad_json(tmp_path):
    rows = data.addition_rows(4, 0)
    assert data.load_rows([write_jsonl(tmp_path / "a.jsonl", rows)]) == (rows, [])
    (tmp_path / "b.jsonl").write_text('{"prompt": \n')
    with pytest.raises(ValueError, match="b.jsonl:1: not valid JSON"):
        data.load_rows([str(tmp_path / "b.jsonl")])
    with pytest.raises(ValueError, match="expected a .parquet or .jsonl"):
        data.load_rows([str(tmp_path / "rows.csv")])


def test_skip_bad_rows_counts_what_it_skips(tmp_path):
    rows = data.addition_rows(3, 0)
    bad = dict(rows[1], ability="poetry")
    path = write_jsonl(tmp_path / "rows.jsonl", [rows[0], bad, rows[2]])
    (tmp_path / "more.jsonl").write_text(open(path).read() + "not json\n")
    kept, errors = data.load_rows([path, str(tmp_path / "more.jsonl")], skip_bad_rows=True)
    assert kept == [rows[0], rows[2]] * 2
    assert (
        len(errors) == 3
        and f"{path}:2: field 'ability'" in errors[0]
        and "more.jsonl:4: not valid JSON" in errors[2]
    )
    with pytest.raises(ValueError, match="no usable rows .*3 bad"):
        data.load_rows([write_jsonl(tmp_path / "all_bad.jsonl", [bad] * 3)], skip_bad_rows=True)


def test_eurus2_fixture_loads_from_jsonl_and_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet

    rows, errors = data.load_rows([EURUS2_SAMPLE])
    assert len(rows) == 32 and not errors
    assert {r["ability"] for r in rows} == {"math", "code"}
    assert all([m["role"] for m in r["prompt"]] == ["system", "user"] for r in rows)
    # the dataset ships as parquet: nested messages, reward_model and extra_info come back as dicts
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    from_parquet, _ = data.load_rows([str(tmp_path / "train.parquet"), EURUS2_SAMPLE])
    assert from_parquet == rows + rows


def test_prompt_fallback_without_a_chat_template():
    tok = bootstrap.build_tokenizer(["hello", bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    tok.chat_template = None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert data.prompt_text(tok, messages) == "System: Be brief.\n\nUser: 2+2?\n\nAssistant:"
    assert tok.decode(data.prompt_token_ids(tok, [{"prompt": messages}])[0]) == data.prompt_text(
        tok, messages
    )


def test_longer_addition_and_its_step_truth():
    assert (
        data.addition_solution(34512, 67890, 5)
        == "2+0=2,1+9=10,5+8+1=14,4+7+1=12,3+6+1=10,\\boxed{102402}"
    )
    assert all(len(str(a)) == len(str(b)) == 5 for a, b in data.addition_pairs(50, 0, digits=5))
    row = data.addition_row(345, 678)
    right = data.addition_solution(345, 678)
    assert data.first_wrong_step(row, right) == -1
    # the tens column
    assert data.first_wrong_step(row, "5+8=13,4+7+1=11,3+6+1=10,\\boxed{1013}") == 1
    assert data.first_wrong_step(row, "5+8=13,4+7+1=12,3+6+1=10,\\boxed{1024}") == 3  # only the box
    assert data.first_wrong_step(row, "5+8=13,4+7+1=12") == 1  # stopped early: its last step
    assert data.first_wrong_step(dict(row, data_source="gsm8k"), right) is None  # no step truth
    tok = bootstrap.build_tokenizer([right, bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    responses = [tok(text)["input_ids"] for text in (right, "5+8=13,4+7+1=11,3")]
    ends, first, kind = data.step_truth(tok, [row, row], responses, 40)
    assert kind.tolist() == [data.NO_ERROR, data.ARITHMETIC]
    assert first.tolist() == [-1, 1] and ends[1].sum() == 2  # two commas: steps 0, 1 and the rest
    assert data.step_truth(tok, [dict(row, data_source="x")], responses[:1], 40) is None


def test_step_end_mask_finds_separator_tokens():
    tok = bootstrap.build_tokenizer(
        ["1+2=3,4+5=9,\\boxed{93}", bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL
    )
    ids = tok("1+2=3,4+5=9,\\boxed{93}", add_special_tokens=False)["input_ids"]
    ends = data.step_end_mask(tok, [ids, ids[:3]], ",", width=len(ids) + 2)
    texts = [tok.decode([i]) for i in ids]
    assert [t for t, e in zip(texts, ends[0]) if e] == [t for t in texts if "," in t] and len(
        ends[0].nonzero()
    ) == 2
    assert ends[1].sum() == 0 and ends.shape == (2, len(ids) + 2)


def test_task_streams_of_files_or_the_built_in_task(tmp_path, tok):
    rows = data.addition_rows(5, 0)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    stream, eval_rows, counts = data.task_streams(
        *data.open_task(path, path), tok, 0, 100, False, 3, verbose=False
    )
    assert isinstance(stream, data.RowStream) and eval_rows == rows
    assert counts == {
        "data/train_rows": 5,
        "data/eval_rows": 5,
        "data/eval_skipped_bad_rows": 0,
        "data/eval_dropped_long_prompts": 0,
    }
    # no files: --task-digits' addition, its held-out problems never drawn for training
    stream, eval_rows, counts = data.task_streams(
        [], None, tok, 0, 100, False, 4, digits=4, verbose=False
    )
    assert counts == {} and len(eval_rows) == 4
    assert {r["data_source"] for r in eval_rows + stream.take(8)} == {"embedded/addition4"}
    assert all(len(r["reward_model"]["ground_truth"]) >= 4 for r in stream.take(8))
