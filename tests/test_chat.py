"""Chat rendering: text equals a plain jinja2 render (and transformers' apply_chat_template); assistant masks
match content located independently, as each template emits it."""
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


# Meta-Llama-3-8B-Instruct's published chat template (tokenizer_config.json "chat_template"); the llama3
# asset's tokenizer_config.json ships none.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# whitespace around contents (templates that strip), and Qwen3-style reasoning blocks
MSGS_WS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi there?\n"},
    {"role": "assistant", "content": "\nHello there.\n"},
    {"role": "user", "content": "More, please"},
    {"role": "assistant", "content": "  Sure: 1, 2, 3.  "},
]
MSGS_THINK = [
    {"role": "system", "content": "Think first."},
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": "<think>\nSix sevens: 42.\n</think>\n\nIt is 42."},
    {"role": "user", "content": "And 6 * 8?"},
    {"role": "assistant", "content": "<think>Six eights are 48.</think>It is 48, café ☕."},
]


def plain_render(source, tok, messages, add_generation_prompt=False):
    """The template rendered by jinja2 directly, with the globals HF's apply_chat_template provides."""
    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    name = lambda i: "" if i is None else tok.token_str(i)  # noqa: E731
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=name(tok.bos_id), eos_token=name(tok.eos_id))


def renditions(kind, messages):
    """What each assistant message's content becomes in the rendered text, written out by hand from
    each template's source (independently of xtok.chat): [(message index, text)]."""
    out = []
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        c = m["content"]
        if kind in ("llama2", "llama3"):  # content.strip() / | trim
            out.append((i, c.strip()))
        elif kind == "qwen3":
            r = ""
            if "</think>" in c:
                r = c.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                c = c.split("</think>")[-1].lstrip("\n")
            if i > last_user and (i == len(messages) - 1 or r):
                if r:  # the reasoning is the assistant's: masked from <think> on
                    out.append((i, "<think>\n" + r.strip("\n") + "\n</think>\n\n" + c.lstrip("\n")))
                else:  # an empty <think> block the template adds itself: not content
                    out.append((i, c.lstrip("\n")))
            else:
                out.append((i, c))
        else:
            out.append((i, c))
    return out


def check_mask(tok, r, messages, kind="as-is"):
    text_b = r.text.encode()
    # locate each assistant rendition in order, independently of xtok's marker renders
    spans, start = [], 0
    for _, c in renditions(kind, messages):
        c = c.encode()
        i = text_b.find(c, start)
        assert i >= 0, ("content missing from rendered text", c)
        spans.append((i, i + len(c)))
        start = i + len(c)
    want = np.zeros(len(r.ids), bool)
    for k, (s, e) in enumerate(r.offsets.tolist()):
        want[k] = e > s and any(s < b and e > a for a, b in spans)
    # the end-of-turn special token closing each turn (after whitespace-only tokens the template puts there)
    for a, b in spans:
        nxt = np.nonzero(r.offsets[:, 0] >= b)[0]
        gap = []
        for k in nxt.tolist():
            if tok.token_bytes.is_special[r.ids[k]] or text_b[r.offsets[k, 0]:r.offsets[k, 1]].strip():
                break
            gap.append(k)
        else:
            k = None
        if k is not None and tok.token_bytes.is_special[r.ids[k]] and r.ids[k] != tok.bos_id:
            want[[k] + gap] = True
    bad = np.nonzero(want != r.assistant_mask)[0]
    assert bad.size == 0, [(int(k), tok.token_str(int(r.ids[k])), bool(r.assistant_mask[k])) for k in bad[:8]]
    # offsets are consistent with the text: non-special tokens' bytes are the text's bytes
    for tid, (s, e) in zip(r.ids, r.offsets):
        if not tok.token_bytes.is_special[tid] and tok.kind != "wordpiece":
            tb = tok.token_bytes.get(int(tid))
            assert text_b[s:e] == tb or (tb.startswith(b" ") and text_b[s:e] == tb[1:])
    return spans


@pytest.mark.parametrize("spec,tpl", [(TEKKEN, "inst"), (MISTRAL_SPM, "plain"), (TEKKEN, "chatml_text"), (MISTRAL_SPM, "inst")])
def test_builtin_templates(spec, tpl):
    tok = load_tokenizer(spec)
    source = DEFAULT_TEMPLATES["chatml"] if tpl == "chatml_text" else DEFAULT_TEMPLATES[tpl]
    r = render_chat(tok, MSGS, template=source)
    assert r.text == plain_render(source, tok, MSGS)
    check_mask(tok, r, MSGS)
    assert r.assistant_mask.sum() > 10


@pytest.mark.parametrize("msgs", [MSGS, MSGS_WS, MSGS_THINK], ids=["plain", "whitespace", "think"])
@pytest.mark.parametrize("spec,tpl", [(TEKKEN, "inst"), (MISTRAL_SPM, "plain"), (TEKKEN, "chatml")])
def test_builtin_templates_text_and_mask(spec, tpl, msgs):
    tok = load_tokenizer(spec)
    r = render_chat(tok, msgs, template=DEFAULT_TEMPLATES[tpl])
    assert r.text == plain_render(DEFAULT_TEMPLATES[tpl], tok, msgs)
    check_mask(tok, r, msgs)


REAL = {"llama2": ("tokenizers/llama2", None), "llama2-spm": ("tokenizers/llama2/tokenizer.model", "llama2"),
        "qwen3": ("tokenizers/qwen3", None), "llama3": ("tokenizers/llama3", LLAMA3_TEMPLATE)}


@pytest.mark.parametrize("msgs", [MSGS, MSGS_WS, MSGS_THINK], ids=["plain", "whitespace", "think"])
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_templates_text_equals_jinja_and_mask_is_content(name, msgs):
    """The models' own templates (which strip / trim content and rewrite <think> blocks): the text is
    exactly jinja's render of the real messages, the mask exactly the content as the template emits it."""
    path, tpl = REAL[name]
    tok = load_tokenizer(asset(path))
    if tpl == "llama2":  # the .model file has no template: use the folder's tokenizer_config.json
        tpl = asset("tokenizers/llama2/tokenizer_config.json")
    kind = name.split("-")[0]
    source = tok.chat_template if tpl is None else (tpl if isinstance(tpl, str) else None)
    if source is None:
        import json

        source = json.loads(tpl.read_text(encoding="utf-8"))["chat_template"]
    assert source
    r = render_chat(tok, msgs, template=tpl)
    assert r.text == plain_render(source, tok, msgs)
    spans = check_mask(tok, r, msgs, kind)
    assert len(spans) == 2 and r.assistant_mask.sum() >= 6
    eot = {"llama2": tok.eos_id, "qwen3": tok.special_tokens.get("<|im_end|>"),
           "llama3": tok.special_tokens.get("<|eot_id|>")}[kind]
    ends = np.nonzero(r.ids == eot)[0]
    assert r.assistant_mask[ends].sum() == 2  # both assistant turns close with a masked end-of-turn token
    if kind == "qwen3":  # user / system turns' <|im_end|> are not masked
        assert len(ends) == 5
    if kind == "llama2" and msgs is MSGS_WS:
        assert "[/INST] Hello there. </s>" in r.text


def test_real_templates_match_transformers_apply_chat_template():
    """The same renders as transformers' own apply_chat_template for the shipped templates."""
    transformers = pytest.importorskip("transformers")
    for name in ("qwen3", "llama2"):
        hf = transformers.AutoTokenizer.from_pretrained(str(asset(f"tokenizers/{name}")))
        tok = load_tokenizer(asset(f"tokenizers/{name}"))
        for msgs in (MSGS_WS, MSGS_THINK):
            assert render_chat(tok, msgs).text == hf.apply_chat_template(msgs, tokenize=False), name


def test_template_source_is_what_is_rendered(tmp_path, tekken_tok):
    from xtok.chat import chat_template_source, default_template

    qwen = load_tokenizer(asset("tokenizers/qwen3"))
    assert chat_template_source(qwen) == qwen.chat_template
    assert tekken_tok.chat_template is None
    src = chat_template_source(tekken_tok)
    assert src == default_template(tekken_tok) == DEFAULT_TEMPLATES["inst"]  # Tekken knows [INST]
    assert render_chat(tekken_tok, MSGS).text == plain_render(src, tekken_tok, MSGS)
    f = tmp_path / "t.jinja"
    f.write_text(DEFAULT_TEMPLATES["plain"], encoding="utf-8")
    assert chat_template_source(tekken_tok, f) == DEFAULT_TEMPLATES["plain"]
    assert render_chat(tekken_tok, MSGS, template=f).text == plain_render(DEFAULT_TEMPLATES["plain"], tekken_tok, MSGS)


def test_strftime_now_in_templates(tekken_tok):
    """`strftime_now` (HF's template global) works at top level, in macros and in {% set %}."""
    from datetime import datetime

    tpl = ("{% macro year() %}{{ strftime_now('%Y') }}{% endmacro %}{% set d = strftime_now('%Y-%m') %}"
           "{% for m in messages %}{{ year() }}|{{ d }}|{{ m['content'] }}\n{% endfor %}")
    before = datetime.now()
    r = render_chat(tekken_tok, MSGS[1:3], template=tpl)
    after = datetime.now()
    assert r.text in {"".join(f"{t:%Y}|{t:%Y-%m}|{m['content']}\n" for m in MSGS[1:3]) for t in (before, after)}
    assert r.assistant_mask.any()


def test_marker_pair_check():
    from xtok.chat import MSG_MARK as _MK, WORD_MARK as _WI, bad_marker_pairs as _bad_pairs

    op = np.array([_MK, _MK + 4], np.int64)
    assert not _bad_pairs(op, op + 1)
    assert _bad_pairs(op, op + 2)                       # a close marker that is not the partner
    assert _bad_pairs(op + 1, op + 2)                   # an odd (closing) code point as an opener
    assert _bad_pairs(np.array([_WI], np.int64), np.array([_WI + 1], np.int64))  # a word-index marker


def test_unlocatable_content_is_a_clear_error(tekken_tok):
    """Templates that cut or repeat the content: no mask can be right, so no silent guess."""
    for tpl in ("{% for m in messages %}{{ m['content'][:7] }}|{% endfor %}",
                "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"):
        with pytest.raises(ChatFormatError, match=r"messages\[2\]: cannot locate the assistant content"):
            render_chat(tekken_tok, MSGS, template=tpl)
    # a template that drops assistant messages altogether: nothing to mask, not an error
    r = render_chat(tekken_tok, MSGS, template="{% for m in messages %}{% if m.role != 'assistant' %}"
                                               "{{ m.content }}{% endif %}{% endfor %}")
    assert not r.assistant_mask.any()


def test_empty_template_file_names_the_file(tmp_path, tekken_tok):
    for name, body in (("empty.jinja", ""), ("blank.jinja", " \n\t\n"),
                       ("tokenizer_config.json", '{"chat_template": ""}')):
        f = tmp_path / name
        f.write_text(body, encoding="utf-8")
        with pytest.raises(ChatFormatError, match=f"{f}.*empty"):
            render_chat(tekken_tok, MSGS, template=f)


def test_bad_messages_clear_errors(tekken_tok):
    with pytest.raises(ChatFormatError, match="non-empty list"):
        render_chat(tekken_tok, [])
    with pytest.raises(ChatFormatError, match=r"messages\[1\]"):
        render_chat(tekken_tok, [{"role": "user", "content": "x"}, {"role": "assistant"}])
    with pytest.raises(ChatFormatError, match="does not compile"):
        render_chat(tekken_tok, MSGS, template="{% for m in messages %}")
    with pytest.raises(ChatFormatError, match="not a template file"):
        render_chat(tekken_tok, MSGS, template="/no/such/template.jinja")
