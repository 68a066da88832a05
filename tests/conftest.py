"""Shared fixtures: a tiny random Llama (hidden 64, 2 layers, GQA) saved as a user would have it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rankdown.shipped import SHIPPED_MODEL
from rankdown.tasks import Split, load_task
from rankdown.train_shipped import train_tokenizer

torch.set_num_threads(int(os.environ.get("RANKDOWN_TEST_THREADS", "2")))


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    texts = list(load_task("math", Split.TRAIN).texts[:50]) + list(load_task("prose", Split.TRAIN).texts[:20])
    return train_tokenizer(texts, vocab_size=400)


def write_tiny_model(folder: Path, tokenizer, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), **overrides)).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tiny_tokenizer)


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    assert (SHIPPED_MODEL / "model.safetensors").is_file(), "the shipped model is missing from the checkout"
    return SHIPPED_MODEL
