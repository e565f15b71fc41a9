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
   content's span in R. Every message with content must be rendered.
2. The header of assistant turn i is the generation prompt's tail (the text the template emits
   after the previous message's content when asked for a generation prompt), matched against R
   modulo whitespace: templates indented without whitespace control write `\n        ### Response:`
   in the loop and `\n    ### Response:` in the prompt. A template with no generation-prompt block
   has the loop's own header instead: all it writes between the previous content and this one.
   The body starts at the first non-whitespace character after the header (or at the content's
   first character, whitespace included); a token holding header and body characters is refused.
3. The body ends at the first stop-set token after the turn's content (or after the body start for
   a turn with only tool calls), before the next message's content. A template that renders no
   stop token closes the turn with its closing text (non-whitespace text written after every
   assistant content, `StopSet.closing_text`), or, with none, the body ends with the content
   ("unclosed": counted; `append_eos` inserts the tokenizer's EOS there instead).
4. Every mask is checked: each assistant turn has a trained token, bodies are in order and do not
   overlap, no other message's content lies inside a body, no stop token inside an assistant's own
   content, no template text that matches the turn's header inside a body; a template with
   `{% generation %}` blocks must mark runs that each overlap exactly one derived body, every body
   overlapped by one (where a run starts or ends is the template's choice).
Anything that does not fit raises `ChatMaskError` with the reason; callers add file and example.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ChatMask", "ChatMaskError", "ROLES", "StopSet", "normalize_messages", "mask_conversation", "assistant_body_mask",
           "stop_token_ids"]

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


ROLES = ("system", "user", "assistant", "tool")
# roles other datasets and formats use, and the role each means here (the hint of the refusal)
_ROLE_HINTS = {"bot": "assistant", "gpt": "assistant", "model": "assistant", "chatbot": "assistant", "ai": "assistant",
               "human": "user", "prompter": "user", "function": "tool", "ipython": "tool", "observation": "tool",
               "developer": "system"}


def _role_hint(role: str) -> str:
    """'; use X' for a role that means one of ROLES, else the list of roles."""
    meant = _ROLE_HINTS.get(role.lower()) or (role.lower() if role.lower() in ROLES else None)
    meant = meant or next(iter(difflib.get_close_matches(role.lower(), ROLES, n=1, cutoff=0.75)), None)
    return f"rename it {meant!r}" if meant else "rename it to the role it plays"


def _parse_json_messages(messages):
    """A messages column stored as a JSON string (CSV exports, some Parquet files): parsed, as tools are."""
    if not isinstance(messages, str):
        return messages
    try:
        return json.loads(messages)
    except json.JSONDecodeError as err:
        raise ChatMaskError(f"a string that is not a JSON list of messages ({err}): {messages[:80]!r}") from None


def normalize_messages(messages) -> list[dict]:
    """Messages as templates expect them: a JSON string parsed; None-valued keys dropped at every
    depth (`datasets` fills every key missing from a row with None); `content` a string ("" when
    absent, e.g. on a turn that only calls tools; text parts joined with newlines); roles one of
    ROLES. Raises ChatMaskError for anything that is not a conversation to train on."""
    messages = _parse_json_messages(messages)
    if not isinstance(messages, list) or not messages:
        raise ChatMaskError("expected a non-empty list of {role, content} messages")
    out = []
    for j, raw in enumerate(messages):
        if isinstance(raw, dict) and "role" not in raw and {"from", "value"} <= set(raw):
            raise ChatMaskError(f"message {j}: ShareGPT keys from/value; convert each message to "
                                "{role: system|user|assistant|tool, content: ...}")
        if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
            raise ChatMaskError(f"message {j}: expected a mapping with a string 'role', got {str(raw)[:80]!r}")
        if raw["role"] not in ROLES:
            raise ChatMaskError(f"message {j}: role {raw['role']!r} is not one of {', '.join(ROLES)} (only 'assistant' "
                                f"is trained); {_role_hint(raw['role'])}")
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
    may close earlier turns differently from the last, as gpt-oss does with <|end|> / <|return|>);
    `closing_text`: for a template that renders no stop token, the non-whitespace text it writes
    after every assistant content ("" when it writes none: its turns are unclosed);
    `closes_every_turn`: whether every assistant turn of the sample conversation was closed by one
    of these (False for a template that leaves a turn unclosed, even if it closes the last one)."""

    eos: frozenset[int]
    closers: frozenset[int]
    closing_text: str = ""
    closes_every_turn: bool = True

    @property
    def all(self) -> frozenset[int]:
        return self.eos | self.closers


_SAMPLE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]


def _first_token_after(tokenizer, text: str, after: int) -> tuple[int, str] | None:
    """(id, text) of the first token starting at or after `after` that is not whitespace only."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return next(((t, text[begin:end]) for t, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
                 if begin >= after and text[begin:end].strip()), None)


def _closing_text(after_turns: list[str]) -> str:
    """The closing text common to every assistant turn: the longest common prefix of what the
    template writes after each assistant content (the last turn's: to the end of the rendering)
    that ends on a non-whitespace character where a piece of text ends — in every turn followed by
    whitespace or the end, or all the last turn writes (ChatML written without a newline between
    turns: `<|im_end|><|im_start|>user`); "" if that is whitespace only."""
    common = after_turns[0]
    for text in after_turns[1:]:
        common = common[:_common_prefix(common, text)]
    for n in range(len(common), 0, -1):
        ends_a_piece = all(n == len(t) or t[n].isspace() for t in after_turns) or n == len(after_turns[-1].rstrip())
        if not common[n - 1].isspace() and ends_a_piece:
            return common[:n] if common[:n].strip() else ""
    return ""


def stop_token_ids(tokenizer) -> StopSet:
    """The stop set of `tokenizer` (StopSet), from a two-exchange sample conversation: eos ids from
    the tokenizer and from the `generation_config.json` beside it; the template's closers, the
    special token (not BOS) it renders first after an assistant reply, where that token closes
    the conversation (the last reply) or closes a user turn too (so a next turn's header such as
    <|user|> is not taken for a closer); and its closing text where it renders no stop token."""
    eos = set(_generation_config_eos(str(tokenizer.name_or_path)))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    special = _special_ids(tokenizer) - {tokenizer.bos_token_id}
    for sample in (_SAMPLE, _SAMPLE[:2]):  # templates that take one exchange only get the short one
        try:
            text = _render(tokenizer, sample)
            spans = _content_spans(text, _render(tokenizer, _marked(sample)), sample)
        except ChatMaskError:
            continue
        after = {j: _first_token_after(tokenizer, text, spans[j][1]) for j in spans}
        found = {j: token for j, (token, _) in ((j, a) for j, a in after.items() if a) if token in special}
        last = max(j for j in spans if sample[j]["role"] == "assistant")
        user_closers = {found[j] for j in found if sample[j]["role"] == "user"}
        closers = {t for j, t in found.items() if sample[j]["role"] == "assistant" and (j == last or t in user_closers)}
        assistant = [j for j in spans if sample[j]["role"] == "assistant"]
        following = [min([spans[k][0] for k in spans if spans[k][0] > spans[j][1]] + [len(text)]) for j in assistant]
        stopped = [any(t in eos | closers for t in _special_between(tokenizer, text, spans[j][1], e))
                   for j, e in zip(assistant, following)]
        closing = "" if any(stopped) else _closing_text([text[spans[j][1]:e] for j, e in zip(assistant, following)])
        return StopSet(frozenset(eos), frozenset(closers), closing, closes_every_turn=all(stopped) or bool(closing))
    return StopSet(frozenset(eos), frozenset())


def _special_between(tokenizer, text: str, begin: int, end: int) -> list[int]:
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [t for t, (b, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if begin <= b < end]


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


def _agreement_modulo_whitespace(text: str, tail: str) -> tuple[int, bool]:
    """How much of `text` agrees with `tail` when whitespace in both is ignored: (the index just
    after the last non-whitespace character of `tail` matched in order, 0 when none is; whether
    all of `tail` matched)."""
    i = j = end = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        while j < len(tail) and tail[j].isspace():
            j += 1
        if i == len(text) or j == len(tail) or text[i] != tail[j]:
            return end, j == len(tail)
        i, j, end = i + 1, j + 1, i + 1


@dataclass(frozen=True)
class _Header:
    body_start: int  # index in the rendering of the body's first character
    text: str        # the header as the template writes it (a body must not hold it)
    whole: bool = True  # the rendering agrees with all of the generation prompt's tail (modulo whitespace)


def _header(tokenizer, messages, marked, i: int, spans: dict, rendered: str, tools) -> _Header:
    """Assistant turn i's header and where its body starts (module doc, step 2). The header is the
    generation prompt's tail after the previous message's content (the marked messages before i
    rendered with `add_generation_prompt=True`), matched against `rendered` modulo whitespace. A
    template with no generation-prompt block renders the same tail without one (the previous
    turn's own ending, e.g. Mistral's `[/INST]`); non-whitespace text its loop writes after that and
    before the content (a header of its own, e.g. `### Response:`) is header too."""
    try:
        prompt = _render(tokenizer, marked[:i], generation_prompt=True, tools=tools)
        plain = _render(tokenizer, marked[:i], tools=tools)
    except ChatMaskError as err:
        advice = ("; an assistant message that opens the conversation can be kept as context with weight: 0, or put a "
                  "system or user message before it") if i == 0 else ""
        raise ChatMaskError(f"message {i}: no generation prompt precedes this assistant turn ({err}){advice}") from None
    before = [j for j in range(i) if j in spans]
    anchor, tail = 0, prompt
    if before:
        at = prompt.find(_marker(before[-1]))
        if at < 0:
            raise ChatMaskError(f"message {i}: the generation prompt does not render message {before[-1]}")
        anchor, tail = spans[before[-1]][1], prompt[at + len(_marker(before[-1])):]
    if _MARK_OPEN in tail:
        raise ChatMaskError(f"message {i}: the generation prompt renders message content after message {before[-1]}")
    content_start = spans[i][0] if i in spans else None
    limit = len(rendered) if content_start is None else content_start  # a header never reaches into content
    agreed, whole = _agreement_modulo_whitespace(rendered[anchor:limit], tail)
    end = anchor + agreed
    if prompt == plain:  # no generation-prompt block (Mistral, Llama 2, many community templates)
        if content_start is None:
            raise ChatMaskError(f"message {i}: the template has no generation-prompt block and this assistant turn has "
                                "no content, so where its header ends cannot be told")
        reasoning = _split_reasoning(messages[i]["content"])[0].strip()
        at = rendered.rfind(reasoning, end, content_start) if reasoning else -1
        own = rendered[end:at if at >= 0 else content_start]
        if not own.strip():  # the previous turn's ending is all the header: the body starts right after it
            return _Header(end, tail)
        tail, end = rendered[anchor:end + len(own.rstrip())], end + len(own.rstrip())
    return _Header(_first_body_character(rendered, end, content_start), tail, whole)


def _first_body_character(rendered: str, header_end: int, content_start: int | None) -> int:
    """The first character the model must produce: the first non-whitespace one after the header,
    or the content's first character (whitespace included) if that comes first."""
    start = header_end
    while start < len(rendered) and rendered[start].isspace() and start != content_start:
        start += 1
    return start


# --- the mask --------------------------------------------------------------------------------------
def _token_index_at(offsets: list[tuple[int, int]], char: int) -> int:
    """First token ending after `char` (the token holding it, or the next one)."""
    return next((t for t, (_, end) in enumerate(offsets) if end > char), len(offsets))


def _token_name(tokenizer, ids, t) -> str:
    return repr(tokenizer.convert_ids_to_tokens(ids[t]))


def _turn_end(tokenizer, i, ids, offsets, first, content_end, region_end, stops: StopSet, rendered, has_content) -> tuple[int, bool]:
    """(token index of the last token of assistant turn i's body, whether the template closed it):
    the first stop-set token after its content, and the stop tokens that directly follow it
    (Command R7B closes with <|END_RESPONSE|><|END_OF_TURN_TOKEN|>, its eos being the second);
    only within the turn (before region_end, where the next message's content starts). With no
    stop token: through the template's closing text, or, with none, the content's last token."""
    tokens = [t for t in range(first, len(ids)) if offsets[t][0] < region_end]
    inside = [t for t in tokens if ids[t] in stops.all and offsets[t][0] < content_end]
    if inside:
        raise ChatMaskError(f"message {i}: the assistant's content holds the stop token "
                            f"{_token_name(tokenizer, ids, inside[0])} before its end")
    after = [t for t in tokens if offsets[t][0] >= content_end]
    end = next((t for t in after if ids[t] in stops.all), None)
    if end is not None:
        while end + 1 < len(ids) and ids[end + 1] in stops.all and offsets[end + 1][0] == offsets[end][1]:
            end += 1
        return end, True
    if stops.closing_text:
        at = content_end if has_content else rendered.find(stops.closing_text, content_end, region_end)
        if at < 0 or not rendered.startswith(stops.closing_text, at):
            raise ChatMaskError(f"message {i}: the template writes {stops.closing_text!r} after other assistant replies "
                                "but not after this one, so where this turn ends cannot be told")
        return _last_token_before(tokenizer, i, ids, offsets, rendered, at + len(stops.closing_text)), True
    if not has_content:
        raise ChatMaskError(f"message {i}: the template closes this assistant turn with neither a stop token nor a "
                            "closing text, and it has no content to end with, so where it ends cannot be told")
    return _last_token_before(tokenizer, i, ids, offsets, rendered, content_end), False


def _last_token_before(tokenizer, i, ids, offsets, rendered, char: int) -> int:
    """The token holding character char - 1, the body's last; refused if it also holds
    non-whitespace text after `char` (the template's next turn)."""
    last = _token_index_at(offsets, char - 1)
    if rendered[char:offsets[last][1]].strip():
        raise ChatMaskError(f"message {i}: the token {_token_name(tokenizer, ids, last)} holds both the end of this "
                            f"assistant turn and the text after it ({rendered[char:offsets[last][1]]!r}), so where the turn "
                            "ends falls inside a token; a template that closes turns with a special token, or writes a "
                            "newline after each turn, keeps them apart")
    return last


@dataclass(frozen=True)
class _Turn:
    message: int     # index of the assistant message
    first: int       # token index of the body's first token
    last: int        # token index of the body's last token (inclusive)
    header: str      # the template's header for this turn
    closer: str      # what the template closed the turn with after its content (stop token(s) or closing text; "" if none)


def _turns(tokenizer, messages, rendered, ids, offsets, stops: StopSet, tools) -> tuple[list[_Turn], dict]:
    """The trained assistant turns' bodies, in order, and every message's content span."""
    marked = _marked(messages)
    spans = _content_spans(rendered, _render(tokenizer, marked, tools=tools), messages)
    dropped = [j for j, m in enumerate(messages) if m["content"].strip() and j not in spans]
    if dropped:
        j = dropped[0]
        raise ChatMaskError(f"message {j} ({messages[j]['role']}): the chat template does not render its content "
                            "(a template that drops this role or position); remove the message or use a template that renders it")
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        header = _header(tokenizer, messages, marked, i, spans, rendered, tools)
        start = header.body_start
        if not header.whole and i in spans and rendered[start:spans[i][0]].strip():
            # the prompt's header stops agreeing before the content, and template text is left over:
            # a header the loop writes differently (a think opener the loop leaves out leaves none)
            loop = _last_line(rendered[spans[max(j for j in spans if j < i)][1] if any(j < i for j in spans) else 0:spans[i][0]])
            raise ChatMaskError(f"message {i}: the template's assistant header differs between its message loop "
                                f"({loop!r} before the content) and its generation prompt "
                                f"({_last_line(header.text)!r}) by more than whitespace")
        content_end = spans[i][1] if i in spans else start
        region_end = min([b for b, _ in spans.values() if b >= max(content_end, start + 1)] + [len(rendered)])
        first = _token_index_at(offsets, start)
        if first < len(ids) and rendered[offsets[first][0]:start].strip():
            raise ChatMaskError(f"message {i}: the token {_token_name(tokenizer, ids, first)} holds both the template's "
                                "assistant header and the start of the reply, so it can be neither trained nor left out")
        last, closed = _turn_end(tokenizer, i, ids, offsets, first, content_end, region_end, stops, rendered, i in spans)
        if i not in spans and offsets[last][0] <= start:
            raise ChatMaskError(f"message {i}: the chat template renders nothing for this assistant turn but its "
                                "closing token (are its tool calls rendered by the template?)")
        turns.append(_Turn(i, first, last, header.text, rendered[content_end:offsets[last][1]].strip() if closed else ""))
    _check_bodies(turns, spans, messages, offsets)
    _check_headers(turns, spans, rendered, offsets)
    return turns, spans


def _check_bodies(turns: list[_Turn], spans, messages, offsets) -> None:
    previous_end = -1
    for turn in turns:
        i, first, last = turn.message, turn.first, turn.last
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


def _last_line(text: str) -> str:
    """The last non-empty line of `text`, stripped ("" if none)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _header_key(header: str) -> str:
    """The header's last non-empty line without whitespace ("<|im_start|>assistant", "###Response:"):
    what a trained stretch of template text must not hold."""
    return "".join(_last_line(header).split())


def _template_text(rendered: str, begin: int, end: int, spans: dict) -> str:
    """The template's own text in rendered[begin:end] (outside every message's content), whitespace removed."""
    pieces, at = [], begin
    for s, e in sorted(spans.values()):
        if e > at and s < end:
            pieces.append(rendered[at:s] if s > at else "")
            at = max(at, e)
    pieces.append(rendered[at:end] if at < end else "")
    return "".join("".join(piece.split()) for piece in pieces)


def _check_headers(turns: list[_Turn], spans, rendered: str, offsets) -> None:
    """No body holds its turn's header in template text (outside every message's content: an
    answer that itself contains `### Response:` stays trainable)."""
    for turn in turns:
        key = _header_key(turn.header)
        if key and key in _template_text(rendered, offsets[turn.first][0], offsets[turn.last][1], spans):
            raise ChatMaskError(f"message {turn.message}: its trained text holds the template's assistant header "
                                f"{key!r}; the header was not matched (a template whose header differs between its "
                                "message loop and its generation prompt by more than whitespace)")


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


@dataclass(frozen=True)
class ChatMask:
    """One conversation's tokens and trained targets (see `mask_conversation`)."""

    ids: list[int]          # [T] token ids of the one rendering (EOS ids inserted with append_eos)
    trained: list[bool]     # [T] token t is a trained target; position t-1 predicts it
    unclosed_turns: int     # trained assistant turns the template closes with neither stop token nor closing text
    eos_appended: int = 0   # EOS ids inserted after unclosed turns (append_eos)


def mask_conversation(messages, tokenizer, stops: StopSet | None = None, tools: list | str | None = None,
                      append_eos: bool = False) -> ChatMask:
    """The conversation's token ids and, per token, whether it is a trained target (module doc).

    messages: a list of {role, content, ...} dicts or a JSON string of one (normalized here);
    tokenizer: a fast HF tokenizer with a chat template; stops: the StopSet (default
    `stop_token_ids(tokenizer)`); tools: tool definitions passed to the template as `tools=` (a list
    of JSON-schema dicts, or a JSON string); append_eos: insert the tokenizer's EOS id after each
    unclosed assistant turn's content, trained (refused where the template closes a turn itself).
    Raises ChatMaskError naming the message and the reason.
    """
    messages, tools = normalize_messages(messages), _normalize_tools(tools)
    stops = stop_token_ids(tokenizer) if stops is None else stops
    rendered = _render(tokenizer, messages, tools=tools)
    encoded = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    turns, _ = _turns(tokenizer, messages, rendered, ids, offsets, stops, tools)
    _check_generation_blocks(tokenizer, messages, ids, [(t.first, t.last) for t in turns], tools)
    trained = [False] * len(ids)
    for turn in turns:
        trained[turn.first:turn.last + 1] = [True] * (turn.last + 1 - turn.first)
    unclosed = [turn for turn in turns if not turn.closer]
    if not append_eos:
        return ChatMask(ids, trained, len(unclosed))
    if stops.closes_every_turn:
        closed = next((f" (message {turn.message} with {turn.closer!r})" for turn in turns if turn.closer), "")
        raise ChatMaskError(f"assistant_eos=append, but the template closes every assistant turn itself{closed}; "
                            "use assistant_eos=none")
    if tokenizer.eos_token_id is None:
        raise ChatMaskError("assistant_eos=append, but the tokenizer has no eos_token to append")
    for turn in reversed(unclosed):  # from the end, so earlier token indices stay valid
        ids.insert(turn.last + 1, tokenizer.eos_token_id)
        trained.insert(turn.last + 1, True)
    return ChatMask(ids, trained, len(unclosed), eos_appended=len(unclosed))


def assistant_body_mask(messages, tokenizer, stops: StopSet | None = None,
                        tools: list | str | None = None) -> tuple[list[int], list[bool]]:
    """(ids [T] ints, trained [T] bools) of `mask_conversation` (same arguments); position t-1
    predicts token t, so a loss mask over positions is trained[1:]. Raises ChatMaskError."""
    mask = mask_conversation(messages, tokenizer, stops, tools)
    return mask.ids, mask.trained
