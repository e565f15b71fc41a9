"""show-mask on a real SentencePiece tokenizer (Mistral's v3, shipped in the mistral_common wheel):
the marked text keeps the "▁" spaces of the tokens it cuts between; a ChatML-shaped template
written with no newline between turns is closed by its `<|im_end|>` text (trained), and where
SentencePiece merges that text's end with the next turn's start ("><") the turn is refused with
what would work, not cut inside a token. Expected text is written literally from the rule
(docs/chat-data.md)."""
import json
import shutil
from pathlib import Path

import mistral_common
import pytest

from pipeline.cli import main as cli_main

MISTRAL_V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
# Mistral v0.3-style: the system prompt is not rendered, a reply is " " + content + eos after [/INST].
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
           "{% elif m.role == 'assistant' %} {{ m.content | trim }}{{ eos_token }}{% endif %}{% endfor %}")
CHATML_NO_NEWLINE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def sentencepiece_dir(tiny_model_dir, out: Path, template: str) -> Path:
    """The tiny model's files with Mistral's v3 SentencePiece tokenizer beside them (show-mask reads
    only the tokenizer)."""
    shutil.copytree(tiny_model_dir, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    shutil.copy(MISTRAL_V3, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": template}))
    return out


def show(capsys, model, data, *extra) -> tuple[int, str]:
    capsys.readouterr()
    status = cli_main(["show-mask", "--config", "", f"model={model}", f"data.path={data}", *extra])
    return status, capsys.readouterr().out


@pytest.mark.parametrize("template, reply, status, marked", [
    (MISTRAL, "Hello there.", 0, "[/INST]⟦ Hello there.</s>⟧"),  # "▁Hello" holds the space: trained, shown with it
    (MISTRAL, "the end", 0, "[/INST]⟦ the end</s>⟧"),
    (CHATML_NO_NEWLINE, "Goodbye.", 1, "message 1: the token '><' holds both the end of this assistant turn and the text after "
                                       "it ('<'), so where the turn ends falls inside a token; a template that closes turns with "
                                       "a special token, or writes a newline after each turn, keeps them apart"),
])
def test_marked_text_on_a_sentencepiece_tokenizer(template, reply, status, marked, tiny_model_dir, tmp_path, capsys):
    model = sentencepiece_dir(tiny_model_dir, tmp_path / "model", template)
    data = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": reply}]
    data.write_text(json.dumps({"messages": chat}) + "\n")
    shown, out = show(capsys, model, data, "--tokens", "data.on_bad_example=skip")  # overrides after the options too
    assert shown == status and marked in out, out
    assert "warning" not in out
