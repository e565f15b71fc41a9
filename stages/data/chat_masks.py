"""Which tokens of a chat conversation are trained: the assistant turns' bodies, from one rendering.

    from stages.data.chat_masks import assistant_body_mask
    ids, trained = assistant_body_mask(messages, tokenizer)   # trained[t]: token t is a target

The rule, which tokens are trained, is written once: docs/chat-data.md (design notes: docs/design.md §6).
This module implements it.

How bodies are located, from the ONE full rendering R of the conversation (templates may render a
turn differently depending on what follows it, so renderings of prefixes are never used as
positions):
1. Render the conversation again with each message's content replaced by a marker (a private-use
   character pair): the text between markers is the template's own structure. R must equal that
   structure with each marker replaced by the message's content as templates render it (verbatim,
   stripped, JSON-escaped, or with a reasoning block split off); the one match gives every
   content's span in R.
2. The body of assistant turn i starts where R stops agreeing with the generation prompt: the text
   the template emits after the previous message's content when asked for a generation prompt
   (`add_generation_prompt=True` on the marked messages before i; only this structural tail is
   taken from it). A generation prompt that ends in `<think>\n` while the rendered turn does not
   simply agrees for a shorter stretch.
3. The body ends at the first stop-set token after the turn's content (or after the body start for
   a turn with only tool calls), before the next message's content.
4. Every mask is checked: each assistant turn has a trained token, bodies are in order and do not
   overlap, no other message's content lies inside a body, no stop token inside an assistant's own
   content; a template with `{% generation %}` blocks must mark runs that each overlap exactly one
   derived body, every body overlapped by one (where a run starts or ends is the template's choice).
Anything that does not fit raises `ChatMaskError` with the reason; callers add file and example.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ChatMaskError", "StopSet", "normalize_messages", "assistant_body_mask", "stop_token_ids"]

_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # Unicode private use: never in real text (checked)
_MARKER_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
REASONING_CLOSE = "</think>"                   # content "<think>…</think>answer": templates split it here


class ChatMaskError(ValueError):
    """A conversation whose trained tokens cannot be established under the project's rule."""


# --- input -----------------------------------------------------------------------------------------
def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _text_of_parts(parts: list, j: int) -> str:
    """Content given as parts ([{"type": "text", "text": ...}], the OpenAI format): text parts joined
    with newlines, as vLLM's chat front end joins them; any other part is refused."""
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in parts})
        raise ChatMaskError(f"message {j}: content parts must all be {{type: text, text: ...}}, got kinds {kinds}")
    return "\n".join(p["text"] for p in parts)


def normalize_messages(messages) -> list[dict]:
    """Messages as templates expect them: None-valued keys dropped at every depth (`datasets` fills
    every key missing from a row with None), `content` a string ("" when absent, e.g. on a turn that
    only calls tools; text parts joined with newlines). Raises ChatMaskError for anything that is not a conversation to train on."""
    if not isinstance(messages, list) or not messages:
        raise ChatMaskError("expected a non-empty list of {role, content} messages")
    out = []
    for j, raw in enumerate(messages):
        if isinstance(raw, dict) and "role" not in raw and {"from", "value"} <= set(raw):
            raise ChatMaskError(f"message {j}: ShareGPT keys from/value; convert each message to "
                                "{role: system|user|assistant|tool, content: ...}")
        if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
            raise ChatMaskError(f"message {j}: expected a mapping with a string 'role', got {str(raw)[:80]!r}")
        if raw["role"] != "assistant" and difflib.get_close_matches(raw["role"].lower(), ["assistant"], cutoff=0.75):
            raise ChatMaskError(f"message {j}: role {raw['role']!r} is not 'assistant' (only role 'assistant' is trained)")
        if raw.get("weight") not in (None, 0, 1):
            raise ChatMaskError(f"message {j}: weight must be 0 (not trained) or 1, got {raw['weight']!r}")
        message = _drop_none(raw)
        content = message.setdefault("content", "")
        if isinstance(content, list):
            content = message["content"] = _text_of_parts(content, j)
        if not isinstance(content, str):
            raise ChatMaskError(f"message {j}: content must be a string (or null), got {type(content).__name__}")
        if _MARK_OPEN in content or _MARK_CLOSE in content:
            raise ChatMaskError(f"message {j}: content holds the private-use characters U+E000/U+E001")
        if message["role"] == "assistant" and not content.strip() and not message.get("tool_calls"):
            raise ChatMaskError(f"message {j}: an assistant turn with neither content nor tool calls")
        out.append(message)
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise ChatMaskError(f"no assistant turn to train on (roles: {[m['role'] for m in out]}"
                            + ("; every assistant turn has weight 0)" if any(m["role"] == "assistant" for m in out) else ")"))
    return out


def _normalize_tools(tools) -> list[dict] | None:
    """Tool definitions for `tools=`: None-valued keys dropped; a JSON string (how many datasets
    store them) parsed; an empty list is no tools."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ChatMaskError(f"tools: not valid JSON ({err})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ChatMaskError(f"tools: expected a list of tool definitions (mappings), got {str(tools)[:80]!r}")
    return _drop_none(tools) or None


@lru_cache(maxsize=16)
def _generation_config_eos(model_dir: str) -> tuple[int, ...]:
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


@dataclass(frozen=True)
class StopSet:
    """What closes an assistant turn. `eos`: where generation stops (the tokenizer's eos and
    `generation_config.json`'s eos ids); `closers`: the special tokens the template itself renders
    right after an assistant reply (e.g. ChatML's <|im_end|> when eos is <|endoftext|>; a template
    may close earlier turns differently from the last, as gpt-oss does with <|end|> / <|return|>)."""

    eos: frozenset[int]
    closers: frozenset[int]

    @property
    def all(self) -> frozenset[int]:
        return self.eos | self.closers


def _first_special_after(tokenizer, text: str, after: int) -> int | None:
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    special = _special_ids(tokenizer)
    return next((t for t, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
                 if begin >= after and t in special), None)


def stop_token_ids(tokenizer) -> StopSet:
    """The stop set of `tokenizer` (StopSet): eos ids from the tokenizer and from the
    `generation_config.json` beside it, and the template's closers — the first special token it
    renders after each assistant reply of a two-exchange sample conversation."""
    eos = set(_generation_config_eos(str(tokenizer.name_or_path)))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    closers = set()
    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    for messages in (sample, sample[:2]):  # templates that take one exchange only get the short one
        try:
            text = _render(tokenizer, messages)
        except ChatMaskError:
            continue
        for word in ("Hello", "Goodbye")[:len(messages) // 2]:
            found = _first_special_after(tokenizer, text, text.find(word) + len(word))
            closers |= {found} if found is not None else set()
        break
    return StopSet(frozenset(eos), frozenset(closers))


# --- rendering -------------------------------------------------------------------------------------
def _render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises many types (TypeError, UndefinedError, TemplateError)
        raise ChatMaskError(f"the chat template failed: {type(err).__name__}: {err}") from err


def _marker(j: int) -> str:
    return f"{_MARK_OPEN}{j}{_MARK_CLOSE}"


def _split_reasoning(content: str) -> tuple[str, str]:
    """('<think>…</think>', 'answer') for reasoning inline in content, else ('', content)."""
    cut = content.rfind(REASONING_CLOSE)
    return (content[:cut + len(REASONING_CLOSE)], content[cut + len(REASONING_CLOSE):]) if cut >= 0 else ("", content)


def _marked(messages: list[dict]) -> list[dict]:
    """Each non-empty content replaced by its marker (an inline reasoning block kept before it, so
    templates that render reasoning specially still do)."""
    out = []
    for j, message in enumerate(messages):
        if message["content"].strip():
            reasoning, _ = _split_reasoning(message["content"])
            message = {**message, "content": reasoning + _marker(j)}
        out.append(message)
    return out


def _rendered_forms(content: str) -> list[str]:
    """How templates render a content string: verbatim, stripped (`| trim`), answer part only,
    JSON-escaped (`| tojson`)."""
    _, answer = _split_reasoning(content)
    forms = {answer, answer.strip(), answer.lstrip(), answer.rstrip()}
    # `| tojson` on a string: the marker keeps the quotes as structure, the content is escaped
    forms |= {json.dumps(f, ensure_ascii=ascii_only)[1:-1] for f in list(forms) for ascii_only in (False, True)}
    return sorted(forms, key=len, reverse=True)


def _content_spans(rendered: str, marked: str, messages: list[dict]) -> dict[int, tuple[int, int]]:
    """Message index -> (start, end) of its content in `rendered`, matched against the marked
    rendering's structure; ChatMaskError where the two cannot be aligned in one way."""
    found = [(m.start(), m.end(), int(m.group(1))) for m in _MARKER_RE.finditer(marked)]
    indices = [j for _, _, j in found]
    if len(set(indices)) != len(indices):
        raise ChatMaskError("the chat template renders a message's content more than once")
    pattern, last = [], 0
    for start, end, j in found:
        pattern.append(re.escape(marked[last:start]))
        pattern.append(f"(?P<m{j}>{'|'.join(re.escape(f) for f in _rendered_forms(messages[j]['content']))})")
        last = end
    pattern.append(re.escape(marked[last:]))
    match = re.fullmatch("".join(pattern), rendered, flags=re.DOTALL)
    if match is None:
        # the first message whose content (with the structure after it) no longer lines up
        culprit = next((j for n, j in enumerate(indices)
                        if re.match("".join(pattern[:2 * n + 3]), rendered, flags=re.DOTALL) is None), None)
        which = f"message {culprit} ({messages[culprit]['role']})" if culprit is not None else "the structure"
        raise ChatMaskError(f"{which}: the chat template's rendering depends on message content in a way the mask "
                            "cannot follow (content neither verbatim, trimmed, JSON-escaped nor a split-off reasoning block)")
    return {j: match.span(f"m{j}") for j in indices}


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _body_start(tokenizer, marked: list[dict], i: int, spans: dict, rendered: str, tools: list | None) -> int:
    """Where assistant turn i's body starts in `rendered`: past the longest stretch after the
    previous message's content that agrees with the generation prompt (the marked messages before
    i rendered with `add_generation_prompt=True`; only its tail after that content is used)."""
    try:
        prompt = _render(tokenizer, marked[:i], generation_prompt=True, tools=tools)
    except ChatMaskError as err:
        raise ChatMaskError(f"message {i}: no generation prompt precedes this assistant turn ({err})") from None
    before = [j for j in range(i) if j in spans]
    anchor, tail = 0, prompt
    if before:
        at = prompt.find(_marker(before[-1]))
        if at < 0:
            raise ChatMaskError(f"message {i}: the generation prompt does not render message {before[-1]}")
        anchor, tail = spans[before[-1]][1], prompt[at + len(_marker(before[-1])):]
    if _MARK_OPEN in tail:
        raise ChatMaskError(f"message {i}: the generation prompt renders message content after message {before[-1]}")
    return anchor + _common_prefix(rendered[anchor:], tail)


# --- the mask --------------------------------------------------------------------------------------
def _token_index_at(offsets: list[tuple[int, int]], char: int) -> int:
    """First token ending after `char` (the token holding it, or the next one)."""
    return next((t for t, (_, end) in enumerate(offsets) if end > char), len(offsets))


def _turn_end(tokenizer, i, ids, offsets, first, content_end, region_end, stops: StopSet) -> int:
    """Token index of the last token of assistant turn i's body: the first stop-set token after its
    content, and the stop tokens that directly follow it (Command R7B closes with
    <|END_RESPONSE|><|END_OF_TURN_TOKEN|>, its eos being the second); only within the turn (before
    region_end, where the next message's content starts)."""
    tokens = [t for t in range(first, len(ids)) if offsets[t][0] < region_end]
    inside = [t for t in tokens if ids[t] in stops.all and offsets[t][0] < content_end]
    if inside:
        raise ChatMaskError(f"message {i}: the assistant's content holds the stop token "
                            f"{tokenizer.convert_ids_to_tokens(ids[inside[0]])!r} before its end")
    after = [t for t in tokens if offsets[t][0] >= content_end]
    end = next((t for t in after if ids[t] in stops.all), None)
    if end is None:
        names = lambda group: sorted(tokenizer.convert_ids_to_tokens(sorted(group)))  # noqa: E731
        raise ChatMaskError(f"message {i}: no stop token closes this assistant turn before the next message "
                            f"(eos {names(stops.eos)}, template closers {names(stops.closers)}); if the template "
                            "closes turns with another token, list it in generation_config.json's eos_token_id")
    while end + 1 < len(ids) and ids[end + 1] in stops.all and offsets[end + 1][0] == offsets[end][1]:
        end += 1
    return end


def _bodies(tokenizer, messages, rendered, ids, offsets, stops: StopSet, tools) -> list[tuple[int, int]]:
    """Token ranges [first, last] (inclusive) of each trained assistant turn's body, in order."""
    marked = _marked(messages)
    spans = _content_spans(rendered, _render(tokenizer, marked, tools=tools), messages)
    bodies = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        start = _body_start(tokenizer, marked, i, spans, rendered, tools)
        if message["content"].strip() and i not in spans:
            raise ChatMaskError(f"message {i}: the chat template does not render this assistant turn's content")
        content_end = spans[i][1] if i in spans else start
        region_end = min([b for b, _ in spans.values() if b >= max(content_end, start + 1)] + [len(rendered)])
        first = _token_index_at(offsets, start)
        last = _turn_end(tokenizer, i, ids, offsets, first, content_end, region_end, stops)
        if i not in spans and offsets[last][0] <= start:
            raise ChatMaskError(f"message {i}: the chat template renders nothing for this assistant turn but its "
                                "closing token (are its tool calls rendered by the template?)")
        bodies.append((i, first, last))
    _check_bodies(bodies, spans, messages, offsets)
    return [(first, last) for _, first, last in bodies]


def _check_bodies(bodies, spans, messages, offsets) -> None:
    previous_end = -1
    for i, first, last in bodies:
        if first > last:
            raise ChatMaskError(f"message {i}: the assistant turn has no body token")
        if first <= previous_end:
            raise ChatMaskError(f"message {i}: its body overlaps or precedes the previous assistant body")
        begin, end = offsets[first][0], offsets[last][1]
        for j, (s, e) in spans.items():
            if messages[j]["role"] != "assistant" and s < end and e > begin and e > s:
                raise ChatMaskError(f"message {i}: its body would cover the content of message {j} "
                                    f"({messages[j]['role']}); the template's turns cannot be told apart")
        previous_end = last


def _marked_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, begin = [], None
    for t, on in enumerate(list(mask) + [0]):
        if on and begin is None:
            begin = t
        elif not on and begin is not None:
            runs, begin = runs + [(begin, t - 1)], None
    return runs


def _check_generation_blocks(tokenizer, messages, ids, bodies, tools) -> None:
    """A template's own {% generation %} mask must locate the same turns: each marked run overlaps
    exactly one derived body and each body overlaps a run. Where the run starts or ends (with the
    header, without the closer, with the separator) is the template's choice; the rule decides."""
    if not _GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        return
    try:
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception as err:  # transformers raises for templates its generation-mask support cannot follow
        raise ChatMaskError(f"the template's {{% generation %}} mask could not be computed: {type(err).__name__}: {err}") from err
    if list(out["input_ids"]) != list(ids):
        raise ChatMaskError("the template's {% generation %} rendering tokenizes differently from its plain rendering")
    runs = _marked_runs(out["assistant_masks"])
    overlaps = lambda a, b: a[0] <= b[1] and b[0] <= a[1]  # noqa: E731
    stray = [run for run in runs if sum(overlaps(run, body) for body in bodies) != 1]
    unmarked = [k for k, body in enumerate(bodies) if not any(overlaps(run, body) for run in runs)]
    if stray or unmarked:
        raise ChatMaskError(f"the template's {{% generation %}} mask disagrees with the assistant turns (marked token "
                            f"runs not inside exactly one assistant turn: {stray[:3]}; assistant turns it does not mark: {unmarked})")


def assistant_body_mask(messages, tokenizer, stops: StopSet | None = None,
                        tools: list | str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the full rendering and, per token, whether it is a trained target (module doc).

    messages: a list of {role, content, ...} dicts (normalized here); tokenizer: a fast HF tokenizer
    with a chat template; stops: the StopSet (default `stop_token_ids(tokenizer)`); tools: tool
    definitions passed to the template as `tools=` (a list of JSON-schema dicts, or a JSON string).
    Returns (ids [T] ints, trained [T] bools); position t-1 predicts token t, so a loss mask over
    positions is trained[1:]. Raises ChatMaskError naming the message and the reason.
    """
    messages, tools = normalize_messages(messages), _normalize_tools(tools)
    stops = stop_token_ids(tokenizer) if stops is None else stops
    rendered = _render(tokenizer, messages, tools=tools)
    encoded = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    bodies = _bodies(tokenizer, messages, rendered, ids, offsets, stops, tools)
    _check_generation_blocks(tokenizer, messages, ids, bodies, tools)
    trained = [False] * len(ids)
    for first, last in bodies:
        trained[first:last + 1] = [True] * (last + 1 - first)
    return ids, trained
