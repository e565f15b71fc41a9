"""Trained chat tokens under templates shaped like the real families', each expectation a literal string.

Every template is written here to reproduce the structure of one family (what makes it hard for a
mask), on a tiny trained BPE with that family's special tokens. The expectation of every example is
the decoded text of each trained run, written by hand from the rule (docs/chat-data.md): an
assistant turn's body, from after its header through the token that closes it, nothing else.
"""
import json

import pytest
from tiny_models import decoded_runs
from transformers import AutoTokenizer

from stages.data.chat_masks import ChatMaskError, assistant_body_mask

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|end_of_text|>", "[INST]", "[/INST]", "<｜begin▁of▁sentence｜>", "<｜User｜>",
           "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
           "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>", "<BOS_TOKEN>",
           "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
           "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|start|>", "<|channel|>", "<|message|>", "<|return|>",
           "<|eom_id|>"]
PLAIN_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

CHATML_QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Qwen3: a think block only on the last assistant turn, tool calls rendered from `tool_calls`, runs
# of tool results grouped into one user turn, `content` possibly absent.
QWEN3 = (
    "{% for m in messages %}"
    "{% if m.role == 'user' or m.role == 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content if m.content is string else '' }}"
    "{% for tc in m.tool_calls or [] %}{% if m.content or not loop.first %}\n{% endif %}<tool_call>\n"
    "{\"name\": \"{{ tc.function.name }}\", \"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% elif m.role == 'tool' %}{% if loop.first or loop.previtem.role != 'tool' %}<|im_start|>user{% endif %}{{ '\\n' }}"
    "\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>\n{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# Mistral: the system prompt folded into the LAST user turn, no generation prompt, `</s>` closes.
MISTRAL = (
    "{% set sys = messages[0].content if messages[0].role == 'system' else '' %}"
    "{% set turns = messages[1:] if messages[0].role == 'system' else messages %}"
    "{% set ns = namespace(last_user=-1) %}{% for m in turns %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}{{ bos_token }}{% for m in turns %}{% if m.role == 'user' %}[INST] "
    "{% if sys and loop.index0 == ns.last_user %}{{ sys }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")

# DeepSeek-R1: a generation prompt ending in a think opener; reasoning stripped from earlier turns.
DEEPSEEK_R1 = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{% else %}{% set c = m.content %}{% if '</think>' in c and not loop.last %}{% set c = c.split('</think>')[-1] %}"
    "{% endif %}<｜Assistant｜>{{ c }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")

# Gemma: role "model", system folded into the first user turn, `<end_of_turn>` closes.
GEMMA = (
    "{{ bos_token }}{% set sys = messages[0].content + '\n\n' if messages[0].role == 'system' else '' %}"
    "{% for m in messages if m.role != 'system' %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ (sys if loop.first else '') + (m.content | trim) }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# ChatML with the template's own {% generation %} mask (which leaves out the separator).
GENERATION_BLOCK = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

PHI3 = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")

# Command R7B: the reply wrapped in <|START_RESPONSE|>…<|END_RESPONSE|>, then the eos <|END_OF_TURN_TOKEN|>.
COMMAND_R7B = (
    "{{ bos_token }}{% for m in messages %}<|START_OF_TURN_TOKEN|>{% if m.role == 'user' %}<|USER_TOKEN|>{{ m.content }}"
    "{% else %}<|CHATBOT_TOKEN|><|START_RESPONSE|>{{ m.content }}<|END_RESPONSE|>{% endif %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}")

# gpt-oss (harmony): earlier assistant turns close with <|end|>, the last with <|return|> (the eos).
HARMONY = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}"
    "{% if loop.last %}<|return|>{% else %}<|end|>{% endif %}{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")

# Llama 3.1 tools: tool calls as JSON, and tool results written with `| tojson` (escaped quotes).
LLAMA31_TOOLS = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ m.content | tojson }}<|eot_id|>{% elif m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% for tc in m.tool_calls %}{{ {'name': tc.function.name, 'parameters': tc.function.arguments} | tojson }}{% endfor %}"
    "<|eot_id|>{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# A {% generation %} block that also marks the separator after <|im_end|>: the template's choice of
# edges is not the rule, its turns must agree.
GENERATION_WITH_SEPARATOR = GENERATION_BLOCK.replace("<|im_end|>{% endgeneration %}\n", "<|im_end|>{{ '\\n' }}{% endgeneration %}")

WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# name: (template, bos, eos, generation_config eos ids as tokens, messages, expected trained runs)
CASES = {
    "chatml-qwen2.5": (CHATML_QWEN25, None, "<|endoftext|>", [], [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}],
        ["4<|im_end|>", "It is 6.<|im_end|>"]),
    "qwen3-tools": (QWEN3, None, "<|im_end|>", [], [
        {"role": "user", "content": "Weather in Paris?", "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "18C", "tool_calls": None},
        {"role": "assistant", "content": "It is 18C.", "tool_calls": None},
        {"role": "user", "content": "Thanks", "tool_calls": None},
        {"role": "assistant", "content": "You are welcome.", "tool_calls": None}],
        ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
         "It is 18C.<|im_end|>", "<think>\n\n</think>\n\nYou are welcome.<|im_end|>"]),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ["<|end_of_text|>", "<|eot_id|>"], [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "  Paris.\n"}, {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}],
        ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]),
    "mistral": (MISTRAL, "<s>", "</s>", [], [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"}],
        [" Hello!</s>", " Goodbye!</s>"]),
    "deepseek-r1": (DEEPSEEK_R1, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", [], [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\nsimple\n</think>\n\n2"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nalso simple\n</think>\n\n4"}],
        ["\n\n2<｜end▁of▁sentence｜>", "also simple\n</think>\n\n4<｜end▁of▁sentence｜>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<eos>", "<end_of_turn>"], [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks.\n"}],
        ["Hello there.<end_of_turn>", "Fine, thanks.<end_of_turn>"]),
    "generation-block": (GENERATION_BLOCK, None, "<|endoftext|>", [], [
        {"role": "system", "content": "You add numbers."}, {"role": "user", "content": "1 + 2"},
        {"role": "assistant", "content": "3"}, {"role": "user", "content": "2 + 5"}, {"role": "assistant", "content": "7"}],
        ["3<|im_end|>", "7<|im_end|>"]),
    "phi3": (PHI3, None, "<|endoftext|>", ["<|endoftext|>", "<|end|>"], [
        {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another."}, {"role": "assistant", "content": "Red."}],
        ["Blue.<|end|>", "Red.<|end|>"]),
    "command-r7b": (COMMAND_R7B, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", [], [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}],
        ["<|START_RESPONSE|>Hello!<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
         "<|START_RESPONSE|>Goodbye!<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]),
    "gpt-oss-harmony": (HARMONY, None, "<|return|>", [], [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}],
        ["<|channel|>final<|message|>Hello!<|end|>", "<|channel|>final<|message|>Goodbye!<|return|>"]),
    "llama3.1-tools": (LLAMA31_TOOLS, "<|begin_of_text|>", "<|end_of_text|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], [
        {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": '{"temp": "18C", "sky": "clear"}'}, {"role": "assistant", "content": "It is 18C."}],
        ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 18C.<|eot_id|>"]),
    "generation-block-with-separator": (GENERATION_WITH_SEPARATOR, None, "<|endoftext|>", [], [
        {"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"},
        {"role": "user", "content": "2 + 5"}, {"role": "assistant", "content": "7"}],
        ["3<|im_end|>", "7<|im_end|>"]),
    "chatml-content-parts": (CHATML_QWEN25, None, "<|im_end|>", [], [
        {"role": "user", "content": [{"type": "text", "text": "Two parts:"}, {"type": "text", "text": "add 1 and 2."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]}],
        ["3<|im_end|>"]),
    "chatml-opened-by-assistant": (CHATML_QWEN25, None, "<|im_end|>", [], [
        {"role": "system", "content": "Greet first."}, {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Sum 1 and 2."}, {"role": "assistant", "content": "3", "weight": 1},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye.", "weight": 0}],
        ["Hello, how can I help?<|im_end|>", "3<|im_end|>"]),
}


@pytest.fixture(scope="module")
def base_tokenizer_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-tokenizer")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.add_tokens(PLAIN_ADDED)  # plain added tokens: not special, as in Qwen's tokenizers
    tok.save_pretrained(out)
    return out


def family_tokenizer(base_dir, tmp_path, template, bos, eos, generation_eos):
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.bos_token, tok.eos_token, tok.chat_template = bos, eos, template
    tok.save_pretrained(tmp_path)
    if generation_eos:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.convert_tokens_to_ids(generation_eos)}))
    return AutoTokenizer.from_pretrained(tmp_path)


def trained_runs(ids, trained, tokenizer) -> list[str]:
    return decoded_runs(ids, trained, tokenizer)


@pytest.mark.parametrize("name", list(CASES))
def test_trained_text_per_template_family(name, base_tokenizer_dir, tmp_path):
    template, bos, eos, generation_eos, messages, expected = CASES[name]
    tok = family_tokenizer(base_tokenizer_dir, tmp_path, template, bos, eos, generation_eos)
    ids, trained = assistant_body_mask(messages, tok)
    assert trained_runs(ids, trained, tok) == expected
    plain = [{k: v for k, v in m.items() if v is not None} | {"content": text_of(m.get("content"))} for m in messages]
    assert ids == tok(tok.apply_chat_template(plain, tokenize=False), add_special_tokens=False)["input_ids"]


def text_of(content) -> str:
    return "\n".join(p["text"] for p in content) if isinstance(content, list) else content or ""


def test_no_separator_and_no_next_turn_is_trained(base_tokenizer_dir, tmp_path):
    """Faults 1 and 2 of issue 14, on the Qwen3 shape: the first assistant span must stop at its own
    <|im_end|>; neither the newline after it nor the next user turn is a target."""
    template, bos, eos, gen, _, _ = CASES["qwen3-tools"]
    tok = family_tokenizer(base_tokenizer_dir, tmp_path, template, bos, eos, gen)
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    ids, trained = assistant_body_mask(messages, tok)
    assert trained_runs(ids, trained, tok) == ["A1<|im_end|>", "<think>\n\n</think>\n\nA2<|im_end|>"]


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "neither content nor tool calls"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<|im_end|>b"}], "holds the stop token"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["not", "a string"]}], "content parts must all be"),
    ([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, {"role": "assistant", "content": "a cat"}],
     r"content parts must all be \{type: text, text: ...\}, got kinds \['image'\]"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}], "content must be a string"),
    ("not a list", r"a string that is not a JSON list of messages .*'not a list'"),
    ('{"role": "user"}', "non-empty list"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}, {"role": "Assistant", "content": "hello"}],
     "message 1: role 'Assistant' is not one of system, user, assistant, tool .*; rename it 'assistant'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistent", "content": "hello"}], "role 'assistent' .*rename it 'assistant'"),
    ([{"role": "user", "content": "hi"}, {"role": "gpt", "content": "hello"}], "message 1: role 'gpt' .*rename it 'assistant'"),
    ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}], "message 0: role 'human' .*rename it 'user'"),
    ([{"role": "user", "content": "hi"}, {"role": "function", "content": "{}"}, {"role": "assistant", "content": "ok"}],
     "message 1: role 'function' .*rename it 'tool'"),
    ([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "x"}, {"role": "assistant", "content": "ok"}],
     "message 1: role 'narrator' .*rename it to the role it plays"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "ShareGPT keys from/value"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}], "every assistant turn has weight 0"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0.5}], "weight must be 0"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], "message 1: role 'bot' .*rename it 'assistant'"),
])
def test_bad_conversations_are_refused_with_the_reason(messages, reason, base_tokenizer_dir, tmp_path):
    template, bos, eos, gen, _, _ = CASES["chatml-qwen2.5"]
    tok = family_tokenizer(base_tokenizer_dir, tmp_path, template, bos, eos, gen)
    with pytest.raises(ChatMaskError, match=reason):
        assistant_body_mask(messages, tok)


def test_template_that_rewrites_content_is_refused(base_tokenizer_dir, tmp_path):
    """A template that upper-cases content cannot be aligned with its structure: refused, not guessed."""
    tok = family_tokenizer(base_tokenizer_dir, tmp_path, CHATML_QWEN25.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"),
                           None, "<|endoftext|>", [])
    with pytest.raises(ChatMaskError, match=r"message 0 \(user\): the chat template's rendering depends on message content"):
        assistant_body_mask([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tok)


def test_generation_mask_that_disagrees_is_refused(base_tokenizer_dir, tmp_path):
    """A {% generation %} block around the user turn instead: the template's mask is checked, not trusted."""
    template = GENERATION_BLOCK.replace("{% generation %}", "").replace("{% endgeneration %}", "").replace(
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}",
        "{% else %}<|im_start|>{{ m.role }}\n{% generation %}{{ m.content }}{% endgeneration %}")
    tok = family_tokenizer(base_tokenizer_dir, tmp_path, template, None, "<|endoftext|>", [])
    with pytest.raises(ChatMaskError, match="generation"):
        assistant_body_mask([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tok)


def test_jinja_failure_names_the_template(base_tokenizer_dir, tmp_path):
    tok = family_tokenizer(base_tokenizer_dir, tmp_path, "{{ messages[0]['content'] + 1 }}", None, "<|endoftext|>", [])
    with pytest.raises(ChatMaskError, match="the chat template failed: TypeError"):
        assistant_body_mask([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tok)


def test_tool_definitions_reach_the_template_and_are_never_trained(base_tokenizer_dir, tmp_path):
    """`tools=` (a list, or a JSON string as many datasets store it) is rendered into the system turn
    by the template; it conditions the teacher but is no assistant body."""
    template = ("{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
                "{% endif %}" + QWEN3)
    tok = family_tokenizer(base_tokenizer_dir, tmp_path, template, None, "<|im_end|>", [])
    tools = [{"type": "function", "function": {"name": "get_weather", "description": None,
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = CASES["qwen3-tools"][4]
    for given in (tools, json.dumps(tools)):
        ids, trained = assistant_body_mask(messages, tok, tools=given)
        assert '{"type": "function", "function": {"name": "get_weather", "parameters"' in tok.decode(ids)
        assert trained_runs(ids, trained, tok) == CASES["qwen3-tools"][5]
    with pytest.raises(ChatMaskError, match="tools: not valid JSON"):
        assistant_body_mask(messages, tok, tools="{not json")
