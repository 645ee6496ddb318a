"""Issue 13's quality experiment on the `real` preset: more off-policy steps or on-policy steps?

    python benchmarks/quality/run.py --preset real --onpolicy

Starting point: the xtok projected-KL students of the main group (method ``xtok_kl``, one per seed; their
weights are kept by real.py). From each, the same extra **teacher budget** is spent three ways:

- ``offpolicy``: N more xtok-KL steps from the SmolLM2 store (``(1 - a) CE + a KL``, as in training);
- ``lam=0.5`` / ``lam=1``: each step is on-policy with probability lam (the rule of
  ``xtok.DistillationTrainer.is_on_policy_step``: a draw seeded by seed and step), otherwise an
  off-policy step as above. An on-policy step: the batch's training examples are cut into prompts
  (``xtok.onpolicy.split_prompt``, the first ``prompt_fraction`` of the student's tokens), the student
  samples ``max_new_tokens`` tokens (T = 1, ``xtok.onpolicy.generate``), the live SmolLM2 (the same GGUF
  file the store was extracted from, ``TeacherSpec(model=...)``) scores prompt + completion
  (``on_policy_batch`` + ``fill_online_targets``, projected through the same W), and the student
  minimises ``a KL`` on its generated tokens (no SFT term: ``sft=False``).

Budget (teacher forward tokens): an off-policy step costs the SmolLM2 tokens of its batch's examples
as `xtok extract` ran them (BOS included); an on-policy step the tokens of the live teacher's forward
over prompt + completion (its ``teacher_attention_mask``). B = the cost of the first N off-policy steps
of the continuation's batch schedule (per seed), so ``offpolicy`` takes exactly N steps and each
on-policy arm takes steps until it has spent B (the last step may go over: the tokens spent are
reported). Every arm: the same batch schedule (step i reads the same examples), a fresh AdamW at a
constant lr (the main schedule's final lr), the same seeds.

Evaluation of every arm and of the starting point: held-out bits per byte (all held-out examples), and
how much the teacher likes what the student writes: a fixed set of held-out prompts (the first half of
``eval_prompts`` held-out examples, evenly spaced, at most 64 student tokens), a completion of
``eval_new_tokens`` student tokens sampled at T = 1 with a fixed seed, and a greedy one; SmolLM2's bits
per byte of the completion given the prompt (its tokens of the text prompt + completion that start at or
after the prompt's end; a teacher token across the seam is left out of bits and bytes alike). As a
reference, the same for the held-out text's own continuation (the same number of student tokens).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import real_methods as rm
from .model import ModelConfig, TrainConfig, batch_schedule, heldout_bits, logits_of, make_model

LN2 = math.log(2.0)
ONPOLICY_VERSION = 1
PRIMARY = "smollm2"
EVAL_SEED = 20_13


def arms(cfg: dict) -> list[tuple[str, float]]:
    """(arm name, lam): the starting point (no steps), more off-policy steps, on-policy at each lam."""
    return [("start", -1.0), ("offpolicy", 0.0)] + [(f"lam={lam:g}", float(lam)) for lam in cfg["lams"]]


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def make_jobs(base_jobs: list[dict], cfg: dict, lr: float) -> list[dict]:
    """One job per (seed, arm) from the xtok_kl main-group jobs of real.py (their checkpoints)."""
    from .real import checkpoint_path, run_key

    jobs = []
    for b in base_jobs:
        ck = checkpoint_path(b)
        if ck is None:
            raise SystemExit("--onpolicy needs the xtok_kl students' weights: run without --fresh-runs")
        for arm, lam in arms(cfg):
            jobs.append({"arm": arm, "lam": lam, "seed": b["seed"], "base": b, "base_key": run_key(b),
                         "checkpoint": str(ck), "cfg": dict(cfg, lr=lr), "source": _source_hash(),
                         "version": ONPOLICY_VERSION})
    order = {"lam=1": 0, "lam=0.5": 1}
    jobs.sort(key=lambda j: (order.get(j["arm"], 2), j["arm"] == "start", j["seed"]))
    return jobs


def job_key(job: dict) -> str:
    from .real_prepare import content_key

    keep = {k: v for k, v in job.items() if k not in ("base",)}
    return f"onpolicy-{job['arm']}-s{job['seed']}-" + content_key(keep)


# ------------------------------------------------------------------------------------ per process
def _teacher(st: dict, path: str):
    if "live_teacher" not in st:
        from xtok.extract import load_teacher

        model, _, _ = load_teacher(path, dtype="float32", device="cpu")
        model.eval().requires_grad_(False)
        st["live_teacher"] = model
    return st["live_teacher"]


def _live_collator(st: dict, side, T: dict, teacher, top_k: int):
    k = "live_collator"
    if k not in st:
        from xtok import CrossTokenizerCollator, TeacherSpec

        spec = TeacherSpec(PRIMARY, T["path"], model=teacher, projection=T["W"], top_k=top_k)
        st[k] = CrossTokenizerCollator(side.tokenizer, [spec], max_length=4096, add_special_tokens=True)
    return st[k]


# -------------------------------------------------------------------------------------- evaluation
def teacher_bits(teacher, tok, prefix: bytes, cont: bytes) -> tuple[float, int]:
    """(bits, bytes) of the teacher on ``cont`` after ``prefix``: -log2 p of its tokens of
    ``prefix + cont`` (BOS first) that start at or after the end of ``prefix``, and the bytes they span."""
    text = (prefix + cont).decode("utf-8", errors="replace")
    n_pre = len(prefix.decode("utf-8", errors="replace").encode("utf-8"))
    ids, spans = tok.encode_with_offsets(text)
    ids = np.asarray(ids, dtype=np.int64)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if tok.bos_id is not None:
        ids = np.concatenate([[tok.bos_id], ids])
        spans = np.concatenate([[[0, 0]], spans])
    keep = np.flatnonzero(spans[:, 0] >= n_pre)
    keep = keep[keep >= 1]
    if keep.size == 0:
        return 0.0, 0
    with torch.no_grad():
        logits = teacher(input_ids=torch.as_tensor(ids)[None]).logits[0, :, : tok.vocab_size].double()
    lp = logits[:-1].log_softmax(-1).gather(-1, torch.as_tensor(ids[1:])[:, None])[:, 0]
    bits = -float(lp[torch.as_tensor(keep - 1)].sum()) / LN2
    return bits, int(spans[keep, 1].max() - spans[keep, 0].min())


def eval_prompts(corpus, side, collator, n: int, new_tokens: int):
    """The fixed held-out prompt set: (Prompt with full student ids, the held-out text's own continuation
    of ``new_tokens`` student tokens, as bytes)."""
    from xtok.onpolicy import split_prompt

    held = corpus.split.heldout
    idx = sorted(set(np.linspace(0, len(held) - 1, min(n, len(held))).round().astype(int).tolist()))
    out = []
    for i in idx:
        p = split_prompt(collator, {"id": f"heldout-{i:05d}", "text": held[i]}, 0.5, max_prompt_tokens=64)
        if p is None:
            continue
        ids, spans = side.tokenizer.encode_with_offsets(held[i])
        n_p = p.ids.shape[0] - (1 if side.tokenizer.bos_id is not None else 0)
        raw = held[i].encode("utf-8")
        end = int(spans[min(len(ids), n_p + new_tokens) - 1, 1])
        out.append((p, raw[len(p.text_bytes): end]))
    return out


def _repeat_share(ids: np.ndarray, n: int = 4) -> float:
    """Share of the completion's token n-grams that already occurred earlier in it."""
    grams = [tuple(ids[i:i + n].tolist()) for i in range(len(ids) - n + 1)]
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / max(len(grams), 1)


def evaluate(model, corpus, side, teacher, tok_t, prompts, new_tokens: int, lut) -> dict:
    from xtok.onpolicy import Prompt, generate

    out = {"heldout_bpb": heldout_bits(model, side.heldout) / corpus.heldout_bytes}
    cps = [Prompt(p.row, lut[p.ids]) for p, _ in prompts]
    for mode, temp in (("sampled", 1.0), ("greedy", 0.0)):
        comps = generate(model, cps, pad_id=0, eos_id=None, max_new_tokens=new_tokens, temperature=temp,
                         generator_seed=EVAL_SEED)
        bits = nbytes = 0.0
        reps = []
        for (p, _), c in zip(prompts, comps):
            b, n = teacher_bits(teacher, tok_t, p.text_bytes, side.tokenizer.decode_bytes(side.full_ids[c]))
            bits += b
            nbytes += n
            reps.append(_repeat_share(c))
        out[f"teacher_bpb_{mode}"] = bits / max(nbytes, 1)
        out[f"completion_bytes_{mode}"] = nbytes / max(len(comps), 1)
        out[f"repeated_4grams_{mode}"] = float(np.mean(reps))
        if mode == "sampled":
            out["sample"] = {"prompt": prompts[0][0].text_bytes.decode("utf-8", "replace")[-160:],
                             "completion": side.tokenizer.decode_bytes(side.full_ids[comps[0]]).decode("utf-8",
                                                                                                      "replace")}
    return out


def reference_bpb(teacher, tok_t, prompts) -> dict:
    bits = nbytes = 0.0
    for p, cont in prompts:
        b, n = teacher_bits(teacher, tok_t, p.text_bytes, cont)
        bits += b
        nbytes += n
    return {"teacher_bpb_heldout_continuation": bits / max(nbytes, 1), "bytes": nbytes / max(len(prompts), 1)}


# -------------------------------------------------------------------------------------------- arms
def run_job(job: dict) -> dict:
    cached = Path(job["base"]["run_cache"]) / f"{job_key(job)}.json" if job["base"].get("run_cache") else None
    if cached is not None and cached.exists():
        return dict(json.loads(cached.read_text()), cached=True)
    try:
        r = _run_job(job)
    except Exception as e:  # noqa: BLE001 - one failed arm must not lose the others
        traceback.print_exc()
        r = {"arm": job["arm"], "seed": job["seed"], "error": f"{type(e).__name__}: {e}"}
    if cached is not None and "error" not in r:
        from .real import write_atomic

        write_atomic(cached, lambda tmp: tmp.write_text(json.dumps(r)))
    return dict(r, cached=False)


def _run_job(job: dict) -> dict:
    from xtok.collate.device import fill_online_targets
    from xtok.onpolicy import Prompt, generate, on_policy_batch, split_prompt
    from xtok.tokens import load_tokenizer

    from .real import student_state, make_objective

    t0 = time.time()
    base, cfg, seed, lam = job["base"], job["cfg"], job["seed"], job["lam"]
    st = student_state(base)
    corpus = st["corpus"]
    side = corpus.sides["B"]
    T = base["teachers"][PRIMARY]
    teacher = _teacher(st, T["path"])
    if "tok_t" not in st:
        st["tok_t"] = load_tokenizer(T["path"])
    tok_t = st["tok_t"]
    col = _live_collator(st, side, T, teacher, cfg["top_k"])
    lut_np = side.compact_lut()
    lut = torch.as_tensor(lut_np)
    model = make_model(side.vocab, ModelConfig(**base["model_cfg"]), seed)
    model.load_state_dict(torch.load(job["checkpoint"], map_location="cpu"))
    prompts = eval_prompts(corpus, side, col, cfg["eval_prompts"], cfg["eval_new_tokens"])
    res = {"arm": job["arm"], "seed": seed, "lam": lam}
    if job["arm"] == "start":
        model.eval()
        res.update(evaluate(model, corpus, side, teacher, tok_t, prompts, cfg["eval_new_tokens"], lut_np))
        res.update(reference_bpb(teacher, tok_t, prompts))
        res.update(steps=0, onpolicy_steps=0, teacher_tokens=0, budget=0, seconds=time.time() - t0)
        return res

    objective, _ = make_objective(dict(base, method="xtok_kl"), st)
    subset = np.arange(0, len(side.train), base.get("train_every", 1))
    if "reader_" + PRIMARY not in st:
        st["reader_" + PRIMARY] = rm.StoreReader(T["store"])
    reader = st["reader_" + PRIMARY]
    # the on-policy loss: xtok_kl's aggregator (rm.xtok_objective), called with sft=False
    from xtok import MultiTeacherLossAggregator
    from xtok.losses import TeacherLoss

    a = base["alpha"]
    agg = MultiTeacherLossAggregator({PRIMARY: TeacherLoss(weight=a, chunk_weight=0.0)}, sft_weight=1 - a,
                                     normalize="per_component")
    cost_off = {}

    def off_cost(idx):
        tot = 0
        for i in idx:
            if i not in cost_off:
                cost_off[i] = len(reader.get(rm.train_key(i))["input_ids"])
            tot += cost_off[i]
        return tot

    N = cfg["offpolicy_steps"]
    sched = batch_schedule(len(subset), TrainConfig(steps=8 * N + 8, batch_size=base["train_cfg"]["batch_size"],
                                                    data_seed=1), seed)
    budget = sum(off_cost(subset[sched[s]]) for s in range(N))
    torch.manual_seed(seed + 7)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    model.train()
    spent = step = n_on = gen_tokens = seam = 0
    t_on = 0.0
    losses = []
    while spent < budget and step < len(sched):
        idx = subset[sched[step]]
        on = lam >= 1.0 or (lam > 0.0 and bool(np.random.default_rng([int(seed), int(step), 7]).random() < lam))
        if on:
            t1 = time.time()
            rows = [{"id": rm.train_key(i), "text": corpus.split.train[i]} for i in idx]
            ps = [p for p in (split_prompt(col, r, cfg["prompt_fraction"]) for r in rows) if p is not None]
            comps = generate(model, [Prompt(p.row, lut_np[p.ids]) for p in ps], pad_id=0, eos_id=None,
                             max_new_tokens=cfg["max_new_tokens"], temperature=1.0,
                             generator_seed=seed * 1_000_003 + step * 101)
            batch = on_policy_batch(col, ps, [side.full_ids[c] for c in comps])
            fill_online_targets(batch, col.teachers, col.student)
            cost = int(batch["teachers"][PRIMARY]["teacher_attention_mask"].sum())
            seam += batch["stats"]["onpolicy"]["seam_mismatch"]
            gen_tokens += batch["stats"]["onpolicy"]["generated_tokens"]
            cb = rm._compact_batch(batch, lut)
            loss, _ = agg(logits_of(model, cb["input_ids"]), cb, sft=False)
            n_on += 1
            t_on += time.time() - t1
        else:
            loss, _ = objective(model, idx)
            cost = off_cost(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        spent += cost
        step += 1
    model.eval()
    t_train = time.time() - t0
    res.update(evaluate(model, corpus, side, teacher, tok_t, prompts, cfg["eval_new_tokens"], lut_np))
    res.update(steps=step, onpolicy_steps=n_on, teacher_tokens=int(spent), budget=int(budget),
               generated_tokens=int(gen_tokens), seam_mismatch=int(seam), final_loss=float(np.mean(losses[-10:])),
               train_seconds=t_train, onpolicy_seconds=t_on, seconds=time.time() - t0)
    return res


# --------------------------------------------------------------------------------------- driver
def run(args, base_jobs: list[dict], cfg: dict, lr: float, main_runs: dict) -> dict:
    """All arms of all seeds (workers in parallel); returns the report's "onpolicy" section."""
    from .real import run_jobs, summarise

    t0 = time.time()
    jobs = make_jobs(base_jobs, cfg, lr)
    runs: dict = {}

    def collect(r):
        if "error" in r:
            print(f"onpolicy {r['arm']:9s} seed {r['seed']}: FAILED {r['error']}", flush=True)
        else:
            print(f"onpolicy {r['arm']:9s} seed {r['seed']}: held-out bpb {r['heldout_bpb']:.4f}, teacher bpb on "
                  f"samples {r['teacher_bpb_sampled']:.4f} (greedy {r['teacher_bpb_greedy']:.4f}), {r['steps']} steps "
                  f"({r['onpolicy_steps']} on-policy), {r['teacher_tokens']:,} teacher tokens"
                  f"{', cached' if r.get('cached') else ''} ({time.time() - t0:.0f}s)", flush=True)
        runs.setdefault(r["arm"], []).append(r)

    run_jobs(run_job, jobs, args.workers, args.threads, collect)
    out = {"settings": dict(cfg, lr=lr), "arms": {}, "wall_seconds": time.time() - t0,
           "budget_rule": "off-policy step: the SmolLM2 tokens of its batch's examples as `xtok extract` ran them "
                          "(BOS included); on-policy step: the live SmolLM2's forward tokens over prompt + completion; "
                          f"budget per seed = the cost of the first {cfg['offpolicy_steps']} off-policy steps of the "
                          "continuation's batch schedule"}
    metrics = ("heldout_bpb", "teacher_bpb_sampled", "teacher_bpb_greedy", "repeated_4grams_sampled",
               "repeated_4grams_greedy", "completion_bytes_sampled", "steps", "onpolicy_steps", "teacher_tokens",
               "budget", "seconds")
    for arm, _ in arms(cfg):
        rr = sorted((r for r in runs.get(arm, []) if "error" not in r), key=lambda r: r["seed"])
        a = {"runs": rr, "errors": [r["error"] for r in runs.get(arm, []) if "error" in r]}
        if rr:
            for m in metrics:
                if m in rr[0]:
                    a[m] = summarise([r[m] for r in rr])
        out["arms"][arm] = a
    start = out["arms"].get("start", {}).get("runs", [])
    if start:
        out["reference"] = {"teacher_bpb_heldout_continuation": start[0]["teacher_bpb_heldout_continuation"],
                            "bytes_per_continuation": start[0]["bytes"]}
        # the starting point is the main run's xtok_kl student: its held-out bpb must be the same figure
        main = {r["seed"]: r["bpb"] for r in main_runs.get("runs", [])}
        out["start_matches_main_run"] = {s["seed"]: [s["heldout_bpb"], main.get(s["seed"])] for s in start}
    out["paired"] = {}
    for arm, _ in arms(cfg):
        if arm in ("start", "offpolicy"):
            continue
        for m in ("heldout_bpb", "teacher_bpb_sampled", "teacher_bpb_greedy"):
            ra = {r["seed"]: r[m] for r in out["arms"].get(arm, {}).get("runs", [])}
            rb = {r["seed"]: r[m] for r in out["arms"].get("offpolicy", {}).get("runs", [])}
            d = [ra[s] - rb[s] for s in sorted(ra) if s in rb]
            if d:
                out["paired"][f"{arm} - offpolicy/{m}"] = {"paired": d, "mean": float(np.mean(d)),
                                                           "lower_in": int(sum(x < 0 for x in d)), "n": len(d)}
    return out
