"""Train the shipped model: a small Llama for the built-in tasks, from scratch, seeded.

Run ``python -m rankdown.train_shipped --out rankdown/shipped_model``. It trains a BPE
tokenizer and a ``LlamaForCausalLM`` (grouped-query attention, untied embeddings, RoPE) on
the training splits of ``rankdown.tasks`` only, then writes a Hugging Face folder with fp16
safetensors weights and a JSON-lines training log. Evaluation splits are never seen.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rankdown.tasks import Split, load_task, math_problems

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 512
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 2000
    peak_lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    mix_math: float = 0.4
    mix_code: float = 0.35
    threads: int = 2


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token, so arithmetic is learnable digit by digit."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


class Batches:
    """Random training windows, each starting with BOS, drawn per-domain by the mix weights."""

    def __init__(self, cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.bos = tokenizer.bos_token_id
        self.math_lines = [
            tokenizer(p.prompt + p.answer + "\n", add_special_tokens=False)["input_ids"]
            for p in math_problems(Split.TRAIN)
        ]
        self.streams = {}
        for name in ("code", "prose"):
            ids: list[int] = []
            texts = list(load_task(name, Split.TRAIN).texts)
            for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
                ids.extend(enc.ids)
            self.streams[name] = torch.tensor(ids, dtype=torch.long)

    def _math(self) -> list[int]:
        ids = [self.bos]
        while len(ids) < self.cfg.seq_len + 1:
            ids.extend(self.rng.choice(self.math_lines))
        return ids[: self.cfg.seq_len + 1]

    def _window(self, name: str) -> list[int]:
        stream = self.streams[name]
        start = self.rng.randrange(0, len(stream) - self.cfg.seq_len)
        return [self.bos] + stream[start : start + self.cfg.seq_len].tolist()

    def next(self) -> torch.Tensor:
        rows = []
        for _ in range(self.cfg.batch_size):
            u = self.rng.random()
            if u < self.cfg.mix_math:
                rows.append(self._math())
            elif u < self.cfg.mix_math + self.cfg.mix_code:
                rows.append(self._window("code"))
            else:
                rows.append(self._window("prose"))
        return torch.tensor(rows, dtype=torch.long)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float16",
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, out: Path) -> None:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    corpus = [t for name in ("math", "code", "prose") for t in load_task(name, Split.TRAIN).texts]
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    model.train()
    batches = Batches(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.peak_lr,
        betas=(0.9, 0.95),
    )
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.jsonl"
    start = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    with log_path.open("w") as log:
        log.write(json.dumps({"config": asdict(cfg), "parameters": n_params}) + "\n")
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            ids = batches.next()
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 25 == 0 or step == cfg.steps - 1:
                record = {"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step, cfg),
                          "elapsed_s": round(time.perf_counter() - start, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
    model.eval()
    model.half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"saved {out} after {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args(argv)
    train(TrainConfig(steps=args.steps), args.out)


if __name__ == "__main__":
    main()
