"""Canonical token bytes against each tokenizer library's own decode and published reference ids."""
from __future__ import annotations

import inspect
import json
import pickle
import textwrap

import numpy as np
import pytest

from conftest import ASSETS, MISTRAL_SPM, MISTRAL_SPM_V3, TEKKEN, asset
from xtok.tokens import TokenBytes, TokenizerLoadError, bytes_to_unicode, load_tokenizer

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "Tabs\tand   spaces   \n  indented line; digits 31415926535 and 1,000.50\n"
    "Café naïve façade — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 👍🏽 👨‍👩‍👧 Привет\n"
    + inspect.getsource(textwrap.dedent)
)

HF_ASSETS = ["gpt2", "llama2", "llama3", "qwen3", "deepseek-v4", "mistral"]
EXACT_KINDS = {"byte_level", "tekken", "sentencepiece"}  # reproduce the text byte for byte


def _hf_backend(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


@pytest.mark.parametrize("name", HF_ASSETS)
def test_hf_token_bytes_equal_library_decode(name):
    p = asset(f"tokenizers/{name}")
    tok = load_tokenizer(p)
    hf = _hf_backend(p)
    for text in (TEXT, "x", " leading space", "trailing  \n\n"):
        ids = tok.encode(text)
        assert ids.tolist() == hf.encode(text, add_special_tokens=False).ids
        got = tok.token_bytes.concat(ids)
        if tok.prefix_space:  # the dummy prefix is in the bytes, not in the text
            assert got[:1] == b" "
            got = got[1:]
        assert got == hf.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8") or (
            # Llama-2 style decoders strip one leading space of the text itself
            got == (" " + hf.decode(ids.tolist(), skip_special_tokens=True)).encode("utf-8"))
        if not text.startswith(" "):  # (SentencePiece may drop a leading space of the text itself)
            assert got == text.encode("utf-8"), name  # none of these normalise this text


def test_sentencepiece_bytes_equal_library_decode(spm_tok):
    import sentencepiece as spm

    from xtok.tokens import builtin_tokenizer_path

    sp = spm.SentencePieceProcessor(model_file=str(builtin_tokenizer_path(MISTRAL_SPM)))
    assert spm_tok.prefix_space and spm_tok.kind == "sentencepiece"
    ids = spm_tok.encode(TEXT)
    assert ids.tolist() == sp.encode(TEXT)
    got = spm_tok.token_bytes.concat(ids)
    assert got == b" " + sp.decode(ids.tolist()).encode("utf-8") == b" " + TEXT.encode("utf-8")
    # byte fallback: a CJK/emoji char split over <0xNN> pieces still concatenates to its UTF-8 bytes
    fb = [i for i in ids.tolist() if sp.is_byte(i)]
    assert fb and all(len(spm_tok.token_bytes.get(i)) == 1 for i in fb)
    # control tokens: flagged special, no bytes
    for i in (sp.bos_id(), sp.eos_id()):
        assert spm_tok.token_bytes.is_special[i] and spm_tok.token_bytes.get(i) == b""


def test_tekken_bytes_equal_mistral_common_decode(tekken_tok):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from xtok.tokens import builtin_tokenizer_path

    ref = Tekkenizer.from_file(str(builtin_tokenizer_path(TEKKEN)))
    ids = tekken_tok.encode(TEXT)
    assert ids.tolist() == ref.encode(TEXT, bos=False, eos=False)
    assert tekken_tok.token_bytes.concat(ids) == TEXT.encode("utf-8")
    assert ref.decode(ids.tolist()) == TEXT
    assert not tekken_tok.prefix_space
    # specials (ids below the rank offset) have no bytes; [INST] in text parses to its id
    n_special = ref.num_special_tokens
    assert tekken_tok.token_bytes.is_special[:n_special].all() and tekken_tok.token_bytes.lengths[:n_special].sum() == 0
    assert not tekken_tok.token_bytes.is_special[n_special:].any()
    ids2 = tekken_tok.encode("[INST] hi [/INST]")
    assert ids2[0] == ref.control_token_id("[INST]") if hasattr(ref, "control_token_id") else ids2[0] < n_special


EDGE_OUT = {"gpt2": "gpt-2.out", "llama3": "llama-bpe.out", "qwen3": "qwen2.out", "llama2": "llama-spm.out",
            "bert-minilm": "bert-bge.out"}


@pytest.mark.parametrize("name", sorted(EDGE_OUT))
def test_edge_cases_match_reference_ids(name):
    """llama.cpp's 46 tokenizer edge cases; ids from the original HF tokenizers."""
    inp = asset("corpora/tokenizer-edge-cases/cases.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = asset(f"corpora/tokenizer-edge-cases/{EDGE_OUT[name]}").read_text(encoding="utf-8").split("\n")
    tok = load_tokenizer(asset(f"tokenizers/{name}"))
    n_ok = 0
    for text, line in zip(inp, out):
        want = [int(x) for x in line.split()]
        ids = tok.encode(text).tolist()
        n_ok += ids == want
        if ids == want and tok.kind != "wordpiece":
            got = tok.token_bytes.concat(ids)
            assert got[1:] == text.encode() if (tok.prefix_space and got[:1] == b" " and not text.startswith(" ")) \
                else got == text.encode() or tok.prefix_space, (name, text)
    # SOURCES.md: this llama3 file has "ignore_merges": false and misses one case (45/46)
    assert n_ok >= len(inp) - (1 if name == "llama3" else 0), (name, n_ok)


def test_wordpiece_bytes_follow_bert_pre_tokenization():
    p = asset("tokenizers/bert-minilm")
    tok = load_tokenizer(p)
    hf = _hf_backend(p)
    assert tok.kind == "wordpiece" and tok.prefix_space
    text = "Hello, World! The quick brown fox's 3.14 naïve café"
    ids = tok.encode(text)
    words = [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(text))]
    assert tok.token_bytes.concat(ids) == ("".join(" " + w for w in words)).encode("utf-8")
    unk = tok.encode("\u2603\u0f0f")  # unknown chars -> [UNK]: special, no bytes
    assert all(tok.token_bytes.is_special[i] for i in unk if tok.token_bytes.lengths[i] == 0)


def test_gpt2_byte_map_is_a_bijection():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
    assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("A")] == "A"


def test_token_bytes_concat_matches_python_join():
    pieces = [None, b"ab", b"", b" c", "é".encode(), None, b"\xe6\x97"]
    tb = TokenBytes.from_list(pieces)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(pieces), int(rng.integers(0, 30)))
        assert tb.concat(ids) == b"".join(pieces[i] or b"" for i in ids)
    assert tb.is_special.tolist() == [p is None for p in pieces]
    assert tb.word_start.tolist() == [bool(p) and p[:1] == b" " for p in pieces]


def test_same_vocabulary_same_hash_and_pickle(spm_tok):
    other = load_tokenizer(asset("tokenizers/mistral/tokenizer.model"))
    assert other.content_hash == spm_tok.content_hash
    assert load_tokenizer(asset("tokenizers/mistral")).content_hash == spm_tok.content_hash
    assert load_tokenizer(asset("tokenizers/llama2")).content_hash != spm_tok.content_hash
    t2 = pickle.loads(pickle.dumps(spm_tok))
    assert t2.encode(TEXT).tolist() == spm_tok.encode(TEXT).tolist() and t2.content_hash == spm_tok.content_hash


def test_encode_with_offsets_spans_hold_token_bytes(spm_tok, tekken_tok):
    text = "<s>[INST] Café 日本 👍🏽 12345 [/INST] ok</s>"
    tb_text = text.encode()
    for tok in (spm_tok, tekken_tok):
        ids, off = tok.encode_with_offsets(text)
        assert np.array_equal(ids, tok.encode(text))
        assert np.all(off[:, 1] >= off[:, 0]) and np.all(np.diff(off[:, 0]) >= 0)
        for i, (s, e) in zip(ids.tolist(), off.tolist()):
            b = tok.token_bytes.get(i)
            if tok.token_bytes.is_special[i]:
                assert tb_text[s:e].decode() in tok.special_tokens
            else:
                assert tb_text[s:e] == b or (tok.prefix_space and b[:1] == b" " and tb_text[s:e] == b[1:])


@pytest.mark.parametrize("text", [
    "[INST] What is it?[/INST] A fox.</s>[INST]\nNext  one[/INST]\n\n  ok.</s>",
    "<s>[INST]x[/INST] \t tab[INST]  two spaces[/INST]",
])
def test_offsets_tile_the_text_around_control_tokens(text):
    """SentencePiece adds its dummy-prefix space to every part between control tokens, also to a part
    that starts with a space or newline: spans must still tile the text exactly (no drift)."""
    tok = load_tokenizer(MISTRAL_SPM_V3)
    assert tok.token_bytes.is_special[tok.special_tokens["[INST]"]]
    tb_text = text.encode()
    ids, off = tok.encode_with_offsets(text)
    assert np.array_equal(ids, tok.encode(text))
    assert off[0, 0] == 0 and off[-1, 1] == len(tb_text) and np.array_equal(off[1:, 0], off[:-1, 1])
    for i, (s, e) in zip(ids.tolist(), off.tolist()):
        if tok.token_bytes.is_special[i]:
            assert tb_text[s:e].decode() in tok.special_tokens
        else:  # the token's bytes, or the same without the dummy-prefix space
            b = tok.token_bytes.get(i)
            assert tb_text[s:e] == b or (b[:1] == b" " and tb_text[s:e] == b[1:])


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerLoadError, match="/no/such/tok"):
        load_tokenizer("/no/such/tok")
    with pytest.raises(TokenizerLoadError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # folder without tokenizer files
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="not valid JSON"):
        load_tokenizer(bad)
    odd = tmp_path / "vocab.bin"
    odd.write_bytes(b"\x00")
    with pytest.raises(TokenizerLoadError, match="unknown tokenizer file type"):
        load_tokenizer(odd)
    with pytest.raises(TokenizerLoadError, match="no such file"):
        load_tokenizer("mistral-common:nope.json")
    j = tmp_path / "x.json"
    j.write_text(json.dumps({"hello": 1}), encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="x.json"):
        load_tokenizer(j)
