"""Builders for the tests' tiny real models: a trained byte-level BPE tokenizer and a random Llama
(2 layers, head_dim 64: vLLM's CPU attention rejects 16). Imported by conftest fixtures and tests."""
from __future__ import annotations

from pathlib import Path

TINY_VOCAB = 512
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container.",
    "def add(a, b):\n    return a + b",
    "Lists are mutable sequences, typically used to store collections of homogeneous items.",
    "for i in range(10):\n    print(i * i)",
] * 40


def build_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB):
    """A byte-level BPE trained on SAMPLE_TEXTS, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (  # an assistant turn is closed by eos (what the model learns to stop with)
        "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, vocab_size: int, seed: int = 0, layers: int = 2) -> Path:
    """Random-weight LlamaForCausalLM (hidden 128, 2 heads of 64), float32, saved with safetensors."""
    from pipeline.bench.models import build_random_llama

    return build_random_llama(out_dir, vocab_size=vocab_size, num_hidden_layers=layers, seed=seed,
                              bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype="float32")


# A Qwen2.5-shaped chat tokenizer: ChatML turns, tool calls and tool results. Content is joined with
# `+` as in many real templates (so a null content is a TypeError unless inputs are normalized);
# the tokenizer's eos is <|endoftext|>, and <|im_end|> closes a turn (found from the template).
TOOL_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% for tc in m['tool_calls'] or [] %}"
    "{{ '\\n<tool_call>\\n' + tc['function']['name'] + ' ' + (tc['function']['arguments'] | tojson) + '\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tool_chat_model(out_dir: Path) -> Path:
    """The tiny tokenizer with ChatML special tokens, plain added tool tokens and TOOL_CHAT_TEMPLATE,
    and a random tiny Llama sized to it."""
    from transformers import AutoTokenizer

    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.eos_token, tok.chat_template = "<|endoftext|>", TOOL_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return build_tiny_llama(out_dir, vocab_size=len(tok))


def tool_conversations(count: int) -> list[list[dict]]:
    """Multi-turn tool-calling chats as `datasets` leaves them (missing keys filled with None)."""
    chats = []
    for i in range(count):
        city = ["Paris", "Rome", "Oslo", "Lima"][i % 4]
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        chats.append([
            {"role": "system", "content": "You can call tools.", "tool_calls": None},
            {"role": "user", "content": f"What is the weather in {city}?", "tool_calls": None},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": f"{10 + i}C and sunny", "tool_calls": None},
            {"role": "assistant", "content": f"It is {10 + i}C and sunny in {city}.", "tool_calls": None},
            {"role": "user", "content": "Thanks!", "tool_calls": None},
            {"role": "assistant", "content": "You are welcome.", "tool_calls": None},
        ])
    return chats


def tool_chat_bodies(chat: list[dict]) -> list[str]:
    """The trained text of each assistant turn of `chat`, written from the rule, not from the code:
    its content, its tool calls as TOOL_CHAT_TEMPLATE renders them, and the closing <|im_end|>; a turn
    with no content starts at its first tool call's `<tool_call>` (the newline the template writes
    before it is whitespace between header and body: not trained)."""
    import json

    bodies = []
    for m in chat:
        if m["role"] == "assistant":
            calls = "".join(f"\n<tool_call>\n{c['function']['name']} {json.dumps(c['function']['arguments'])}\n</tool_call>"
                            for c in m.get("tool_calls") or [])
            bodies.append((m["content"] + calls if m["content"] else calls.removeprefix("\n")) + "<|im_end|>")
    return bodies


def decoded_runs(ids, trained, tokenizer) -> list[str]:
    """The decoded text of each run of consecutive trained tokens (`trained[t]`: token t is a target;
    for a cached row or an Example pass ids[1:] with the loss mask: position i trains token i + 1)."""
    runs, current = [], []
    for token, on in zip(list(ids), list(trained)):
        if on:
            current.append(int(token))
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]
