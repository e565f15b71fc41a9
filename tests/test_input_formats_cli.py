"""Issue 23's input classes through the real CLI on the default vLLM engine: a community template
indented without whitespace control (header matched modulo whitespace) that closes no turn
(counted, warned, or closed with an appended EOS), prompt-completion pairs, and a CSV whose
`messages` column holds JSON strings; `show-mask` shows the same trained text first. Expected
trained text is written literally (the tiny tokenizer's " the" token holds the space before it)."""
import csv
import json
import re
import shutil

import pyarrow.parquet as pq
import pytest
from test_end_to_end import cli
from transformers import AutoTokenizer

from pipeline.cli import main as cli_main
from storage_schemas import Manifest

INDENTED_NO_CLOSER = """{% for m in messages %}
    {% if m.role == 'user' %}
        ### Instruction:
        {{ m.content }}
    {% elif m.role == 'assistant' %}
        ### Response:
        {{ m.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    ### Response:
{% endif %}"""
REPLIES = ["the quick fox.", "the lazy dog.", "return a + b", "the number of items."]


@pytest.fixture(scope="module")
def community_model(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("community") / "model"
    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = INDENTED_NO_CLOSER
    tok.save_pretrained(out)
    return out


def trained_texts(cache_dir, tok) -> list[str]:
    texts = []
    for shard in Manifest.load(cache_dir).shards:
        for row in pq.read_table(cache_dir / shard.file).to_pylist():
            ids = [t for t, on in zip(row["input_ids"][1:], row["loss_mask"]) if on]
            texts.append(tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return texts


def main(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (`python -m pipeline ...` minus the interpreter start): (status, stdout)."""
    capsys.readouterr()
    status = cli_main(list(args))
    return status, capsys.readouterr().out


def stage_one(model, data, cache, *extra):
    return cli("cache-teacher", "--config", "", f"model={model}", f"data.path={data}", f"cache.dir={cache}",
               "cache.k=8", "cache.rows_per_shard=4", "data.max_length=128", "cache.vllm_kv_cache_gib=0.25", *extra).stdout


@pytest.mark.vllm
def test_conversational_pairs_on_an_indented_template_with_no_closer(community_model, tmp_path, capsys):
    """Header whitespace, no closer and prompt-completion at once, on vLLM: show-mask first, then a
    cache whose turns end with the EOS that data.assistant_eos=append inserts (scored by the teacher)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}?"}],
                                         "completion": [{"role": "assistant", "content": reply}]}) + "\n"
                             for i, reply in enumerate(REPLIES)))
    _, shown = main(capsys, "show-mask", "--config", "", f"model={community_model}", f"data.path={pairs}", "--example", "0")
    assert "### Response:\n       ⟦ the quick fox.⟧\n" in shown
    assert "warning: 1 assistant turns are closed by no stop token or closing text" in shown

    out = stage_one(community_model, pairs, tmp_path / "cache", "data.assistant_eos=append")
    assert "warning: 4 assistant turns end with the EOS inserted by data.assistant_eos=append" in out
    manifest = Manifest.load(tmp_path / "cache")
    assert (manifest.dataset.format, manifest.dataset.field, manifest.dataset.input_rules) == ("prompt-completion", "prompt,completion", 3)
    assert (manifest.dataset.unclosed_assistant_turns, manifest.dataset.assistant_eos, manifest.engine.name) == (4, "append", "vllm")
    tok = AutoTokenizer.from_pretrained(community_model)
    assert trained_texts(tmp_path / "cache", tok) == [" the quick fox.</s>", " the lazy dog.</s>", " return a + b</s>",
                                                      " the number of items.</s>"]


def test_csv_json_string_messages_with_no_closer_are_counted_and_warned(community_model, tmp_path, capsys):
    data = tmp_path / "chats.csv"
    with open(data, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["messages"])
        for i, reply in enumerate(REPLIES):
            writer.writerow([json.dumps([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": reply}])])
    _, out = main(capsys, "cache-teacher", "--config", "", f"model={community_model}", f"data.path={data}",
                  f"cache.dir={tmp_path / 'cache'}", "cache.k=8", "cache.engine=hf")
    assert "warning: 4 assistant turns are closed by no stop token or closing text: the model will not learn to stop" in out
    manifest = Manifest.load(tmp_path / "cache")
    assert (manifest.dataset.format, manifest.dataset.unclosed_assistant_turns, manifest.dataset.assistant_eos) == ("chat", 4, "none")
    tok = AutoTokenizer.from_pretrained(community_model)
    assert trained_texts(tmp_path / "cache", tok) == [" the quick fox.", " the lazy dog.", " return a + b", " the number of items."]


def test_show_mask_on_standard_pairs_and_a_refused_row(tiny_model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Add a and b.\n", "completion": "return a + b"}) + "\n")
    _, out = main(capsys, "show-mask", "--config", "", f"model={tiny_model_dir}", f"data.path={pairs}", "--tokens")
    assert "Add a and b.\n⟦return a + b</s>⟧\n" in out and "(prompt-completion, columns prompt, completion)" in out
    assert re.search(r"\n +\d+ +\d+ +T  're' +re\n +\d+ +\d+ +T  'turn' +turn\n", out)  # --tokens: "\nreturn" is 're' 'turn' here
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}) + "\n")
    status, out = main(capsys, "show-mask", "--config", "", f"model={tiny_model_dir}", f"data.path={chat}")
    assert status == 1
    assert "refused by stage one: " in out and "message 1: role 'bot' is not one of system, user, assistant, tool" in out
