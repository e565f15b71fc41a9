"""Prompt-completion data (TRL's third SFT format), standard and conversational: only the completion
is trained. Expectations are literal decoded text written from the rule (docs/chat-data.md), and
the standard shape is checked against what the installed TRL's SFTTrainer trains for the same rows.

The tiny tokenizer adds no BOS, its EOS is "</s>", and its chat template (tests/tiny_models.py) is
"<|role|>\\n{content}" + "</s>" after an assistant's content + "\\n" per message, with the
generation prompt "<|assistant|>\\n" (plain text, not special tokens).
"""
import json

import pytest
from tiny_models import decoded_runs
from transformers import AutoTokenizer

from stages.data.inputs import DataConfig, input_format, load_rows, tokenize_rows

USER = {"role": "user", "content": "Add a and b."}
# name: (rows, expected trained runs per row)
CASES = {
    "standard": ([{"prompt": "Add a and b.\n", "completion": "return a + b"}], [["return a + b</s>"]]),
    "standard-eos-given": ([{"prompt": "Add a and b.\n", "completion": "return a + b</s>"}], [["return a + b</s>"]]),
    # the prompt ends inside a word: " return" is one token across the boundary and is trained
    "standard-merged-boundary": ([{"prompt": "def add(a, b): ret", "completion": "urn a + b"}], [[" return a + b</s>"]]),
    "conversational": ([{"prompt": [USER], "completion": [{"role": "assistant", "content": "return a + b"}]}],
                       [["return a + b</s>"]]),
    "conversational-assistant-in-prompt": ([{
        "prompt": [{"role": "user", "content": "Name an animal."}, {"role": "assistant", "content": "the quick fox."}, USER],
        "completion": [{"role": "assistant", "content": "return a + b"}]}], [["return a + b</s>"]]),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path, tokenizer, **settings):
    cfg = DataConfig(path=str(path), max_length=512, **settings)
    return tokenize_rows(load_rows(cfg), tokenizer, cfg)


def trained_runs(example, tokenizer) -> list[str]:
    return decoded_runs(example.input_ids[1:], example.loss_mask, tokenizer)


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_completion_is_trained(name, tokenizer, tmp_path):
    rows, expected = CASES[name]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert input_format(DataConfig(path=str(path)), load_rows(DataConfig(path=str(path))).column_names).kind == "prompt-completion"
    assert [trained_runs(e, tokenizer) for e in read(path, tokenizer)] == expected


def test_standard_pairs_train_what_trl_sft_trainer_trains(tiny_model_dir, tokenizer, tmp_path):
    """Same token ids, same trained positions as TRL's completion mask (EOS appended to the
    completion unless present; a token merged across the boundary trained), on the installed TRL."""
    import datasets
    import trl

    rows = [row for name in ("standard", "standard-eos-given", "standard-merged-boundary") for row in CASES[name][0]]
    ours = read(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer)
    args = trl.SFTConfig(str(tmp_path / "sft"), use_cpu=True, report_to="none", max_length=512)
    trainer = trl.SFTTrainer(model=str(tiny_model_dir), args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(rows))
    for mine, theirs in zip(ours, trainer.train_dataset):
        assert mine.input_ids.tolist() == theirs["input_ids"]
        assert mine.loss_mask.tolist() == [label != -100 for label in theirs["labels"][1:]]  # -100: not trained


def test_conversational_pairs_differ_from_trl_only_by_the_separator(tiny_model_dir, tokenizer, tmp_path):
    """TRL trains everything after the prompt's generation prompt, so also the "\\n" the template
    writes after "</s>"; here that separator is not trained (the chat rule). Nothing else differs."""
    import datasets
    import trl

    rows = [row for name in ("conversational", "conversational-assistant-in-prompt") for row in CASES[name][0]]
    ours = read(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer)
    args = trl.SFTConfig(str(tmp_path / "sft"), use_cpu=True, report_to="none", max_length=512)
    trainer = trl.SFTTrainer(model=str(tiny_model_dir), args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(rows))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for mine, theirs in zip(ours, trainer.train_dataset):
        assert mine.input_ids.tolist() == theirs["input_ids"]
        trl_trained = [i for i, label in enumerate(theirs["labels"][1:]) if label != -100]
        our_trained = [i for i, m in enumerate(mine.loss_mask.tolist()) if m]
        assert trl_trained == our_trained + [len(mine.loss_mask) - 1]  # TRL's one extra: the last token, "\n"
        assert [theirs["input_ids"][-1]] == newline


def test_eval_reads_prompt_completion_and_json_string_chat_as_stage_one(tokenizer, tiny_model_dir, tmp_path):
    """An eval set in each format is scored on exactly the positions stage one trains."""
    from pipeline.config import load_config
    from stages.eval.evaluate import eval_data_config

    config = load_config(None, [f"model={tiny_model_dir}", "eval.max_length=512"])
    chat = [{"messages": json.dumps([USER, {"role": "assistant", "content": "return a + b"}])}]  # a CSV export's JSON string
    sets = {"pairs": [r for case in CASES.values() for r in case[0] if isinstance(r["prompt"], str)],
            "conversational": [r for case in CASES.values() for r in case[0] if isinstance(r["prompt"], list)],
            "chat-json-string": chat}
    for name, rows in sets.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        cfg = eval_data_config(str(path), config.data, config.eval)
        scored = [e.loss_mask.tolist() for e in tokenize_rows(load_rows(cfg), tokenizer, cfg)]
        assert scored == [e.loss_mask.tolist() for e in read(path, tokenizer)], name
    [example] = read(tmp_path / "chat-json-string.jsonl", tokenizer)
    assert trained_runs(example, tokenizer) == ["return a + b</s>"]


def test_named_columns_override_the_defaults(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Add a and b.\n", "answer": "return a + b"}])
    [example] = read(path, tokenizer, prompt_field="question", completion_field="answer")
    assert trained_runs(example, tokenizer) == ["return a + b</s>"]


@pytest.mark.parametrize("rows, settings, message", [
    ([{"text": "t", "prompt": "p", "completion": "c"}], {},
     r"pairs\.jsonl: the columns \['text', 'prompt', 'completion'\] fit more than one input format \(text, prompt-completion\): "
     r"choose one with data\.format=text\|prompt-completion"),
    ([{"text": "t", "messages": [USER]}], {}, r"more than one input format \(text, chat\)"),
    ([{"prompt": "p", "answer": "c"}], {},
     r"a prompt column 'prompt' but no completion column 'completion' .*set data\.completion_field"),
    ([{"instruction": "Add", "input": "a, b", "output": "a + b"}], {},
     r"no column of a supported input format \(columns: \['instruction', 'input', 'output'\]\); supported formats and the keys "
     r"that select them: text .*; Alpaca-style rows \(instruction/input/output\): write them as a .messages. column"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}], {}, r"ShareGPT rows \('conversations' of \{from, value\}\)"),
    ([{"text": "t"}], {"format": "chat"}, r"data\.format=chat needs column\(s\) \['messages'\], not found \(columns: \['text'\]\)"),
    ([{"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]}], {},
     r"example 0, fields 'prompt', 'completion': prompt is a str and completion a list; both must be strings"),
    ([{"prompt": [USER], "completion": [{"role": "user", "content": "c"}]}], {},
     r"example 0, fields 'prompt', 'completion': the completion has no assistant message to train \(roles: \['user'\]\)"),
    ([{"prompt": "p", "completion": "  "}], {}, r"example 0, fields 'prompt', 'completion': empty or whitespace-only completion"),
])
def test_shapes_that_cannot_be_read_are_refused_with_advice(rows, settings, message, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=message):
        read(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer, **settings)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", r"empty\.jsonl: the file is empty \(no rows\)"),
    ("blank.csv", "\n  \n", r"blank\.csv: the file is empty \(no rows\)"),
    ("header.csv", "text\n", r"header\.csv: a header line and no rows"),
    ("cut.jsonl", '{"text": "fine"}\n{"text": "broken\n{"text": "fine"}\n',
     r"cut\.jsonl: line 2 is not valid JSON \(Unterminated string starting at, column 10\): '\{\"text\": \"broken'"),
    ("list.jsonl", '{"text": "fine"}\n\n["a", "list"]\n', r"list\.jsonl: line 3 is a JSON list, not an object of columns"),
    ("array.jsonl", '[\n  {"text": "fine"},\n  {"text": "fine"\n]\n', r"array\.jsonl: line 1 starts a JSON array, not JSON Lines .*\.json"),
    ("lines.json", '{"text": "fine"}\n{"text": "fine"\n', r"lines\.json: line 2 is not valid JSON \(Expecting ',' delimiter"),
    ("array.json", '[\n  {"text": "fine"},\n  {"text": "fine"\n]\n', r"array\.json: line 4 is not valid JSON \(Expecting ',' delimiter"),
])
def test_empty_files_and_malformed_lines_are_named_by_file_and_line(name, content, message, tokenizer, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read(path, tokenizer)
