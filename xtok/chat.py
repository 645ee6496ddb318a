"""Chat templates: render a list of messages with a tokenizer's jinja template, and know which
tokens are assistant content.

`render_chat` renders with the template (the tokenizer's own, a given jinja string or file, or a
built-in default for tokenizers that ship none; `chat_template_source` says which source that is),
tokenises the result with the tokenizer, and marks assistant tokens.

The text is exactly what a plain jinja render of the template gives for the real messages (the
HF `apply_chat_template` conventions: `trim_blocks`, `lstrip_blocks`, `raise_exception`,
`strftime_now`, `bos_token`/`eos_token`). The assistant mask is found from extra renders in which
each assistant message's content carries invisible private-use markers (U+F0000..U+10FFFD), and is
accepted only when those renders, markers removed, equal the real text character for character:
1. markers around the whole content: exact spans, whitespace included, for templates that emit the
   content as it is;
2. otherwise markers around each word (whitespace runs and tags such as `<think>`/`</think>` or the
   tokenizer's special-token strings stay unmarked, so `.strip()`, `| trim`, `.lstrip('\n')` and
   `.split('</think>')` act on the marked content as on the real one): the span runs from the first
   to the last emitted word, widened over the content's own leading/trailing tags when the text has
   them there (Qwen3's last turn `<think>\nR\n</think>\n\nA` is masked from `<think>`; its
   historical turns, whose reasoning the template drops, from `A`). A message of which no word is
   emitted (a template that drops it) gets no span.
A template for which neither works (e.g. one that JSON-escapes, truncates or repeats the content) is
a ChatFormatError naming the message. The end-of-turn special token that closes an assistant span is
part of the mask (the model must learn to stop), together with the whitespace-only tokens a template
puts between the content and that token (Llama-2's `' ' + content.strip() + ' ' + eos_token`).
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from .tokens import Tokenizer, char_to_byte_offsets

__all__ = ["RenderedChat", "render_chat", "load_template", "chat_template_source", "default_template",
           "ChatFormatError", "DEFAULT_TEMPLATES", "validate_messages", "bad_marker_pairs", "MSG_MARK", "WORD_MARK"]

# Markers (supplementary private-use planes): message k opens with chr(MSG_MARK + 2k) and closes with
# chr(MSG_MARK + 2k + 1) (plane 15); a word marker carries the word's index j as chr(WORD_MARK + j) (plane 16).
MSG_MARK, WORD_MARK, _MAX_MSG, _MAX_WORDS = 0xF0000, 0x100000, 0x7FFE, 0xFFFD
_MARKER_RE = re.compile("[\U000F0000-\U0010FFFF]")

DEFAULT_TEMPLATES = {
    # Mistral-style: used for tokenizers that know [INST] but ship no template (Tekken, .model files)
    "inst": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    # ChatML: tokenizers with <|im_start|>
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Plain text: any tokenizer
    "plain": (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}


class ChatFormatError(ValueError):
    """Messages or a template that cannot be rendered; the message says which field and why."""


@dataclass
class RenderedChat:
    text: str                    # the rendered conversation
    ids: np.ndarray              # int64 [n] token ids (special-token strings parsed)
    assistant_mask: np.ndarray   # bool [n] assistant content + closing end-of-turn token
    offsets: np.ndarray          # int64 [n, 2] byte span of each token in text.encode()


def load_template(template: str | Path | None) -> str | None:
    """A jinja template string from a string, a .jinja file, or a tokenizer_config.json."""
    if template is None:
        return None
    p = Path(str(template))
    if len(str(template)) < 4096 and p.suffix in (".jinja", ".j2", ".txt", ".json") and p.exists():
        if p.suffix == ".json":
            try:
                cfg = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ChatFormatError(f"{p}: not valid JSON ({e}); expected a tokenizer_config.json.") from e
            if not isinstance(cfg, dict) or "chat_template" not in cfg:
                raise ChatFormatError(f"{p}: no 'chat_template' field.")
            src = cfg["chat_template"]
            if isinstance(src, list):  # named templates: the default one
                src = next((c.get("template") for c in src if isinstance(c, dict) and c.get("name") == "default"),
                           src[0].get("template") if src and isinstance(src[0], dict) else None)
            if not isinstance(src, str) or not src.strip():
                raise ChatFormatError(f"{p}: field 'chat_template' is empty; put the jinja template there, "
                                      "or drop the template option to use the tokenizer's own.")
            return src
        src = p.read_text(encoding="utf-8")
        if not src.strip():
            raise ChatFormatError(f"{p}: the template file is empty; write the jinja template into it, or drop "
                                  "the template option to use the tokenizer's own (or the built-in default).")
        return src
    if ("{{" in str(template)) or ("{%" in str(template)):
        return str(template)
    raise ChatFormatError(f"{template}: not a template file that exists, nor jinja template text.")


def default_template(tok: Tokenizer) -> str:
    """The built-in template for a tokenizer that ships none (one of DEFAULT_TEMPLATES, by its specials)."""
    if "<|im_start|>" in tok.special_tokens:
        return DEFAULT_TEMPLATES["chatml"]
    if "[INST]" in tok.special_tokens:
        return DEFAULT_TEMPLATES["inst"]
    return DEFAULT_TEMPLATES["plain"]


def chat_template_source(tok: Tokenizer, template: str | Path | None = None) -> str:
    """The jinja source `render_chat(tok, ..., template=template)` renders with: `template` (jinja
    text or a file, see load_template), else the tokenizer's own chat template, else the built-in
    default for it. Stable for a given tokenizer and template, so it can be hashed into manifests."""
    return load_template(template) or tok.chat_template or default_template(tok)


def _compile(source: str):
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):  # HF's {% generation %}...{% endgeneration %}: render the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(msg):
        raise ChatFormatError(f"chat template refused the messages: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception  # strftime_now comes with each render (render_chat)
    return env.from_string(source)


_COMPILED: dict[str, object] = {}


def validate_messages(messages) -> list[dict]:
    """The messages as render_chat reads them (a list of {'role': str, 'content': str} dicts), or a
    ChatFormatError naming the message and the field that is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"messages[{i}]: expected an object with 'role' and 'content', got {m!r:.80}.")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"messages[{i}].content: expected a string, got {type(m['content']).__name__}.")
        out.append(dict(m))
    return out


def _compiled(source: str):
    tpl = _COMPILED.get(source)
    if tpl is None:
        try:
            tpl = _compile(source)
        except Exception as e:  # noqa: BLE001
            raise ChatFormatError(f"chat template does not compile: {e}") from e
        _COMPILED[source] = tpl
    return tpl


_TAG = r"<[^\s<>]{1,64}>|\[/?[A-Z_]{1,32}\]"  # <think>, </tool_call>, <|im_end|>, <s>, [INST], [/THINK]


def _word_re(tok: Tokenizer) -> re.Pattern:
    """What stays unmarked in word-marker renders: whitespace runs, tags (<think>, </tool_call>,
    <|im_end|>, [THINK]) and the tokenizer's other special-token strings, which templates test for
    and split on."""
    rx = _WORD_RE.get(tok)
    if rx is None:
        tag = re.compile(_TAG)
        odd = (s for s in tok.special_tokens if s and not s.isspace() and not tag.fullmatch(s))
        specials = sorted(odd, key=len, reverse=True)
        rx = _WORD_RE[tok] = re.compile("|".join([re.escape(s) for s in specials] + [_TAG, r"\s+"]))
    return rx


_WORD_RE: "weakref.WeakKeyDictionary[Tokenizer, re.Pattern]" = weakref.WeakKeyDictionary()


def _words(rx: re.Pattern, content: str) -> list[tuple[int, int]]:
    """[start, end) char spans of the marked words: the gaps between whitespace/tag matches."""
    out, pos = [], 0
    for m in rx.finditer(content):
        if m.start() > pos:
            out.append((pos, m.start()))
        pos = max(pos, m.end())
    if pos < len(content):
        out.append((pos, len(content)))
    return out


def _markers(rendered: str):
    """(clean text, marker code points, their char positions in the clean text)."""
    cps = np.frombuffer(rendered.encode("utf-32-le"), dtype=np.uint32)
    is_m = cps >= MSG_MARK
    idx = np.nonzero(is_m)[0]
    clean = cps[~is_m].tobytes().decode("utf-32-le") if idx.size else rendered
    return clean, cps[idx].astype(np.int64), idx - np.arange(idx.size)


def bad_marker_pairs(op, cl) -> bool:
    """Whether any open marker is not a message-open code point (plane 15, even) or any close
    marker is not its partner (open + 1)."""
    return bool(np.any(op >= WORD_MARK) or np.any((op - MSG_MARK) % 2 != 0) or np.any(cl != op + 1))


def _spans_whole(vals, pos, asst: list[int]) -> dict[int, tuple[int, int]] | None:
    """Strategy 1: each assistant message's open/close markers once each, adjacent, in order."""
    if vals.size != 2 * len(asst) or vals.size == 0:
        return None
    op, cl = vals[0::2], vals[1::2]
    if bad_marker_pairs(op, cl):
        return None
    ks = ((op - MSG_MARK) // 2).tolist()
    if sorted(ks) != sorted(asst) or len(set(ks)) != len(ks):
        return None
    return {k: (int(pos[2 * i]), int(pos[2 * i + 1])) for i, k in enumerate(ks)}


def _spans_words(vals, pos, words: dict[int, list], contents: dict[int, str], text: str):
    """Strategy 2: (open, index, close) word triples; per message the emitted words' indices strictly
    increase; the span runs from the first to the last emitted word, widened over leading/trailing
    tags of the content that the text has right there (whitespace-insensitively)."""
    if vals.size % 3:
        return None
    op, wi, cl = vals[0::3], vals[1::3], vals[2::3]
    if bad_marker_pairs(op, cl) or np.any(wi < WORD_MARK) or np.any(pos[1::3] != pos[0::3]):
        return None
    ks, js = (op - MSG_MARK) // 2, wi - WORD_MARK
    starts, ends = pos[0::3], pos[2::3]
    out = {}
    for k in np.unique(ks).tolist():
        sel = np.nonzero(ks == k)[0]
        j = js[sel]
        if k not in words or np.any(np.diff(j) <= 0) or j[-1] >= len(words[k]):
            return None
        s, e = int(starts[sel[0]]), int(ends[sel[-1]])
        c = contents[k]
        s = _widen(text, s, c[:words[k][int(j[0])][0]], -1)
        e = _widen(text, e, c[words[k][int(j[-1])][1]:], +1)
        out[k] = (s, e)
    return out


def _widen(text: str, at: int, part: str, direction: int) -> int:
    """Move `at` over `part` (content text before/after the emitted words: tags, whitespace) when
    `text` has part's non-whitespace characters right there, whitespace aside; else stay."""
    need = "".join(part.split())
    if not need:
        return at
    if direction < 0:
        i, n = at, len(need)
        while n > 0:
            i -= 1
            if i < 0:
                return at
            ch = text[i]
            if ch.isspace():
                continue
            if ch != need[n - 1]:
                return at
            n -= 1
        return i
    i, n = at, 0
    while n < len(need):
        if i >= len(text):
            return at
        ch = text[i]
        i += 1
        if ch.isspace():
            continue
        if ch != need[n]:
            return at
        n += 1
    return i


def _locate_assistant(tok: Tokenizer, render, msgs: list[dict], text: str) -> list[tuple[int, int]]:
    """Char spans [start, end) of each emitted assistant message's content in `text`, in order."""
    asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not asst:
        return []
    if len(msgs) > _MAX_MSG:
        raise ChatFormatError(f"messages: {len(msgs)} messages; at most {_MAX_MSG} can have their assistant "
                              "content located.")
    for i, m in enumerate(msgs):
        if _MARKER_RE.search(m["content"]):
            raise ChatFormatError(f"messages[{i}].content: contains supplementary private-use characters "
                                  "(U+F0000..U+10FFFF), which xtok uses as invisible markers; remove them.")

    def attempt(marked):
        try:
            out = render(marked)
        except Exception:  # noqa: BLE001  (the template refuses the marked content: try the next way)
            return None
        clean, vals, pos = _markers(out)
        return (vals, pos) if clean == text else None

    # 1. whole-content markers
    got = attempt([dict(m, content=chr(MSG_MARK + 2 * i) + m["content"] + chr(MSG_MARK + 2 * i + 1))
                   if m["role"] == "assistant" else m for i, m in enumerate(msgs)])
    spans = _spans_whole(*got, asst) if got is not None else None
    if spans is None:
        # 2. word markers
        rx = _word_re(tok)
        words, contents, marked = {}, {}, []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                marked.append(m)
                continue
            c = m["content"]
            w = _words(rx, c)
            if len(w) > _MAX_WORDS:
                raise ChatFormatError(f"messages[{i}].content: {len(w)} words; at most {_MAX_WORDS} can be located.")
            words[i], contents[i] = w, c
            o, cl = chr(MSG_MARK + 2 * i), chr(MSG_MARK + 2 * i + 1)
            parts, pos = [], 0
            for j, (a, b) in enumerate(w):
                parts += [c[pos:a], o, chr(WORD_MARK + j), c[a:b], cl]
                pos = b
            parts.append(c[pos:])
            marked.append(dict(m, content="".join(parts)))
        got = attempt(marked)
        spans = _spans_words(*got, words, contents, text) if got is not None else None
    if spans is None:
        bad = next((i for i in asst if msgs[i]["content"].strip()), asst[0])
        raise ChatFormatError(
            f"messages[{bad}]: cannot locate the assistant content in the text the chat template renders "
            "(the template transforms it in a way other than stripping whitespace or splitting on tags, e.g. "
            "JSON-escaping, truncating or repeating it), so no assistant mask can be made. Use another "
            "template (--chat-template) or --targets all.")
    out = sorted(spans.values())
    for (a0, b0), (a1, b1) in zip(out, out[1:]):
        if a1 < b0:
            raise ChatFormatError("chat template interleaves two assistant messages; cannot tell their tokens apart.")
    return [(a, b) for a, b in out if b > a]


def render_chat(tok: Tokenizer, messages: Sequence[dict], template: str | Path | None = None,
                add_generation_prompt: bool = False) -> RenderedChat:
    """Render `messages` with `template` (default: the tokenizer's own, else a built-in one),
    tokenise, and mark assistant tokens."""
    msgs = validate_messages(messages)
    tpl = _compiled(chat_template_source(tok, template))

    def name(i):
        return None if i is None else tok.token_str(i)

    now = datetime.now()
    ctx = dict(add_generation_prompt=add_generation_prompt, bos_token=name(tok.bos_id) or "",
               eos_token=name(tok.eos_id) or "", tools=None, documents=None,
               strftime_now=lambda fmt: now.strftime(fmt))

    def render(ms):
        return tpl.render(messages=ms, **ctx)

    try:
        text = render(msgs)
    except ChatFormatError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ChatFormatError(f"chat template failed to render these messages: {e}") from e
    cspans = _locate_assistant(tok, render, msgs, text)

    ids, off = tok.encode_with_offsets(text)
    mask = np.zeros(len(ids), dtype=bool)
    if cspans:
        sp = char_to_byte_offsets(text)[np.asarray(cspans, dtype=np.int64)]  # char -> byte spans
        # token i overlaps span j  <=>  off_start < span_end and off_end > span_start
        j = np.searchsorted(sp[:, 1], off[:, 0], side="right")  # first span ending after token start
        ok = j < len(sp)
        jj = np.minimum(j, len(sp) - 1)
        mask = ok & (off[:, 1] > sp[jj, 0]) & (off[:, 1] > off[:, 0])
        # the end-of-turn special token closing each assistant span (after whitespace-only tokens)
        is_sp = tok.token_bytes.is_special[ids]
        text_b = text.encode("utf-8")
        nxt = np.searchsorted(off[:, 0], sp[:, 1], side="left")
        for k in nxt.tolist():
            gap = []
            while k < len(ids) and not is_sp[k] and not text_b[off[k, 0]:off[k, 1]].strip():
                gap.append(k)
                k += 1
            if k < len(ids) and is_sp[k] and (int(ids[k]) != tok.bos_id or int(ids[k]) == tok.eos_id):
                mask[k] = True
                mask[gap] = True
    return RenderedChat(text=text, ids=ids, assistant_mask=mask, offsets=off)

