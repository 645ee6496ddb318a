"""Write a (tiny) transformers Llama model as a llama.cpp GGUF file with the `gguf` package.

Used by tests/test_gguf.py and the smoke test of the `real` preset, which need GGUF teachers in CI
where the real teacher packages are absent. Layout as llama.cpp's converter writes a Llama:

- tensors in F32 under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``,
  ``output``), the q/k projections with llama.cpp's row permutation (the rotary halves of each head
  interleaved), which transformers' GGUF loader undoes;
- ``llama.*`` hyper-parameters;
- the tokenizer as ``tokenizer.ggml.model = "llama"``: every SentencePiece piece with its score and
  token type (normal / unknown / control / byte ...) read from a real ``.model`` file, plus the
  BOS/EOS/UNK ids and ``add_bos_token``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation for a ``[n_head * head_dim, dim]`` weight: within every head the
    rows (two rotary halves of head_dim/2 rows) are interleaved pairwise. Its inverse is transformers'
    ``LlamaTensorProcessor._reverse_permute_weights``."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sentencepiece_vocab(model_file: str) -> tuple[list[str], list[float], list[int], dict]:
    """(pieces, scores, gguf token types, special ids) of a SentencePiece ``.model`` file."""
    import sentencepiece as spm
    from gguf import TokenType

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif sp.is_byte(i):
            t = TokenType.BYTE
        else:
            t = TokenType.NORMAL
        types.append(int(t))
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return pieces, scores, types, special


def write_llama_gguf(model, path: str | Path, sentencepiece_model: str, name: str = "tiny-llama") -> Path:
    """Write ``model`` (a transformers ``LlamaForCausalLM``) and the SentencePiece tokenizer
    ``sentencepiece_model`` as a GGUF file at ``path``. The model's vocabulary size must equal the
    tokenizer's."""
    import gguf

    cfg = model.config
    pieces, scores, types, special = sentencepiece_vocab(sentencepiece_model)
    if cfg.vocab_size != len(pieces):
        raise ValueError(f"model vocab {cfg.vocab_size} != tokenizer vocab {len(pieces)}")
    sd = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_head

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(special["bos"])
    w.add_eos_token_id(special["eos"])
    w.add_unk_token_id(special["unk"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def t(name_, arr):
        w.add_tensor(name_, np.ascontiguousarray(arr, dtype=np.float32))

    t("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        t(f"blk.{i}.attn_q.weight", permute_qk(sd[p + "self_attn.q_proj.weight"], n_head))
        t(f"blk.{i}.attn_k.weight", permute_qk(sd[p + "self_attn.k_proj.weight"], n_kv))
        t(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        t(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        t(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        t(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        t(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        t(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    t("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        t("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(vocab_size: int, seed: int = 0, dim: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               ffn: int = 64, logit_scale: float = 1.0):
    """A random-init Llama small enough for tests (GQA, untied head). ``logit_scale`` multiplies the
    output layer so that its next-token distributions are peaked rather than near-uniform."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # a wider init than the default 0.02, so that heads differ visibly
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
        m.lm_head.weight.mul_(logit_scale)
    return m
