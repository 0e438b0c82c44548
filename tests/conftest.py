"""Shared fixtures: tiny random backbones (fast), the packaged MiniLM, and the shared GLUE data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(family: str, num_labels: int = 2, layers: int = 3):
    from transformers import BertConfig, LlamaConfig

    if family == "bert":
        return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                       num_labels=num_labels, pad_token_id=0)


def tiny_model(family: str, num_labels: int = 2, layers: int = 3, seed: int = 0):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels, layers),
                                                           attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny BERT with MiniLM's tokenizer: a real on-disk backbone that trains in seconds."""
    from autopeft.models import packaged_minilm

    out = tmp_path_factory.mktemp("tiny-bert")
    tiny_model("bert", layers=2).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_minilm() / f, out / f)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "glue" / "sst2" / "dev.tsv").is_file():
        pytest.skip(f"GLUE data not found at {SHARED_DATA} (CI checks the repo out with ../shared beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (initdb + pg_ctl in a temp dir, 127.0.0.1, password user) for the session."""
    from tests.postgres import TempPostgres, available

    reason = available()
    if reason:
        pytest.skip(reason)
    with TempPostgres() as pg:
        yield pg


@pytest.fixture
def postgres_url(postgres, request) -> str:
    """A fresh database on the session's server for one test: `postgresql+psycopg2://autopeft:PW@127.0.0.1:P/db`."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50] + "_" + os.urandom(3).hex()
    return postgres.create_database(name)
