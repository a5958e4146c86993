"""Loading HF models from several threads at once (the experiment runner evaluates in threads).

transformers 5 builds a model on the meta device and ties its weights through process-wide
state; two unguarded threads in from_pretrained left BERT's tied decoder on the meta device
in 8 of 10 loads on the 2-core dev machine, and the experiment's evaluation then failed
with "Cannot copy out of meta tensor". `kd.models.load_mlm` serializes the loads.
"""

from __future__ import annotations

import threading

import pytest
import torch

from kdcl_dist.errors import UserError
from kdcl_dist.kd.models import check_materialized, load_mlm


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(d)
    return d


def _meta_tensors(model):
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def test_concurrent_loads_give_complete_tied_models(tiny_bert_dir):
    reference = load_mlm(str(tiny_bert_dir))
    problems: list[str] = []

    def load_several():
        for _ in range(4):
            try:
                m = load_mlm(str(tiny_bert_dir))
            except Exception as e:  # noqa: BLE001 - recorded and asserted below
                problems.append(repr(e))
                continue
            if _meta_tensors(m):
                problems.append(f"meta: {_meta_tensors(m)[:2]}")
            elif (
                m.cls.predictions.decoder.weight.data_ptr()
                != m.bert.embeddings.word_embeddings.weight.data_ptr()
            ):
                problems.append("decoder not tied to the word embeddings")
            elif not torch.equal(
                m.bert.embeddings.word_embeddings.weight,
                reference.bert.embeddings.word_embeddings.weight,
            ):
                problems.append("weights differ from a single-threaded load")

    threads = [threading.Thread(target=load_several) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []


def test_a_model_left_on_the_meta_device_is_refused_by_name():
    from transformers import BertConfig, BertForMaskedLM

    with torch.device("meta"):
        m = BertForMaskedLM(
            BertConfig(
                vocab_size=50,
                hidden_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
            )
        )
    with pytest.raises(
        UserError, match=r"some/model: \d+ tensors were not loaded .*bert\.embeddings"
    ):
        check_materialized(m, "some/model")
