"""Scale-out as real `torchrun --nproc-per-node 2` subprocesses on the CPU (gloo):

- DistillationTrainer under DDP: one SGD step of 2 ranks x 2 examples equals one single-process step
  over the same 4 examples (the loss is normalised by the trained tokens of all ranks), and both ranks
  end with the same parameters;
- `xtok extract` with two ranks: each writes its own shards, the last to finish merges the manifest,
  and every example equals a single-process extraction.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MISTRAL_SPM, TEKKEN

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, *args, timeout=600, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               NUMBA_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return r


def _rows(shakespeare_text, n):
    lines = [x for x in shakespeare_text.split("\n\n") if 150 < len(x) < 400]
    return [{"id": f"r{i}", "text": lines[2 * i]} for i in range(n)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from projection_tools.build import build_projection
    from transformers import LlamaConfig, LlamaForCausalLM
    from xtok.tokens import load_tokenizer

    d = tmp_path_factory.mktemp("ddp")
    tok = load_tokenizer(TEKKEN)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      initializer_range=0.5, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d / "teacher")
    build_projection(tok, load_tokenizer(MISTRAL_SPM), progress=False).save(d / "W.safetensors")
    return d


_TRAIN = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments
from xtok import CrossTokenizerCollator, DistillationTrainer, MultiTeacherLossAggregator, TeacherSpec
from xtok.losses import TeacherLoss

d, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = json.load(open(f"{d}/rows.json"))
teacher = AutoModelForCausalLM.from_pretrained(f"{d}/teacher")
torch.manual_seed(7)
cfg = LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)
student = LlamaForCausalLM(cfg)
col = CrossTokenizerCollator("mistral-common:tokenizer.model.v1",
                             [TeacherSpec("live", "mistral-common:tekken_240911.json", projection=f"{d}/W.safetensors",
                                          model=teacher, top_k=8)], max_length=64)
agg = MultiTeacherLossAggregator({"live": TeacherLoss(weight=1.0, chunk_weight=0.3)}, sft_weight=0.5)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=1, learning_rate=0.5, optim="sgd",
                         lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1e9, report_to=[], use_cpu=True,
                         seed=0, data_seed=0, save_strategy="no", disable_tqdm=True,
                         ddp_backend="gloo" if "WORLD_SIZE" in __import__("os").environ else None,
                         dataloader_num_workers=0)
tr = DistillationTrainer(model=student, args=args, train_dataset=rows, data_collator=col, aggregator=agg)
tr.train()
rank = tr.args.process_index
torch.save({k: v.detach().cpu() for k, v in tr.model.state_dict().items()}, f"{out}/params-r{rank}.pt")
'''


def test_ddp_step_equals_single_process_step(teacher, tmp_path, shakespeare_text):
    d = teacher
    (d / "rows.json").write_text(json.dumps(_rows(shakespeare_text, 8)), encoding="utf-8")
    script = tmp_path / "train.py"
    script.write_text(_TRAIN, encoding="utf-8")
    _torchrun(script, d, tmp_path / "ddp", 2)
    r0 = torch.load(tmp_path / "ddp" / "params-r0.pt")
    r1 = torch.load(tmp_path / "ddp" / "params-r1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP kept the ranks in sync
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), str(d), str(tmp_path / "one"), "4"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    one = torch.load(tmp_path / "one" / "params-r0.pt")
    init = {}
    torch.manual_seed(7)
    from transformers import LlamaConfig, LlamaForCausalLM

    init = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                        tie_word_embeddings=True)).state_dict()
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 1e-4  # the step moved the weights
    for k in one:
        assert torch.allclose(r0[k], one[k], rtol=1e-4, atol=1e-6), (k, float((r0[k] - one[k]).abs().max()))


_EXTRACT = "from xtok.cli import main\nmain()\n"


def test_extract_two_ranks_equals_one(teacher, tmp_path, shakespeare_text):
    from xtok.store import TeacherStore

    d = teacher
    rows = _rows(shakespeare_text, 10)
    with open(tmp_path / "data.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    script = tmp_path / "xtok_cli.py"
    script.write_text(_EXTRACT, encoding="utf-8")
    common = ["extract", "-m", d / "teacher", "--tokenizer", TEKKEN, "-d", tmp_path / "data.jsonl", "-k", "8",
              "--device", "cpu", "--quiet", "--shard-size", "2"]
    _torchrun(script, *common, "-o", tmp_path / "two")
    r = subprocess.run([sys.executable, str(script), *map(str, common), "-o", str(tmp_path / "one")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = sorted(os.listdir(tmp_path / "two" / "shards"))
    assert {s.split("-")[0] for s in shards} == {"r000of002", "r001of002"}, shards
    two, one = TeacherStore(tmp_path / "two"), TeacherStore(tmp_path / "one")
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["world"] == 2 and man["n_examples"] == len(rows) == len(two) == len(one)
    assert sorted(two.keys()) == sorted(one.keys())
    for key in one.keys():
        a, b = one[key], two[key]
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.topk_ids, b.topk_ids)
        # other batch compositions on the two ranks (padding, batch size): float32 rounding only
        assert np.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
        assert np.allclose(a.tail_mass, b.tail_mass, rtol=1e-5, atol=1e-7)
