"""Chat templates: render a list of messages with a tokenizer's jinja template, and know which
tokens are assistant content.

`render_chat` renders with the template (the tokenizer's own, a given jinja string or file, or a
built-in default for tokenizers that ship none), tokenises the result with the tokenizer, and
marks assistant tokens. The mask comes from the rendered text itself: each assistant message's
content is located in the rendered string (sentinel markers wrap it during rendering and are
removed afterwards), so it works for any template, with or without `{% generation %}` markers.
The end-of-turn special token right after an assistant message is part of the mask (the model
must learn to stop).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from .tokens import Tokenizer

__all__ = ["RenderedChat", "render_chat", "load_template", "ChatFormatError", "DEFAULT_TEMPLATES"]

_OPEN, _CLOSE = "\ue000xtok-a\ue001", "\ue000/xtok-a\ue001"  # private-use sentinels

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
            cfg = json.loads(p.read_text(encoding="utf-8"))
            if "chat_template" not in cfg:
                raise ChatFormatError(f"{p}: no 'chat_template' field.")
            return cfg["chat_template"]
        return p.read_text(encoding="utf-8")
    if ("{{" in str(template)) or ("{%" in str(template)):
        return str(template)
    raise ChatFormatError(f"{template}: not a template file that exists, nor jinja template text.")


def default_template(tok: Tokenizer) -> str:
    if "<|im_start|>" in tok.special_tokens:
        return DEFAULT_TEMPLATES["chatml"]
    if "[INST]" in tok.special_tokens:
        return DEFAULT_TEMPLATES["inst"]
    return DEFAULT_TEMPLATES["plain"]


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
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


_COMPILED: dict[str, object] = {}


def _validate(messages) -> list[dict]:
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


def render_chat(tok: Tokenizer, messages: Sequence[dict], template: str | Path | None = None,
                add_generation_prompt: bool = False) -> RenderedChat:
    """Render `messages` with `template` (default: the tokenizer's own, else a built-in one),
    tokenise, and mark assistant tokens."""
    msgs = _validate(messages)
    source = load_template(template) or tok.chat_template or default_template(tok)
    tpl = _COMPILED.get(source)
    if tpl is None:
        try:
            tpl = _compile(source)
        except Exception as e:  # noqa: BLE001
            raise ChatFormatError(f"chat template does not compile: {e}") from e
        _COMPILED[source] = tpl
    marked = [dict(m, content=_OPEN + m["content"] + _CLOSE) if m["role"] == "assistant" else m for m in msgs]

    def name(i):
        return None if i is None else tok.token_str(i)

    try:
        raw = tpl.render(messages=marked, add_generation_prompt=add_generation_prompt, bos_token=name(tok.bos_id) or "",
                         eos_token=name(tok.eos_id) or "", tools=None, date_string=datetime.now().strftime("%d %b %Y"))
    except ChatFormatError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ChatFormatError(f"chat template failed to render these messages: {e}") from e

    # strip sentinels, remembering assistant byte spans in the clean text
    spans: list[tuple[int, int]] = []
    parts: list[str] = []
    nbytes = 0
    rest = raw
    while True:
        a = rest.find(_OPEN)
        if a < 0:
            parts.append(rest)
            break
        b = rest.find(_CLOSE, a)
        if b < 0:
            raise ChatFormatError("chat template duplicated or cut an assistant message; cannot locate its content.")
        head, body = rest[:a], rest[a + len(_OPEN):b]
        parts += [head, body]
        nbytes += len(head.encode("utf-8"))
        spans.append((nbytes, nbytes + len(body.encode("utf-8"))))
        nbytes += len(body.encode("utf-8"))
        rest = rest[b + len(_CLOSE):]
    text = "".join(parts)
    if _OPEN in text or _CLOSE in text:
        raise ChatFormatError("chat template nests assistant content; cannot locate it.")

    ids, off = tok.encode_with_offsets(text)
    mask = np.zeros(len(ids), dtype=bool)
    if spans:
        sp = np.asarray(spans, dtype=np.int64)
        # token i overlaps span j  <=>  off_start < span_end and off_end > span_start
        j = np.searchsorted(sp[:, 1], off[:, 0], side="right")  # first span ending after token start
        ok = j < len(sp)
        jj = np.minimum(j, len(sp) - 1)
        mask = ok & (off[:, 1] > sp[jj, 0]) & (off[:, 1] > off[:, 0])
        # the closing end-of-turn special token right after each assistant span
        is_sp = tok.token_bytes.is_special[ids]
        nxt = np.searchsorted(off[:, 0], sp[:, 1], side="left")
        for k in nxt[(nxt < len(ids))]:
            if is_sp[k] and (int(ids[k]) != tok.bos_id or int(ids[k]) == tok.eos_id):
                mask[k] = True
    return RenderedChat(text=text, ids=ids, assistant_mask=mask, offsets=off)
