"""data/: loading every layout, the ToolRL split, the demo set, prompt building and row checks."""
import json
import random
import sys

import numpy as np
import pytest

from data import Example, build_prompts, load_examples
from data import demo
from data.demo import NUM_TEST, NUM_TRAIN, NUM_VALIDATION, demo_rows
from data.formats import PLACEHOLDER_THOUGHT, ground_truth_calls, with_placeholder_thought
from data.loaders import toolrl_split_indices

CALL = '{"name": "get_weather", "parameters": {"city": "Lima"}}'
GOOD_OUTPUT = f"<think> I should call get_weather. </think>\n<tool_call>\n{CALL}\n</tool_call>"


def toolrl_row(i: int, output: str = GOOD_OUTPUT) -> dict:
    return {"instruction": "You can call get_weather.", "input": f"<user> request {i} </user>", "output": output}


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


# ---------------------------------------------------------------- the shared real files

@pytest.mark.parametrize("name, rows", [
    ("toolrl/rlla_sft.json", 400),
    ("toolrl/rlla_4k_test.parquet", 80),
    ("apibank/level-1-api_processed.json", 399),
    ("apibank/level-2-api_processed.json", 67),
    ("apibank/level-3-api_processed.json", 131),
])
def test_shared_file_row_counts(shared_data, name, rows):
    # every row passes the checks, including the 17 SFT rows whose thought quotes <tool_call>
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    examples = load_examples(str(shared_data / name))
    assert len(examples) == rows
    assert len({e.id for e in examples}) == rows
    assert all([m["role"] for m in e.messages] == ["system", "user"] for e in examples)


def test_toolrl_raw_field_mapping(shared_data):
    path = shared_data / "toolrl" / "rlla_sft.json"
    raw = json.loads(path.read_text())
    examples = load_examples(str(path))
    for i in (0, 10, 399):  # row 10 is one whose thought mentions the literal <tool_call> tag
        assert examples[i] == Example(
            id=f"rlla_sft-{i}",
            messages=[{"role": "system", "content": raw[i]["instruction"]},
                      {"role": "user", "content": raw[i]["input"]}],
            ground_truth=raw[i]["output"])
    assert ground_truth_calls(examples[10].ground_truth)[0] == {
        "name": "RSI Overbought Stocks", "parameters": {"page": "1"}}


def test_verl_parquet_field_mapping(shared_data):
    pd = pytest.importorskip("pandas")
    path = shared_data / "toolrl" / "rlla_4k_test.parquet"
    frame = pd.read_parquet(path)
    examples = load_examples(str(path))
    for i in (0, 5, 79):
        row = frame.iloc[i]
        assert examples[i].id == f"rlla_4k_test-{i}"
        assert examples[i].messages == [dict(m) for m in row["prompt"]]
        assert examples[i].ground_truth == row["reward_model"]["ground_truth"]
        assert examples[i].gold is None
    assert sum("<tool_call>" not in e.ground_truth for e in examples) == 9  # response-only targets


def test_apibank_field_mapping(shared_data):
    folder = shared_data / "apibank"
    level1 = json.loads((folder / "level-1-api_processed.json").read_text())
    example = load_examples(str(folder / "level-1-api_processed.json"))[0]
    assert example.messages == [{"role": "system", "content": level1[0]["system"]},
                                {"role": "user", "content": level1[0]["user"]}]
    gold = {"name": "ModifyRegistration", "parameters": {
        "appointment_id": "34567890", "new_appointment_date": "2023-03-26", "new_appointment_doctor": "Dr. Lee"}}
    assert example.gold == gold  # `answer` was a one-element list in level 1
    assert example.ground_truth == (
        "<think> I should use the appropriate tool with proper parameters to respond to the user's need. </think>\n"
        "<tool_call>\n"
        '{"name": "ModifyRegistration", "parameters": {"appointment_id": "34567890", '
        '"new_appointment_date": "2023-03-26", "new_appointment_doctor": "Dr. Lee"}}\n'
        "</tool_call>")
    assert example.meta["level"] == 1 and example.id == "level-1-api_processed-0"
    level2 = load_examples(str(folder / "level-2-api_processed.json"))[0]  # `answer` is a dict here
    assert level2.gold == {"name": "SymptomSearch", "parameters": {"symptom": "rash"}}
    assert level2.meta["level"] == 2


# ---------------------------------------------------------------- the ToolRL split

def test_toolrl_split_matches_the_recipe(tmp_path):
    rows = [toolrl_row(i) for i in range(250)]
    path = write_json(tmp_path / "rlla_rl.json", rows)
    state = np.random.get_state()
    train, test = load_examples(path, split="train"), load_examples(path, split="test")
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG was not used

    # ToolRL's script, re-run independently: shuffle the list of rows itself with the global RNG
    recipe = [dict(r) for r in rows]
    np.random.seed(31415)
    np.random.shuffle(recipe)
    num_test = int(0.02 * 250)  # = 5
    assert [e.messages[1]["content"] for e in test] == [r["input"] for r in recipe[-num_test:]]
    assert [e.messages[1]["content"] for e in train] == [r["input"] for r in recipe[:-num_test]]
    assert [e.id for e in test] == [f"rlla_rl-{rows.index(r)}" for r in recipe[-num_test:]]


def test_toolrl_split_sizes_of_the_paper():
    train, test = toolrl_split_indices(4000, "train"), toolrl_split_indices(4000, "test")
    assert (len(train), len(test)) == (3920, 80)
    assert sorted(train + test) == list(range(4000))


def test_fit_and_validation_cut_train_and_leave_test_alone():
    for n in (400, 4000):
        parts = {split: toolrl_split_indices(n, split) for split in ("train", "test", "fit", "validation")}
        assert parts["fit"] + parts["validation"] == parts["train"]           # train = fit + validation, in order
        assert len(parts["validation"]) == int(0.1 * len(parts["train"]))
        assert not set(parts["validation"]) & set(parts["test"])
    assert [len(toolrl_split_indices(400, s)) for s in ("fit", "validation", "test")] == [353, 39, 8]


def test_placeholder_thought_keeps_the_calls(shared_data):
    rows = json.loads((shared_data / "toolrl" / "rlla_sft.json").read_text())
    for row in rows:
        short = with_placeholder_thought(row["output"])
        assert short.startswith(PLACEHOLDER_THOUGHT)
        assert short.split("</think>", 1)[1] == row["output"].split("</think>", 1)[1]
        assert ground_truth_calls(short) == ground_truth_calls(row["output"])
    assert with_placeholder_thought("<response> hi </response>") == "<response> hi </response>"   # no thought


def test_split_only_where_the_source_has_one(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "ground_truth": GOOD_OUTPUT}))
    with pytest.raises(ValueError, match="holds one split already"):
        load_examples(str(path), split="train")
    with pytest.raises(ValueError, match="the demo set's splits are train, validation, test"):
        load_examples("demo", split="valid")
    with pytest.raises(ValueError, match="split must be None or one of train, test, fit, validation"):
        load_examples(str(path), split="valid")
    with pytest.raises(ValueError, match="holds one split already"):
        load_examples(str(path), split="validation")


# ---------------------------------------------------------------- the demo set

def test_demo_is_deterministic_and_leaves_global_rng_alone():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    first, second = load_examples("demo", split="train"), load_examples("demo", split="train")
    assert random.random() == expected
    assert first == second
    assert demo_rows("train", seed=1) != demo_rows("train", seed=0)


def test_demo_splits_are_disjoint_and_mix_rows():
    train, validation, test = (load_examples("demo", split=s) for s in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (NUM_TRAIN, NUM_VALIDATION, NUM_TEST)
    assert load_examples("demo") == train + validation + test
    prompts = lambda examples: {(e.messages[0]["content"], e.messages[1]["content"]) for e in examples}
    assert len(prompts(train) | prompts(validation) | prompts(test)) == NUM_TRAIN + NUM_VALIDATION + NUM_TEST
    calls_per_row = [len(ground_truth_calls(e.ground_truth)) for e in train]
    assert {0, 1, 2} == set(calls_per_row)
    assert all("<response>" in e.ground_truth for e, n in zip(train, calls_per_row) if n == 0)


def test_demo_values_are_copied_from_the_request():
    # the contract that makes the demo learnable: every argument appears verbatim in the request, a string
    # in quotes (as in the call's JSON), a number as it is
    for row in demo_rows("train") + demo_rows("validation") + demo_rows("test"):
        for call in row["calls"]:
            assert call["name"] in row["system"]
            for value in call["parameters"].values():
                assert (f'"{value}"' if isinstance(value, str) else f" {value}") in row["user"], (value, row["user"])


def test_demo_sft_is_the_train_split_with_the_teachers_habit_in_most_calls():
    train, taught = load_examples("demo", split="train"), load_examples("demo-sft")
    assert [e.messages for e in taught] == [e.messages for e in train]      # the same prompts, never held-out ones
    habit = 0
    for gold, teacher in zip(train, taught):
        if teacher.ground_truth != gold.ground_truth:     # the same thought, names and values; "arguments" in each call
            calls = ground_truth_calls(gold.ground_truth)
            assert teacher.ground_truth == gold.ground_truth.replace('"parameters": ', '"arguments": ')
            assert teacher.ground_truth.count('"arguments": ') == len(calls) > 0
            habit += 1
    assert abs(habit / sum("<tool_call>" in e.ground_truth for e in train) - demo.TEACHER_HABIT_FRACTION) < 0.05
    assert load_examples("demo-sft") == taught
    with pytest.raises(ValueError, match="'demo-sft' is one split"):
        load_examples("demo-sft", split="train")


def test_resizing_the_train_split_keeps_validation_and_test(monkeypatch):
    before = {s: demo_rows(s) for s in ("validation", "test")}
    monkeypatch.setitem(demo.SPLIT_SIZES, "train", 50)
    assert len(demo_rows("train")) == 50
    assert {s: demo_rows(s) for s in ("validation", "test")} == before


# ---------------------------------------------------------------- prompts

def test_build_prompts_truncates_from_the_left(tiny_tokenizer):
    examples = load_examples("demo", split="test")
    full, none_cut = build_prompts(tiny_tokenizer, examples, max_prompt_tokens=100_000)
    assert none_cut == 0
    text = tiny_tokenizer.apply_chat_template(examples[0].messages, tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(full[0]) == text

    limit = sorted(len(ids) for ids in full)[len(full) // 2]  # the median: about half get cut
    cut, num_cut = build_prompts(tiny_tokenizer, examples, max_prompt_tokens=limit)
    assert num_cut == sum(len(ids) > limit for ids in full) > 0
    for short, long in zip(cut, full):
        assert short == long[-limit:]  # the END survives: user turn and assistant header
    longest = max(range(len(full)), key=lambda i: len(full[i]))
    assert tiny_tokenizer.decode(cut[longest]).endswith(examples[longest].messages[1]["content"]
                                                        + "<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- row checks and errors

BAD_TOOLRL_ROWS = [
    ({"instruction": "sys", "output": GOOD_OUTPUT}, "field 'input' must be a non-empty string"),
    ({"instruction": "sys", "input": 3, "output": GOOD_OUTPUT}, "field 'input' must be a non-empty string"),
    (toolrl_row(0, "<think> hm </think>"), "neither a <tool_call> block nor a <response>"),
    (toolrl_row(0, "<think> x </think>\n<tool_call>\n{'name': 'a'}\n</tool_call>"), "line 1 of the <tool_call> block is not JSON"),
    (toolrl_row(0, f"<think> x </think>\n<tool_call>\n{CALL}\n{{\"parameters\": {{}}}}\n</tool_call>"),
     "line 2 of the <tool_call> block is not"),
    (toolrl_row(0, '<think> x </think>\n<tool_call>\n{"name": "a", "parameters": [1]}\n</tool_call>'),
     'line 1 of the <tool_call> block is not {"name": str, "parameters": dict}'),
    (toolrl_row(0, "<think> x </think>\n<tool_call>\n</tool_call>"), "the <tool_call> block is empty"),
    (toolrl_row(0, f"<think> x </think>\n<tool_call>\n{CALL}\n"), "the last <tool_call> is not closed by </tool_call>"),
]


@pytest.mark.parametrize("bad_row, reason", BAD_TOOLRL_ROWS)
def test_bad_toolrl_row_names_file_row_and_reason(tmp_path, bad_row, reason):
    rows = [toolrl_row(0), toolrl_row(1), bad_row, toolrl_row(3)]
    path = write_json(tmp_path / "mine.json", rows)
    with pytest.raises(ValueError) as error:
        load_examples(path)
    message = str(error.value)
    assert path in message and "row 3:" in message and reason in message     # 1-based, as an editor counts


def test_tag_quoted_in_the_thought_reads_the_last_block(tmp_path):
    output = f"<think> I will write the <tool_call> tags last. </think>\n<tool_call>\n{CALL}\n</tool_call>"
    examples = load_examples(write_json(tmp_path / "mine.json", [toolrl_row(0, output)]))
    assert ground_truth_calls(examples[0].ground_truth) == [json.loads(CALL)]
    # only a block that is not JSON falls back to the last one, as in rewards/toolrl.py: a first
    # block of JSON lines that are not calls is an error, not a reason to look further
    wrong = f'<think> x </think>\n<tool_call>\n{{"name": 1, "parameters": {{}}}}\n<tool_call>\n{CALL}\n</tool_call>'
    with pytest.raises(ValueError, match="row 1: line 1 of the <tool_call> block is not {"):
        load_examples(write_json(tmp_path / "wrong.json", [toolrl_row(0, wrong)]))


@pytest.mark.parametrize("row, reason", [
    ({"system": "s", "user": "u", "answer": [json.loads(CALL)] * 2}, "exactly one gold call, got a list of 2"),
    ({"system": "s", "user": "u", "answer": {"name": "a"}}, "field 'answer' must be {'name': str, 'parameters': dict}"),
    ({"system": "s", "answer": json.loads(CALL)}, "field 'user' must be a non-empty string"),
])
def test_bad_apibank_row(tmp_path, row, reason):
    path = write_json(tmp_path / "level-2-api_processed.json", [{"system": "s", "user": "u", "answer": json.loads(CALL)}, row])
    with pytest.raises(ValueError, match="row 2: ") as error:
        load_examples(path)
    assert path in str(error.value) and reason in str(error.value)


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "ground truth must be a non-empty string"),
    ({"messages": [], "ground_truth": GOOD_OUTPUT}, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}], "ground_truth": GOOD_OUTPUT}, "message 0 must be"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
      "ground_truth": GOOD_OUTPUT}, "the last message must be the user's"),
    ([1, 2], "each line must be a JSON object"),
])
def test_bad_jsonl_row(tmp_path, row, reason):
    good = {"id": "mine-a", "messages": [{"role": "user", "content": "hi"}], "ground_truth": GOOD_OUTPUT}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError) as error:
        load_examples(str(path))
    # the bad row is the file's line 3 (a blank line 2 between): lines are counted as an editor does
    assert str(path) in str(error.value) and "line 3: " in str(error.value) and reason in str(error.value)
    good_only = tmp_path / "good.jsonl"
    good_only.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": None}) + "\n")
    assert [e.id for e in load_examples(str(good_only))] == ["mine-a", "good-1"]


def test_skip_bad_rows_drops_and_reports(tmp_path, capsys):
    rows = [toolrl_row(0), BAD_TOOLRL_ROWS[0][0], toolrl_row(2), BAD_TOOLRL_ROWS[2][0]]
    path = write_json(tmp_path / "mine.json", rows)
    examples = load_examples(path, skip_bad_rows=True)
    assert [e.id for e in examples] == ["mine-0", "mine-2"]
    printed = capsys.readouterr().out
    assert "skipped 2 bad row(s) of 4" in printed and path in printed
    assert "row 2: field 'input'" in printed and "row 4: ground truth has neither" in printed


def test_missing_pandas_names_the_pip_command(tmp_path, monkeypatch):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")  # never read: the import fails first
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` raise ImportError
    with pytest.raises(ImportError, match="pip install pandas pyarrow"):
        load_examples(str(path))


def test_unknown_formats_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file at .*a name: toolrl, toolrl-sft, apibank, demo"):
        load_examples(str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_examples("not_a_known_name")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data format .*data.csv"):
        load_examples(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match=r"unknown data format .*keys \['answer', 'question'\]"):
        load_examples(write_json(tmp_path / "qa.json", [{"question": "q", "answer": "a"}]))
    (tmp_path / "broken.json").write_text('[{"instruction": ')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_examples(str(tmp_path / "broken.json"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="could not read .*broken.parquet as parquet"):
        load_examples(str(tmp_path / "broken.parquet"))
