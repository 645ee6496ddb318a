"""Canonical token bytes against each tokenizer library's own decode and published reference ids."""
from __future__ import annotations

import inspect
import json
import pickle
import textwrap

import numpy as np
import pytest

from conftest import MISTRAL_SPM, MISTRAL_SPM_V3, TEKKEN, asset
from xtok.tokens import TokenBytes, TokenizerLoadError, bytes_to_unicode, char_to_byte_offsets, load_tokenizer

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "Tabs\tand   spaces   \n  indented line; digits 31415926535 and 1,000.50\n"
    "Café naïve façade — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 👍🏽 👨‍👩‍👧 Привет\n"
    + inspect.getsource(textwrap.dedent)
)

HF_ASSETS = ["gpt2", "llama2", "llama3", "qwen3", "deepseek-v4", "mistral", "gemma3"]
EXACT_KINDS = {"byte_level", "tekken", "sentencepiece"}  # reproduce the text byte for byte


def _hf_backend(path):
    """The `tokenizers` library's own tokenizer for an asset folder (tokenizer.json or tokenizer.json.xz)."""
    import lzma

    from tokenizers import Tokenizer

    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    with lzma.open(path / "tokenizer.json.xz", "rt", encoding="utf-8") as f:  # gemma3 (SOURCES.md)
        return Tokenizer.from_str(f.read())


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


@pytest.mark.parametrize("name", ["qwen3", "llama3", "gpt2", "llama2", "mistral"])
def test_parse_special_false_encodes_special_strings_as_text(name):
    """encode(parse_special=False): special-token strings in the text are text (as the SentencePiece
    and Tekken backends do); the shared tokenizer still parses them for everyone else."""
    tok = load_tokenizer(asset(f"tokenizers/{name}"))
    specials = sorted(tok.special_tokens)[:12]
    assert specials
    text = "hi " + " x".join(specials) + specials[0] + "tail\n" + specials[-1]
    lit = tok.encode(text, parse_special=False)
    assert not tok.token_bytes.is_special[lit].any(), [tok.token_str(int(i)) for i in lit]
    got = tok.token_bytes.concat(lit)
    assert got == (b" " if tok.prefix_space else b"") + text.encode()
    parsed = tok.encode(text)  # default: parsed, also after the literal encode
    assert tok.special_tokens[specials[0]] in parsed.tolist()
    assert not tok.backend.tok.encode_special_tokens  # the shared tokenizer was not switched
    if (asset(f"tokenizers/{name}") / "tokenizer.model").exists():  # sentencepiece never parses control text
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(asset(f"tokenizers/{name}/tokenizer.model")))
        assert lit.tolist() == sp.encode(text)
    # both modes from several threads at once give the single-threaded answers
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda k: tok.encode(text, parse_special=bool(k % 2)).tolist(), range(16)))
    assert all(o == (parsed.tolist() if k % 2 else lit.tolist()) for k, o in enumerate(outs))
    if name == "gpt2":  # (small: pickling re-serialises the whole tokenizer)
        t2 = pickle.loads(pickle.dumps(tok))
        assert tok.backend._literal is not None and t2.backend._literal is None  # the copy is rebuilt
        assert t2.encode(text, parse_special=False).tolist() == lit.tolist()
        assert t2.encode(text).tolist() == parsed.tolist()


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
        if tok.kind != "wordpiece":  # (WordPiece normalises: see test_wordpiece_bytes_equal_library_decode)
            # exactly the text, with one extra leading space for prefix-space tokenizers (none here normalises)
            want_b = (b" " if tok.prefix_space and text else b"") + text.encode()
            assert tok.token_bytes.concat(ids) == want_b, (name, text)
    # SOURCES.md: this llama3 file has "ignore_merges": false and misses one case (45/46)
    assert n_ok >= len(inp) - (1 if name == "llama3" else 0), (name, n_ok)


def test_wordpiece_bytes_equal_library_decode():
    """WordPiece token bytes follow the decoder (``##`` continuations, cleanup of " ." " ," " !" " ?"):
    concat(bytes) is the tokenizer's own decode, on normal text and for every single token."""
    p = asset("tokenizers/bert-minilm")
    tok = load_tokenizer(p)
    hf = _hf_backend(p)
    assert tok.kind == "wordpiece" and tok.prefix_space
    texts = [TEXT, "Hello, World! The quick brown fox's 3.14 naïve café... Really?! Yes. (a, b) [c]; d: e",
             "x", "a . b , c ! d ? e", asset("corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:20000],
             asset("corpora/multilingual/de_stanford_wikipedia.txt").read_text(encoding="utf-8"),
             "\u2603 snowman \u0f0f unknown"]
    for text in texts:
        ids = tok.encode(text)
        assert ids.tolist() == hf.encode(text, add_special_tokens=False).ids
        got = tok.token_bytes.concat(ids)
        assert got[:1] == b" "  # the word-start space of the first token, which the decoder omits
        assert got[1:] == hf.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"), text[:60]
    # every vocabulary token after a word: the decoder's output for [word, token] is word + token bytes
    vocab = [i for i in range(tok.vocab_size) if not tok.token_bytes.is_special[i]]
    word = hf.token_to_id("word")
    dec = hf.decode_batch([[word, i] for i in vocab], skip_special_tokens=False)
    bad = [(hf.id_to_token(i), d) for i, d in zip(vocab, dec)
           if ("word" + tok.token_bytes.get(i).decode("utf-8")) != d]
    assert not bad, bad[:10]
    # glued punctuation has no word-start space; [UNK] is special with no bytes
    comma, unk = hf.token_to_id(","), hf.token_to_id("[UNK]")
    assert tok.token_bytes.get(comma) == b"," and not tok.token_bytes.word_start[comma]
    assert unk in tok.encode("\u2603").tolist() and tok.token_bytes.is_special[unk] and tok.token_bytes.get(unk) == b""


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


def test_token_bytes_lengths_cached_read_only_not_pickled(tekken_tok):
    import dataclasses

    pieces = [b"a", None, b" bc", b"", "日".encode(), None]
    for tb in (TokenBytes.from_list(pieces), tekken_tok.token_bytes):
        size = len(pickle.dumps(tb))
        ln = tb.lengths
        assert ln is tb.lengths  # computed once
        assert ln.dtype == np.int64 and np.array_equal(ln, np.diff(tb.offsets))
        assert not ln.flags.writeable
        with pytest.raises(ValueError):
            ln[0] = 7
        with pytest.raises(dataclasses.FrozenInstanceError):
            tb.lengths = ln
        assert len(pickle.dumps(tb)) == size  # the cache does not travel
        tb2 = pickle.loads(pickle.dumps(tb))
        assert np.array_equal(tb2.lengths, ln) and not tb2.lengths.flags.writeable
        assert np.array_equal(tb2.word_start, tb.word_start) and np.array_equal(tb2.offsets, tb.offsets)
    assert TokenBytes.from_list(pieces).lengths.tolist() == [1, 0, 3, 0, 3, 0]


def test_char_to_byte_offsets():
    for text in ["", "a", "abc", "é", "Café naïve — 日本語 👍🏽 👨\u200d👩\u200d👧", "\U0010FFFF\x00\x7f\x80\u07ff\u0800\uffff"]:
        want = [0]
        for ch in text:
            want.append(want[-1] + len(ch.encode("utf-8")))
        got = char_to_byte_offsets(text)
        assert got.dtype == np.int64 and got.tolist() == want
    with pytest.raises(UnicodeEncodeError):
        char_to_byte_offsets("a\ud800b")


def test_same_vocabulary_same_hash_and_pickle(spm_tok):
    other = load_tokenizer(asset("tokenizers/mistral/tokenizer.model"))
    assert other.content_hash == spm_tok.content_hash
    assert load_tokenizer(asset("tokenizers/mistral")).content_hash == spm_tok.content_hash
    assert load_tokenizer(asset("tokenizers/llama2")).content_hash != spm_tok.content_hash
    t2 = pickle.loads(pickle.dumps(spm_tok))
    assert t2.encode(TEXT).tolist() == spm_tok.encode(TEXT).tolist() and t2.content_hash == spm_tok.content_hash


def test_same_vocabulary_other_merges_other_hash(tmp_path):
    """SOURCES.md: this llama3 tokenizer.json has "ignore_merges": false; with true it encodes some
    words differently (same vocabulary, same token bytes). The content hash must tell them apart."""
    src = asset("tokenizers/llama3/tokenizer.json")
    spec = json.loads(src.read_text(encoding="utf-8"))
    assert spec["model"]["ignore_merges"] is False
    spec["model"]["ignore_merges"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    a, b = load_tokenizer(src), load_tokenizer(tmp_path / "tokenizer.json")
    assert a.token_bytes.sha256() == b.token_bytes.sha256()  # identical vocabulary table
    assert a.encode("Cửa Việt").tolist() != b.encode("Cửa Việt").tolist()  # but not the same tokenizer
    assert a.content_hash != b.content_hash
    # and the hash is a function of the behaviour: an unchanged copy of the file hashes the same
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "tokenizer.json").write_bytes(src.read_bytes())
    assert load_tokenizer(tmp_path / "same").content_hash == a.content_hash


def test_tokenizer_that_cannot_encode_the_probe_still_loads(tmp_path):
    """A Unigram vocabulary without an unk token raises on characters it lacks (the hash probe has
    many): it must still load, with a hash that is a function of what it does encode."""
    from tokenizers import Tokenizer, models

    hf = Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0), ("ab", -1.5), (" ", -3.0)], None, False))
    with pytest.raises(Exception, match="unk"):
        hf.encode("z")
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        hf.save(str(tmp_path / d / "tokenizer.json"))
    a, b = load_tokenizer(tmp_path / "one"), load_tokenizer(tmp_path / "two")
    assert a.encode("ab a").tolist() == hf.encode("ab a").ids
    assert len(a.content_hash) == 64 and a.content_hash == b.content_hash


def test_content_hash_depends_on_probe_ids(spm_tok):
    """A reference recomputation: sha256 over the table hash and the probe ids (tokens.py module doc)."""
    import hashlib

    from xtok.tokens import HASH_PROBE_TEXT

    ids = spm_tok.encode(HASH_PROBE_TEXT, parse_special=False)
    assert spm_tok.token_bytes.concat(ids) == b" " + HASH_PROBE_TEXT.encode()  # the probe is plain text
    h = hashlib.sha256(b"xtok-tokenizer-v2\0" + bytes.fromhex(spm_tok.token_bytes.sha256())
                       + len(ids).to_bytes(8, "little") + b"".join(int(i).to_bytes(8, "little") for i in ids))
    assert spm_tok.content_hash == h.hexdigest()


def test_encode_with_offsets_spans_hold_token_bytes(spm_tok, tekken_tok):
    text = "<s>[INST] Café 日本 👍🏽 ☕ 12345 [/INST] ok</s>"
    tb_text = text.encode()
    # (llama2's tokenizer.json: byte-fallback pieces of one character share its HF char offsets)
    hf = [load_tokenizer(asset(f"tokenizers/{n}")) for n in ("llama2", "qwen3")]
    for tok in (spm_tok, tekken_tok, *hf):
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


@pytest.mark.parametrize("name", ["spm", "spm_v3", "tekken", "gpt2", "llama2", "qwen3", "bert-minilm"])
def test_encode_batch_equals_the_loop(name):
    """Tokenizer.encode_batch (the library's own batch encoder) gives what encode gives text by text, for
    every combination of add_special_tokens / parse_special, also for texts holding special-token
    strings, empty texts and an empty batch."""
    spec = {"spm": MISTRAL_SPM, "spm_v3": MISTRAL_SPM_V3, "tekken": TEKKEN}.get(name)
    tok = load_tokenizer(spec if spec is not None else asset(f"tokenizers/{name}"))
    specials = sorted(tok.special_tokens)[:6]
    texts = [TEXT, "", "x", " leading space", "trailing  \n\n", "日本語 👍🏽 Café"] + \
        [f"{s}hi {s} there{s}" for s in specials] + ["".join(specials), "a" + " ".join(specials) + "\n"]
    for add in (False, True):
        for parse in (True, False):
            want = [tok.encode(t, add_special_tokens=add, parse_special=parse).tolist() for t in texts]
            got = tok.encode_batch(texts, add_special_tokens=add, parse_special=parse)
            assert all(g.dtype == np.int64 for g in got)
            assert [g.tolist() for g in got] == want, (name, add, parse)
            assert [g.tolist() for g in tok.encode_batch(texts, add_special_tokens=add, parse_special=parse,
                                                         num_threads=1)] == want
    assert tok.encode_batch([]) == []
