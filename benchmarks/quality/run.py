"""End-to-end cross-tokenizer distillation quality benchmark.

    python benchmarks/quality/run.py --preset real    # real pretrained teachers (issue 11): writes
                                                      # docs/results.md, docs/results.json, docs/results.png
    python benchmarks/quality/run.py --quick          # synthetic teacher (issue 7), smoke run
    python benchmarks/quality/run.py                  # synthetic teacher (issue 7), 3 seeds
    python benchmarks/quality/run.py --seeds 0,1 --steps 200 --out runs/quality/mine.json

`--preset real` / `real-smoke` are handled by benchmarks/quality/real.py (`--preset real --help`).
The synthetic presets below (`full`, `quick`) write runs/quality/<preset>.json and, only when
`--docs-dir` is given, results.md/.png there (docs/results.md belongs to the real preset).

A teacher (tokenizer A, byte-level BPE "tekken") is trained on the train split and cached under
``.cache/xtok-quality/``. Students share one small Llama architecture and are trained with the same
steps, data order and seeds; each student's held-out bits per byte (sum of -log2 p over held-out
tokens / held-out UTF-8 bytes) is reported, mean and spread over the seeds. The run writes a JSON
file (``--out``) and, unless ``--no-docs``, ``docs/results.md`` + ``docs/results.png`` from it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.quality import baselines  # noqa: E402
from benchmarks.quality.data import REPO, build_corpus  # noqa: E402
from benchmarks.quality.model import ModelConfig, TrainConfig, bits_per_byte, make_model, train  # noqa: E402

METHODS = {
    "sft": "(1) SFT only (tokenizer B)",
    "uld": "(2) ULD: sorted-probability distance, no alignment (tokenizer B)",
    "xtok_kl": "(3) xtok projected KL (tokenizer B)",
    "xtok_kl_chunk": "(4) xtok projected KL + chunk likelihood (tokenizer B)",
    "kd_same_tok": "(5) upper bound: same-tokenizer sparse top-k KD (tokenizer A)",
}

PRESETS = {
    # student steps, teacher steps, seeds
    "full": dict(steps=150, teacher_steps=400, seeds=[0, 1, 2]),
    "quick": dict(steps=30, teacher_steps=120, seeds=[0]),
}


def cache_dir() -> Path:
    d = Path(os.environ.get("XTOK_QUALITY_CACHE", REPO / ".cache" / "xtok-quality"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def get_teacher(corpus, mcfg: ModelConfig, tcfg: TrainConfig, seed: int, log_every: int):
    """Train (or load from cache) the tokenizer-A teacher. Returns (model, info)."""
    from transformers import LlamaForCausalLM

    d = cache_dir() / f"teacher-{_key(corpus.fingerprint(), asdict(mcfg), asdict(tcfg), seed)}"
    if (d / "info.json").exists():
        model = LlamaForCausalLM.from_pretrained(d).eval()
        info = json.loads((d / "info.json").read_text())
        info["cached"] = True
        print(f"teacher: loaded from {d} (held-out bpb {info['bpb']:.4f})", flush=True)
        return model, d, info
    print(f"teacher: training {tcfg.steps} steps ({asdict(mcfg)})", flush=True)
    model = make_model(corpus.A.vocab, mcfg, seed)
    tr = train(model, baselines.sft_objective(corpus.A), len(corpus.A.train), tcfg, seed,
               log_every=log_every, tag="teacher")
    info = {"bpb": bits_per_byte(model, corpus.A.heldout, corpus.heldout_bytes), **tr,
            "model": asdict(mcfg), "seed": seed}
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    (d / "info.json").write_text(json.dumps(info, indent=1))
    info["cached"] = False
    print(f"teacher: held-out bpb {info['bpb']:.4f} ({tr['train_seconds']:.0f}s)", flush=True)
    return model, d, info


def get_teacher_topk(teacher, teacher_dir: Path, corpus, k: int):
    p = teacher_dir / f"topk{k}.pkl"
    if p.exists():
        return pickle.loads(p.read_bytes())
    t0 = time.time()
    out = baselines.teacher_topk(teacher, corpus.A.train, k)
    p.write_bytes(pickle.dumps(out))
    print(f"teacher top-{k} targets for the same-tokenizer student: {time.time() - t0:.0f}s", flush=True)
    return out


def prepare_method(method: str, corpus, teacher, teacher_dir, args, ctx: dict) -> None:
    """Build (or load from the cache) what a method's jobs share; paths go into ``ctx["paths"]``."""
    paths = ctx.setdefault("paths", {})
    if method == "kd_same_tok" and "topk" not in paths:
        get_teacher_topk(teacher, teacher_dir, corpus, args.top_k)
        paths["topk"] = str(teacher_dir / f"topk{args.top_k}.pkl")
    if method in ("xtok_kl", "xtok_kl_chunk") and "xtok" not in paths:
        from benchmarks.quality import xtok_students  # needs xtok's extract/projection/collate/losses
        paths["xtok"] = xtok_students.prepare(corpus, teacher, teacher_dir, args)


def make_objective(method: str, corpus, teacher, args, paths: dict, cache: dict):
    """Returns (objective, tokenizer side the student uses)."""
    if method == "sft":
        return baselines.sft_objective(corpus.B), corpus.B
    if method == "uld":
        return baselines.uld_objective(corpus.B, corpus.A, teacher, args.alpha, args.uld_pairing,
                                       args.uld_top), corpus.B
    if method == "kd_same_tok":
        if "topk" not in cache:
            cache["topk"] = pickle.loads(Path(paths["topk"]).read_bytes())
        return baselines.sparse_kd_objective(corpus.A, cache["topk"], args.alpha), corpus.A
    if method in ("xtok_kl", "xtok_kl_chunk"):
        from benchmarks.quality import xtok_students
        return xtok_students.objective(paths["xtok"], corpus, method == "xtok_kl_chunk", args, cache), corpus.B
    raise ValueError(method)


_WORKER: dict = {}


def _worker_init(threads: int):
    torch.set_num_threads(threads)


def _log_run(run: dict, t_start: float):
    if "error" in run:
        print(f"{run['method']:14s} seed {run['seed']}: FAILED {run['error']}", flush=True)
        return
    print(f"{run['method']:14s} seed {run['seed']}: held-out bpb {run['bpb']:.4f}  (train "
          f"{run['train_seconds']:.0f}s, elapsed {time.time() - t_start:.0f}s)", flush=True)


def run_job(job: dict, corpus=None, teacher=None, ctx: dict | None = None) -> dict:
    try:
        return _run_job(job, corpus, teacher, ctx)
    except Exception as e:  # noqa: BLE001 - one failed student must not lose the others
        traceback.print_exc()
        return {"method": job["method"], "seed": job["seed"], "error": f"{type(e).__name__}: {e}"}


def _run_job(job: dict, corpus=None, teacher=None, ctx: dict | None = None) -> dict:
    """Train and evaluate one student (method, seed). In a worker process the corpus and the teacher
    are rebuilt / loaded from the cache once per process."""
    from transformers import LlamaForCausalLM

    args = argparse.Namespace(**job["args"])
    if corpus is None:
        if "corpus" not in _WORKER:
            _WORKER["corpus"] = build_corpus()
            t = LlamaForCausalLM.from_pretrained(job["teacher_dir"]).eval()
            for p in t.parameters():
                p.requires_grad_(False)
            _WORKER["teacher"] = t
            _WORKER["cache"] = {}
        corpus, teacher, cache = _WORKER["corpus"], _WORKER["teacher"], _WORKER["cache"]
    else:
        cache = ctx.setdefault("cache", {})
    method, seed = job["method"], job["seed"]
    objective, side = make_objective(method, corpus, teacher, args, job["ctx_paths"], cache)
    model = make_model(side.vocab, ModelConfig(**job["student_cfg"]), seed)
    tcfg = TrainConfig(**{k: v for k, v in job["train_cfg"].items()})
    tr = train(model, objective, len(side.train), tcfg, seed, log_every=args.log_every, tag=f"{method}/{seed}")
    t0 = time.time()
    bpb = bits_per_byte(model, side.heldout, corpus.heldout_bytes)
    return {"method": method, "seed": seed, "bpb": bpb, "train_seconds": tr["train_seconds"],
            "eval_seconds": time.time() - t0, "final_loss": tr["final_loss"]}


def summarise(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset and known.preset.startswith("real"):
        from benchmarks.quality import real
        return real.main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["full", "quick", "real", "real-smoke"], default=None,
                    help="real / real-smoke: real pretrained teachers (benchmarks/quality/real.py); "
                         "full / quick: the synthetic teacher")
    ap.add_argument("--quick", action="store_true", help="short smoke configuration (= --preset quick)")
    ap.add_argument("--seeds", default=None, help="a count N (seeds 0..N-1) or a comma list (\"0,\" = just seed 0; \"3,4\")")
    ap.add_argument("--steps", type=int, default=None, help="student training steps")
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument("--top-k", type=int, default=32, help="teacher top-k kept for sparse targets")
    ap.add_argument("--uld-pairing", choices=["proportional", "index"], default="proportional")
    ap.add_argument("--uld-top", type=int, default=1024,
                    help="ULD: compare the top-N sorted ranks + tail mass (0 = exact full sort)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (split over workers)")
    ap.add_argument("--workers", type=int, default=2,
                    help="student jobs run in this many processes (spawn), threads/workers torch threads each")
    ap.add_argument("--out", default=None, help="results JSON (default runs/quality/<preset>.json)")
    ap.add_argument("--no-docs", action="store_true", help="do not write results.md/.png")
    ap.add_argument("--docs-dir", default=None, help="where results.md/.png go (default: not written)")
    ap.add_argument("--log-every", type=int, default=0)
    args = ap.parse_args(argv)
    if args.preset == "quick":
        args.quick = True

    preset = dict(PRESETS["quick" if args.quick else "full"])
    steps = args.steps or preset["steps"]
    teacher_steps = args.teacher_steps or preset["teacher_steps"]
    if args.seeds is None:
        seeds = preset["seeds"]
    elif args.seeds.isdigit():
        seeds = list(range(int(args.seeds)))
    else:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    if not seeds:
        ap.error("--seeds: N (seeds 0..N-1) or a comma list such as 0, or 0,1,2")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m}")
    out = Path(args.out) if args.out else REPO / "runs" / "quality" / f"{'quick' if args.quick else 'full'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    t_start = time.time()
    corpus = build_corpus()
    summary = corpus.summary()
    print(json.dumps(summary), flush=True)

    student_cfg = ModelConfig(dim=128, layers=4, heads=4, ffn=384)
    teacher_cfg = ModelConfig(dim=192, layers=4, heads=4, ffn=512)
    teacher, teacher_dir, tinfo = get_teacher(
        corpus, teacher_cfg, TrainConfig(steps=teacher_steps, batch_size=args.batch_size, lr=args.lr,
                                         warmup=max(10, teacher_steps // 10)),
        seed=1234, log_every=args.log_every)
    for p in teacher.parameters():
        p.requires_grad_(False)

    scfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=max(10, steps // 10))
    results = {m: {"label": METHODS[m], "runs": []} for m in methods}
    ctx: dict = {}
    # shared artifacts (cached on disk) are prepared here, once; the jobs only load them
    for m in methods:
        try:
            prepare_method(m, corpus, teacher, teacher_dir, args, ctx)
        except Exception as e:  # noqa: BLE001 - report it, keep the other methods running
            traceback.print_exc()
            results[m]["skipped"] = f"{type(e).__name__}: {e}"
    jobs = [dict(method=m, seed=seed, teacher_dir=str(teacher_dir), student_cfg=asdict(student_cfg),
                 train_cfg=asdict(scfg), args=vars(args), ctx_paths=ctx.get("paths", {}))
            for seed in seeds for m in methods if not results[m].get("skipped")]
    if args.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.workers, initializer=_worker_init,
                                          initargs=(max(1, args.threads // args.workers),)) as pool:
            outs = pool.imap_unordered(run_job, jobs)
            for run in outs:
                _log_run(run, t_start)
                results[run.pop("method")]["runs"].append(run)
    else:
        for job in jobs:
            run = run_job(job, corpus=corpus, teacher=teacher, ctx=ctx)
            _log_run(run, t_start)
            results[run.pop("method")]["runs"].append(run)
    for m in methods:
        errs = [r for r in results[m]["runs"] if "error" in r]
        results[m]["runs"] = [r for r in results[m]["runs"] if "error" not in r]
        if errs and not results[m]["runs"]:
            results[m]["skipped"] = errs[0]["error"]
        results[m]["runs"].sort(key=lambda r: r["seed"])
        if results[m]["runs"]:
            results[m]["bpb"] = summarise([r["bpb"] for r in results[m]["runs"]])

    report = {
        "preset": "quick" if args.quick else "full", "seeds": seeds, "student_steps": steps,
        "teacher_steps": teacher_steps, "batch_size": args.batch_size, "lr": args.lr, "alpha": args.alpha,
        "top_k": args.top_k, "uld_pairing": args.uld_pairing, "uld_top": args.uld_top,
        "student_model": asdict(student_cfg), "teacher_model": asdict(teacher_cfg),
        "teacher": {"bpb": tinfo["bpb"], "cached": tinfo["cached"], "train_seconds": tinfo.get("train_seconds")},
        "corpus": summary, "methods": results, "xtok_notes": (ctx.get("paths", {}).get("xtok") or {}).get("notes", []),
        "wall_seconds": time.time() - t_start, "threads": args.threads, "workers": args.workers,
        "platform": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                    f"{os.cpu_count()} cpus visible",
        "command": " ".join(["python", "benchmarks/quality/run.py", *argv]),
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({report['wall_seconds']:.0f}s)", flush=True)
    if not args.no_docs and args.docs_dir:
        from benchmarks.quality.report import write_docs
        write_docs(report, Path(args.docs_dir))
    return report


if __name__ == "__main__":
    main()
