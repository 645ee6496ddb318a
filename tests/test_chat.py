"""Chat rendering: text equals a plain jinja2 render; assistant masks match content located independently."""
from __future__ import annotations

import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conftest import MISTRAL_SPM, TEKKEN, asset
from xtok.chat import DEFAULT_TEMPLATES, ChatFormatError, render_chat
from xtok.tokens import load_tokenizer

MSGS = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 12 * 7?  Show   spaces."},
    {"role": "assistant", "content": "12 * 7 = 84 — café ☕ done."},
    {"role": "user", "content": "Und auf Deutsch?"},
    {"role": "assistant", "content": "Zwölf mal sieben ist 84.\n\nFertig."},
]


def plain_render(source, tok, messages):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    name = lambda i: "" if i is None else tok.token_str(i)  # noqa: E731
    return env.from_string(source).render(messages=messages, add_generation_prompt=False,
                                          bos_token=name(tok.bos_id), eos_token=name(tok.eos_id))


def check_mask(tok, r, messages):
    text_b = r.text.encode()
    # locate each assistant content in order, independently of the sentinel mechanism
    spans, start = [], 0
    for m in messages:
        c = m["content"].encode()
        i = text_b.find(c, start)
        assert i >= 0, "content missing from rendered text"
        if m["role"] == "assistant":
            spans.append((i, i + len(c)))
        start = i + len(c)
    for k, (tid, (s, e)) in enumerate(zip(r.ids, r.offsets)):
        overlaps = any(s < b and e > a for a, b in spans) and e > s
        if tok.token_bytes.is_special[tid]:
            continue
        assert bool(r.assistant_mask[k]) == overlaps, (k, tok.token_str(int(tid)))
    # every assistant turn ends with a masked end-of-turn special token when the template emits one
    for a, b in spans:
        nxt = np.nonzero(r.offsets[:, 0] >= b)[0]
        if len(nxt) and tok.token_bytes.is_special[r.ids[nxt[0]]]:
            assert r.assistant_mask[nxt[0]]
    # offsets are consistent with the text: non-special tokens' bytes are the text's bytes
    for tid, (s, e) in zip(r.ids, r.offsets):
        if not tok.token_bytes.is_special[tid] and tok.kind != "wordpiece":
            tb = tok.token_bytes.get(int(tid))
            assert text_b[s:e] == tb or (tb.startswith(b" ") and text_b[s:e] == tb[1:])


@pytest.mark.parametrize("spec,tpl", [(TEKKEN, "inst"), (MISTRAL_SPM, "plain"), (TEKKEN, "chatml_text"), (MISTRAL_SPM, "inst")])
def test_builtin_templates(spec, tpl):
    tok = load_tokenizer(spec)
    source = DEFAULT_TEMPLATES["chatml"] if tpl == "chatml_text" else DEFAULT_TEMPLATES[tpl]
    r = render_chat(tok, MSGS, template=source)
    assert r.text == plain_render(source, tok, MSGS)
    check_mask(tok, r, MSGS)
    assert r.assistant_mask.sum() > 10


def test_real_template_qwen3():
    tok = load_tokenizer(asset("tokenizers/qwen3"))
    assert tok.chat_template
    r = render_chat(tok, MSGS)
    check_mask(tok, r, MSGS)
    im_end = tok.special_tokens["<|im_end|>"]
    # both assistant turns close with a masked <|im_end|>; user turns' <|im_end|> are not masked
    ends = np.nonzero(r.ids == im_end)[0]
    assert r.assistant_mask[ends].sum() == 2 and len(ends) == 5


def test_bad_messages_clear_errors(tekken_tok):
    with pytest.raises(ChatFormatError, match="non-empty list"):
        render_chat(tekken_tok, [])
    with pytest.raises(ChatFormatError, match=r"messages\[1\]"):
        render_chat(tekken_tok, [{"role": "user", "content": "x"}, {"role": "assistant"}])
    with pytest.raises(ChatFormatError, match="does not compile"):
        render_chat(tekken_tok, MSGS, template="{% for m in messages %}")
    with pytest.raises(ChatFormatError, match="not a template file"):
        render_chat(tekken_tok, MSGS, template="/no/such/template.jinja")
