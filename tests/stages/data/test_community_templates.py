"""Chat templates as people write them outside this project: indented without whitespace control,
tabs, CRLF, the header on the content's line, BOS per turn, a generation prompt ending in a space,
no generation-prompt block, no closing stop token. Each expectation is the decoded text of each
trained run, written literally from the rule (docs/chat-data.md), never computed by the mask code:
an assistant turn's body from its first non-whitespace character after the header (a token that
holds whitespace and that character is trained whole) through what closes it, nothing else.

The tokenizer is the tiny byte-level BPE of tests/tiny_models.py (GPT-2 pre-tokenization: a run of
spaces gives its last space to the word after it). Its small vocabulary merges a space into a word
only for words of its training texts (" the", " return", " of"), so "\\n        the" trains " the"
(one token holding the space and the first body character), while a space before a word it never
saw ("Paris", "###") is a token of its own and is not trained.
"""
import pytest
from tiny_models import decoded_runs
from transformers import AutoTokenizer

from stages.data.chat_masks import ChatMaskError, mask_conversation

# Alpaca-style, as community templates are written: indented, no whitespace control, so the loop
# writes "\n        ### Response:\n        " and the generation prompt "\n    ### Response:\n".
INDENTED_8_VS_4 = """{% for m in messages %}
    {% if m.role == 'user' %}
        ### Instruction:
        {{ m.content }}
    {% elif m.role == 'assistant' %}
        ### Response:
        {{ m.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    ### Response:
{% endif %}"""

INDENTED_TABS = INDENTED_8_VS_4.replace("        ", "\t\t").replace("    {%", "\t{%")

# Vicuna-style with CRLF written into the loop and LF in the generation prompt.
CRLF = ("{% for m in messages %}{{ m.role | upper }}:{{ '\\r\\n' }}{{ m.content }}"
        "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\r\\n\\r\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")

SAME_LINE = ("{% for m in messages %}{% if m.role == 'user' %}### Human: {{ m.content }}\n"
             "{% else %}### Assistant: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}### Assistant:{% endif %}")

# "<s>bot"-style: BOS opens every turn and nothing closes one (the next turn's BOS is not a closer).
BOS_PER_TURN = ("{% for m in messages %}{{ bos_token }}{{ 'bot' if m.role == 'assistant' else m.role }}\n{{ m.content }}\n"
                "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}bot\n{% endif %}")

TRAILING_SPACE = ("{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}"
                  "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant: {% endif %}")

# No generation-prompt block; the loop writes an assistant header of its own.
NO_PROMPT_BLOCK = ("{% for m in messages %}{% if m.role == 'user' %}### Instruction:\n{{ m.content }}\n\n"
                   "{% else %}### Response:\n{{ m.content }}{{ eos_token }}\n\n{% endif %}{% endfor %}")

# Falcon/ChatQA-style: no stop token and no closing text after a reply.
NO_CLOSER = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
             "{% else %}Falcon: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Falcon:{% endif %}")

# No stop token, but a closing text written after every reply.
CLOSING_TEXT = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
                "{% else %}Bot: {{ m.content }}\n### End\n{% endif %}{% endfor %}{% if add_generation_prompt %}Bot:{% endif %}")

# ChatML written as plain text with no newline between turns: the closer runs straight into the next
# turn's header (OpenChat's "<|end_of_turn|>GPT4 Correct User:" is the same shape).
CHATML_NO_NEWLINE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Only the conversation's end is closed (EOS when no generation prompt is asked for): earlier turns are unclosed.
EOS_AT_END = ("{% for m in messages %}{{ '### Human: ' if m.role == 'user' else '### Assistant: ' }}{{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}### Assistant:{% else %}{{ eos_token }}{% endif %}")

TWO_TURNS = [{"role": "user", "content": "Name an animal."}, {"role": "assistant", "content": "the quick fox."},
             {"role": "user", "content": "Add a and b."}, {"role": "assistant", "content": "return a + b"}]
PARIS = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]

# name: (template, messages, expected trained runs, expected unclosed turns)
CASES = {
    "indent-8-loop-4-prompt": (INDENTED_8_VS_4, TWO_TURNS, [" the quick fox.</s>", " return a + b</s>"], 0),
    "indent-8-loop-4-prompt-unmerged-space": (INDENTED_8_VS_4, PARIS, ["Paris.</s>"], 0),
    "indent-tabs": (INDENTED_TABS, TWO_TURNS, ["the quick fox.</s>", "return a + b</s>"], 0),
    "crlf": (CRLF, TWO_TURNS, ["the quick fox.</s>", "return a + b</s>"], 0),
    "header-on-content-line": (SAME_LINE, TWO_TURNS, [" the quick fox.</s>", " return a + b</s>"], 0),
    "bos-per-turn-no-closer": (BOS_PER_TURN, TWO_TURNS, ["the quick fox.", "return a + b"], 2),
    "prompt-ends-in-space": (TRAILING_SPACE, TWO_TURNS, [" the quick fox.</s>", " return a + b</s>"], 0),
    "no-prompt-block": (NO_PROMPT_BLOCK, TWO_TURNS, ["the quick fox.</s>", "return a + b</s>"], 0),
    "no-prompt-block-header-in-answer": (NO_PROMPT_BLOCK, [
        {"role": "user", "content": "Which header starts a reply?"}, {"role": "assistant", "content": "### Response: starts it."}],
        ["### Response: starts it.</s>"], 0),
    "indented-header-in-answer": (INDENTED_8_VS_4, [
        {"role": "user", "content": "Which header starts a reply?"}, {"role": "assistant", "content": "### Response: starts it."}],
        ["### Response: starts it.</s>"], 0),
    "no-closer": (NO_CLOSER, TWO_TURNS, [" the quick fox.", " return a + b"], 2),
    "closing-text": (CLOSING_TEXT, TWO_TURNS, [" the quick fox.\n### End", " return a + b\n### End"], 0),
    "closer-before-next-turn": (CHATML_NO_NEWLINE, TWO_TURNS, ["the quick fox.<|im_end|>", "return a + b<|im_end|>"], 0),
    "eos-only-at-the-end": (EOS_AT_END, TWO_TURNS, [" the quick fox.", " return a + b\n</s>"], 1),
}


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("community-tokenizer")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def with_template(base_dir, tmp_path, template, added=()):
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.chat_template = template
    tok.add_tokens(list(added))
    tok.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


def trained_runs(ids, trained, tokenizer) -> list[str]:
    return decoded_runs(ids, trained, tokenizer)


@pytest.mark.parametrize("name", list(CASES))
def test_trained_text_per_community_template(name, base_dir, tmp_path):
    template, messages, expected, unclosed = CASES[name]
    tok = with_template(base_dir, tmp_path, template)
    mask = mask_conversation(messages, tok)
    assert trained_runs(mask.ids, mask.trained, tok) == expected
    assert mask.unclosed_turns == unclosed
    assert mask.ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name, expected", [
    ("no-closer", [" the quick fox.</s>", " return a + b</s>"]),
    ("bos-per-turn-no-closer", ["the quick fox.</s>", "return a + b</s>"]),
    ("eos-only-at-the-end", [" the quick fox.</s>", " return a + b\n</s>"]),  # the closed last turn is left as it is
])
def test_append_eos_closes_unclosed_turns_in_the_token_stream(name, expected, base_dir, tmp_path):
    """assistant_eos=append inserts the tokenizer's EOS id right after each unclosed reply, trained;
    the rendering's own text is unchanged around it."""
    template, messages, _, unclosed = CASES[name]
    tok = with_template(base_dir, tmp_path, template)
    plain, appended = mask_conversation(messages, tok), mask_conversation(messages, tok, append_eos=True)
    assert trained_runs(appended.ids, appended.trained, tok) == expected
    assert appended.eos_appended == unclosed and len(appended.ids) == len(plain.ids) + unclosed
    without_eos = lambda ids: [t for t in ids if t != tok.eos_token_id]  # noqa: E731
    assert without_eos(appended.ids) == without_eos(plain.ids)


def test_append_eos_is_refused_where_the_template_closes_turns(base_dir, tmp_path):
    tok = with_template(base_dir, tmp_path, CLOSING_TEXT)
    with pytest.raises(ChatMaskError, match=r"assistant_eos=append, but the template closes every assistant turn itself "
                                            r"\(message 1 with '### End'\); use assistant_eos=none"):
        mask_conversation(TWO_TURNS, tok, append_eos=True)


def test_a_token_holding_header_and_reply_is_refused(base_dir, tmp_path):
    """An added token "R:Wh" spans the header "R:" and the reply's "Wh": it can be neither trained nor left out."""
    template = ("{% for m in messages %}{% if m.role == 'user' %}Q:{{ m.content }}\n{% else %}R:{{ m.content }}{{ eos_token }}\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}R:{% endif %}")
    tok = with_template(base_dir, tmp_path, template, added=["R:Wh"])
    with pytest.raises(ChatMaskError, match=r"message 1: the token 'R:Wh' holds both the template's assistant header and the start"):
        mask_conversation([{"role": "user", "content": "?"}, {"role": "assistant", "content": "Why not."}], tok)


@pytest.mark.parametrize("loop_header, prompt_header, named", [
    ("### Response:", "### Answer:", r"\('### Response:' before the content\) and its generation prompt \('### Answer:'\)"),
    ("Response:", "Answer: Response:", r"\('Response:' before the content\) and its generation prompt \('Answer: Response:'\)"),
])
def test_a_header_the_prompt_writes_differently_is_refused_not_trained(loop_header, prompt_header, named, base_dir, tmp_path):
    """The loop and the generation prompt disagree by more than whitespace: the body would start
    inside the loop's header, so the turn is refused by name."""
    template = ("{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n{% else %}" + loop_header + " {{ m.content }}"
                "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}" + prompt_header + "{% endif %}")
    tok = with_template(base_dir, tmp_path, template)
    with pytest.raises(ChatMaskError, match=r"message 1: the template's assistant header differs between its message loop " + named):
        mask_conversation(TWO_TURNS[:2], tok)


def test_a_template_that_drops_a_message_is_refused(base_dir, tmp_path):
    """A template that ignores the system role: the message's text would vanish without a word."""
    template = NO_CLOSER.replace("{% if m.role == 'user' %}", "{% if m.role == 'system' %}{% elif m.role == 'user' %}")
    tok = with_template(base_dir, tmp_path, template)
    with pytest.raises(ChatMaskError, match=r"message 0 \(system\): the chat template does not render its content"):
        mask_conversation([{"role": "system", "content": "Be brief."}, *TWO_TURNS], tok)


def test_a_conversation_opened_by_the_assistant_is_refused_with_what_works(base_dir, tmp_path):
    tok = with_template(base_dir, tmp_path, CHATML_NO_NEWLINE)
    opened = [{"role": "assistant", "content": "Hello, how can I help?"}, *TWO_TURNS]
    with pytest.raises(ChatMaskError, match=r"message 0: no generation prompt precedes this assistant turn .*can be kept as context "
                                            r"with weight: 0"):
        mask_conversation(opened, tok)
    kept = mask_conversation([{**opened[0], "weight": 0}, *TWO_TURNS], tok)
    assert trained_runs(kept.ids, kept.trained, tok) == ["the quick fox.<|im_end|>", "return a + b<|im_end|>"]
