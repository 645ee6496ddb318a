"""`xtok demo`: the whole pipeline, offline, on real tokenizers, in a few minutes on a CPU.

Teacher tokenizer: mistral-common's Tekken (131k byte-level BPE); student tokenizer: mistral-common's
SentencePiece 32k. Corpus: the docstrings of Python's own standard library (real English prose that
ships with every Python install), split train / held-out (every 10th example). Steps:

  1. a tiny Phi teacher over the Tekken vocabulary is trained on the train split (see train_teacher),
  2. `xtok build-projection` Tekken -> SentencePiece,
  3. `xtok extract` the teacher's top-k log-probs over the train split,
  4. `xtok align` on one held-out example,
  5. two students (SentencePiece vocabulary, same seed, same batches): SFT only, and SFT + the
     teacher's projected KL + chunk likelihood, batches from `CrossTokenizerCollator` in a DataLoader
     worker, loss from `MultiTeacherLossAggregator` on the fused (hidden, lm_head) path,
  6. held-out bits per byte of the teacher and both students.

Every finished step leaves its artefact in --workdir and is reused on the next run (--fresh redoes all).
About 4 minutes on 2 CPU cores from scratch. Measured with the defaults (one seed): teacher 1.87 bpb,
SFT-only student 2.47, distilled student 2.41 (KL + chunk; KL alone 2.44). With a dim-64 / 2-layer
student the distilled one was *worse* (2.55 vs 2.53): too small to use the teacher's signal here.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import time
from pathlib import Path

import click

from xtok.evaluation import pad_right

STUDENT_DIM, STUDENT_LAYERS = 128, 4  # a dim-64 / 2-layer student is too small to use the teacher's signal
TEACHER_TOK = "mistral-common:tekken_240911.json"
STUDENT_TOK = "mistral-common:tokenizer.model.v1"
# standard-library modules whose docstrings make the corpus (pure-Python sources on every install)
MODULES = ("argparse", "textwrap", "json.decoder", "json.encoder", "collections", "functools", "itertools",
           "inspect", "pathlib", "shutil", "subprocess", "tarfile", "zipfile", "logging", "logging.handlers",
           "unittest.case", "email.message", "http.client", "urllib.request", "urllib.parse", "datetime",
           "decimal", "fractions", "statistics", "random", "string", "difflib", "pprint", "heapq", "bisect",
           "calendar", "csv", "configparser", "contextlib", "dataclasses", "enum", "typing", "threading",
           "queue", "socket", "ssl", "asyncio.tasks", "asyncio.events", "multiprocessing.pool", "codecs",
           "locale", "gettext", "optparse", "tempfile", "glob", "fnmatch", "sched", "smtplib", "ftplib",
           "imaplib", "xml.dom.minidom", "xml.etree.ElementTree", "html.parser", "pickle", "copy", "weakref",
           "abc", "numbers", "operator", "base64", "hashlib", "hmac", "secrets", "uuid", "ipaddress", "mailbox",
           "pdb", "doctest", "trace", "timeit", "cProfile", "pstats", "tokenize", "ast", "dis", "traceback",
           "warnings", "sysconfig", "zipimport", "shlex", "cmd", "platform", "getpass", "selectors")


def stdlib_docstrings(n: int, min_chars: int = 160, max_chars: int = 480) -> list[str]:
    """Up to n distinct docstrings of the modules above (module, class and function docstrings, in
    source order), each cut at a line end to at most max_chars."""
    out, seen = [], set()
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < min_chars:
                continue
            if len(doc) > max_chars:
                cut = doc.rfind("\n", 0, max_chars)
                doc = doc[: cut if cut >= min_chars else max_chars].rstrip()
            if doc in seen:
                continue
            seen.add(doc)
            out.append(doc)
            if len(out) >= n:
                return out
    return out


def _say(step: str, msg: str = ""):
    click.secho(f"\n== {step}", bold=True)
    if msg:
        click.echo(msg)


def _tiny_llama(vocab: int, dim: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=3 * dim, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, use_cache=False)
    return LlamaForCausalLM(cfg)


def _lr(step: int, total: int, peak: float) -> float:
    """The demo's schedule: warmup over the first tenth of the steps, cosine to 0."""
    from xtok.evaluation import warmup_cosine

    return peak * warmup_cosine(step, total, max(1, total // 10))


def _fused(model, batch):
    """(final hidden states, output-layer weight): the losses' fused path, no full logits."""
    h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return h, model.lm_head.weight


def teacher_ids(texts: list[str]) -> list:
    """BOS + Tekken ids of each text: the way `xtok extract` renders text rows for this teacher."""
    import numpy as np

    from xtok.tokens import load_tokenizer

    tok = load_tokenizer(TEACHER_TOK)
    return [np.concatenate([[tok.bos_id], tok.encode(t)]).astype(np.int64) for t in texts]


def teacher_support(seqs: list):
    """Tekken ids that occur in the corpus (`seqs`: train and held-out) plus BOS/EOS: the ids the demo
    teacher's softmax runs over while it trains."""
    import numpy as np

    from xtok.tokens import load_tokenizer

    tok = load_tokenizer(TEACHER_TOK)
    return np.unique(np.concatenate(list(seqs) + [np.asarray([tok.bos_id, tok.eos_id])]))


def train_teacher(out: Path, seqs: list, support, steps: int, batch_size: int, seed: int, quiet: bool):
    """A tiny Phi model (a real Hugging Face causal LM whose output layer has a bias) over the full Tekken
    vocabulary, trained on `seqs` (`teacher_ids` of the train texts).

    A 131k-way softmax (and 131k-row embedding updates) per step would dominate a CPU demo, so the model
    trains over `support` only (the few thousand Tekken ids this corpus uses, renumbered 0..n-1); the
    saved checkpoint is the same model over the full vocabulary: the trained rows scattered back to their
    Tekken ids, every other output row with weight 0 and bias -1e4, so its full-vocabulary distribution
    is exactly the one it trained (the other ids get probability 0). `xtok extract` then treats it like
    any other teacher checkpoint."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import PhiConfig, PhiForCausalLM

    from xtok.tokens import load_tokenizer

    tok = load_tokenizer(TEACHER_TOK)
    sup = np.asarray(support, dtype=np.int64)
    lut = np.full(tok.vocab_size, -1, dtype=np.int64)
    lut[sup] = np.arange(sup.size)
    seqs = [lut[x] for x in seqs]
    assert all((s >= 0).all() for s in seqs), "support must hold every id of the texts"

    def config(vocab):
        return PhiConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=1024, bos_token_id=tok.bos_id,
                         eos_token_id=tok.eos_id, use_cache=False)

    torch.manual_seed(seed)
    model = PhiForCausalLM(config(int(sup.size)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(seqs))
    bar = tqdm(range(steps), desc="teacher", disable=quiet, dynamic_ncols=True)
    for step in bar:
        if (step + 1) * batch_size > len(order):
            order = np.concatenate([order, rng.permutation(len(seqs))])
        b = pad_right([seqs[i] for i in order[step * batch_size: (step + 1) * batch_size]], 0)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 3e-3)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    # the same model over the full Tekken vocabulary
    full = PhiForCausalLM(config(tok.vocab_size))
    src = model.state_dict()
    with torch.no_grad():
        for name, t in full.state_dict().items():
            if name == "model.embed_tokens.weight" or name == "lm_head.weight":
                t.zero_()
                t[torch.as_tensor(sup)] = src[name]
            elif name == "lm_head.bias":
                t.fill_(-1e4)
                t[torch.as_tensor(sup)] = src[name]
            else:
                t.copy_(src[name])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    full.save_pretrained(tmp)
    tmp.rename(out)  # a finished teacher folder only ever appears whole


def heldout_bpb(model, seqs, n_bytes: int, batch_size: int = 4) -> float:
    """Held-out bits per byte (`xtok.evaluation.bits_per_byte`, in the given order)."""
    from xtok.evaluation import bits_per_byte

    return bits_per_byte(model, seqs, n_bytes, batch_size, sort_by_length=False)


def train_student(collator, rows: list[dict], loss_fn, steps: int, batch_size: int, seed: int, desc: str,
                  quiet: bool):
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model = _tiny_llama(collator.student.vocab_size, STUDENT_DIM, STUDENT_LAYERS, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collator,
                        num_workers=1, persistent_workers=True, generator=torch.Generator().manual_seed(seed))
    bar = tqdm(total=steps, desc=desc, disable=quiet, dynamic_ncols=True)
    step, logs = 0, {}
    while step < steps:
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = _lr(step, steps, 3e-3)
            loss, logs = loss_fn(_fused(model, batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix({k: f"{float(v):.3f}" for k, v in logs.items() if k in ("loss", "sft")} , refresh=False)
            step += 1
            if step >= steps:
                break
    bar.close()
    return model, {k: float(v) for k, v in logs.items()}


@click.command("demo")
@click.option("--workdir", default=".cache/xtok-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the artefacts go (data, teacher, W, store); finished steps are reused on a re-run.")
@click.option("--examples", default=800, show_default=True, type=click.IntRange(min=20),
              help="Standard-library docstrings in the corpus (every 10th is held out).")
@click.option("--teacher-steps", default=300, show_default=True, type=click.IntRange(min=1),
              help="Training steps of the tiny teacher (8 examples each).")
@click.option("--student-steps", default=100, show_default=True, type=click.IntRange(min=1),
              help="Training steps of each of the two students (8 examples each).")
@click.option("--top-k", default=32, show_default=True, type=click.IntRange(min=1),
              help="Teacher log-probs stored per position by `xtok extract`.")
@click.option("--seed", default=0, show_default=True, help="Seed of the teacher, the students and the batch order.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch threads (default: torch's choice).")
@click.option("--fresh", is_flag=True, help="Delete --workdir first and redo every step.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo_cmd(workdir, examples, teacher_steps, student_steps, top_k, seed, threads, fresh, quiet):
    """Run the whole xtok pipeline offline on the real tokenizers mistral-common ships:
    train a tiny Tekken-vocabulary teacher on Python's standard-library docstrings, build the
    Tekken -> SentencePiece projection, extract the teacher's top-k log-probs, align one example,
    distil a SentencePiece student, and compare its held-out bits per byte with an SFT-only student
    trained on the same batches."""
    import torch

    from xtok import CrossTokenizerCollator, MultiTeacherLossAggregator, TeacherSpec
    from xtok.cli.align import align_cmd
    from xtok.cli.projection import build_projection_cmd
    from xtok.extract import ExtractConfig, ExtractError, extract
    from xtok.losses import TeacherLoss
    import transformers

    from xtok.store import StoreError, TeacherStore

    transformers.utils.logging.disable_progress_bar()  # weight loading / saving bars; ours stay
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    work = Path(workdir)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ctx = click.get_current_context()

    # -- 0. corpus --------------------------------------------------------------------------------
    texts = stdlib_docstrings(examples)
    if len(texts) < 20:
        raise click.ClickException(f"only {len(texts)} standard-library docstrings found; this Python install "
                                   "lacks its .py sources.")
    rows = [{"id": f"doc-{i:05d}", "text": t} for i, t in enumerate(texts)]
    train = [r for i, r in enumerate(rows) if i % 10]
    held = [r for i, r in enumerate(rows) if i % 10 == 0]
    data = work / "train.jsonl"
    payload = "".join(json.dumps(r) + "\n" for r in train)
    if not data.exists() or data.read_text(encoding="utf-8") != payload:
        data.write_text(payload, encoding="utf-8")
    n_bytes = sum(len(r["text"].encode()) for r in held)
    _say("0. corpus", f"{len(rows)} docstrings of Python's standard library: {len(train)} train, {len(held)} "
         f"held out ({n_bytes:,} bytes) -> {data}")

    # -- 1. teacher -------------------------------------------------------------------------------
    t_ids = dict(zip((r["id"] for r in rows), teacher_ids([r["text"] for r in rows])))
    tag = f"n{examples}-seed{seed}-s{teacher_steps}"  # what makes the teacher: corpus, seed, steps
    tdir = work / f"teacher-{tag}"
    _say("1. teacher", f"tiny Phi (dim 128, 3 layers) over the {TEACHER_TOK} vocabulary, {teacher_steps} steps "
         "(softmax over the corpus' ids while training; see `xtok.cli.demo.train_teacher`)")
    if not (tdir / "config.json").exists():
        t0 = time.perf_counter()
        train_teacher(tdir, [t_ids[r["id"]] for r in train], teacher_support(t_ids.values()), teacher_steps,
                      8, seed, quiet)
        click.echo(f"trained in {time.perf_counter() - t0:.0f}s -> {tdir}")
    else:
        click.echo(f"reusing {tdir}")

    # -- 2. projection ----------------------------------------------------------------------------
    W = work / "W-tekken-to-spm.safetensors"
    _say("2. xtok build-projection", f"--teacher {TEACHER_TOK} --student {STUDENT_TOK} -o {W}")
    if not W.exists():
        ctx.invoke(build_projection_cmd, teacher=TEACHER_TOK, student=STUDENT_TOK, output=str(W), top_k=None,
                   min_weight=0.0, normalize=True, special_map=None, batch_size=16384, stats_json=False,
                   quiet=quiet)
    else:
        click.echo(f"reusing {W}")

    # -- 3. extract -------------------------------------------------------------------------------
    store = work / f"store-{tag}-k{top_k}"
    _say("3. xtok extract", f"--model {tdir} --tokenizer {TEACHER_TOK} --dataset {data} --top-k {top_k} -o {store}")
    try:
        res = extract(ExtractConfig(model=str(tdir), tokenizer=TEACHER_TOK, dataset=str(data), output=str(store),
                                    top_k=top_k, device="auto", progress=not quiet))
    except (ExtractError, StoreError) as e:
        raise click.ClickException(f"{e} (or run `xtok demo --fresh` to redo every step)") from None
    st = TeacherStore(store)
    click.echo(f"{res['stats']['examples']} new examples, {res['stats']['positions']:,} positions "
               f"({res['stats']['seconds']:.1f}s); the store holds {len(st)} examples, "
               f"{sum(p.stat().st_size for p in store.rglob('*.parquet')) / 1e3:,.0f} kB of shards")

    # -- 4. align ---------------------------------------------------------------------------------
    sample = work / "heldout-0.txt"
    sample.write_text(held[0]["text"], encoding="utf-8")
    _say("4. xtok align", f"--teacher {TEACHER_TOK} --student {STUDENT_TOK} {sample} --max-rows 12")
    ctx.invoke(align_cmd, teacher=TEACHER_TOK, student=STUDENT_TOK, file=str(sample), as_json=False, chat=False,
               teacher_template=None, student_template=None, max_rows=12)

    # -- 5. students ------------------------------------------------------------------------------
    _say("5. students", f"tiny Llama (dim {STUDENT_DIM}, {STUDENT_LAYERS} layers) on the {STUDENT_TOK} vocabulary, "
         f"{student_steps} steps each, same seed and batches; CrossTokenizerCollator in a DataLoader worker; "
         "loss SFT vs SFT + projected KL + 0.5 chunk likelihood")
    collator = CrossTokenizerCollator(STUDENT_TOK, [TeacherSpec("tekken", TEACHER_TOK, str(store), str(W))],
                                      max_length=1024)
    sft_only = MultiTeacherLossAggregator({}, sft_weight=1.0)
    distil = MultiTeacherLossAggregator({"tekken": TeacherLoss(weight=1.0, chunk_weight=0.5)}, sft_weight=1.0)
    s_sft, _ = train_student(collator, train, sft_only, student_steps, 8, seed + 1, "student SFT", quiet)
    s_kd, logs = train_student(collator, train, distil, student_steps, 8, seed + 1, "student SFT+KD", quiet)
    click.echo("last distillation step: " + ", ".join(f"{k} {v:.3f}" for k, v in logs.items()
                                                       if k in ("sft", "kl/tekken", "chunk/tekken")))

    # -- 6. held-out bits per byte ----------------------------------------------------------------
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32)
    s_seqs = [collator.tokenize(r).input_ids for r in held]  # the student ids training used
    table = [("teacher (Tekken 131k)", heldout_bpb(teacher, [t_ids[r["id"]] for r in held], n_bytes)),
             ("student, SFT only (SentencePiece 32k)", heldout_bpb(s_sft, s_seqs, n_bytes)),
             ("student, SFT + xtok KL + chunk (SentencePiece 32k)", heldout_bpb(s_kd, s_seqs, n_bytes))]
    _say("6. held-out bits per byte (lower is better)")
    for name, v in table:
        click.echo(f"  {name:<52} {v:.4f}")
    d = table[2][1] - table[1][1]
    click.echo(f"distilled - SFT only: {d:+.4f} bpb ({'better' if d < 0 else 'not better'} at this tiny budget; "
               f"one seed)")
    (work / "results.json").write_text(json.dumps({n: v for n, v in table}, indent=1) + "\n", encoding="utf-8")
    click.echo(f"\ndone in {time.perf_counter() - t_start:.0f}s; artefacts in {work}")
