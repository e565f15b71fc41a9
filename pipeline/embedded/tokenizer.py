"""Run: python -c "from pipeline.embedded.tokenizer import train_tokenizer; train_tokenizer(['hello world'] * 50, 'build/tok', vocab_size=300)"

The embedded default's tokenizer: byte-level BPE trained on both domains, saved for transformers.

A real base model's tokenizer covers prose and code alike, so this one is trained on the source
and target train texts together. Byte-level means any string encodes without `<unk>`.

Conventions, as in Llama tokenizers:
- encoding a text adds `<s>` in front (the post-processor); `</s>` ends a document or an
  assistant turn and is never added automatically.
- the chat template writes `<s>` itself, so render chats with `add_special_tokens=False` (what
  `apply_chat_template(tokenize=True)` does). Assistant turns sit inside `{% generation %}` so
  `return_assistant_tokens_mask=True` marks the tokens a fine-tune should learn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "train_tokenizer"]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Order fixes the ids: <s>=0, </s>=1, <pad>=2, <unk>=3.
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]

# Role headers are plain text ("<|user|>" is several byte-level tokens), so any role name works.
# Newlines are written as {{ '\n' }}: transformers renders with trim_blocks, which eats a literal
# newline that follows a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _bpe_model(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train the raw `tokenizers` BPE; the trainer sorts pair counts, so the result is fixed."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False keeps "x" and " x" distinct, as GPT-2 style tokenizers do.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def train_tokenizer(texts: Iterable[str], out_dir: str | Path,
                    vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train on `texts`, save a transformers tokenizer into out_dir and return it."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must cover the 256 bytes and the special tokens, got {vocab_size}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_model(texts, vocab_size),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
