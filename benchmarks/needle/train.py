"""Trains the retrieval model of :mod:`task` (a 2-layer Llama) on CPU and writes it as
safetensors with its config and training log.

    python benchmarks/needle/train.py --out benchmarks/needle/model

RoPE base 1e8: a third of the planes turn by less than 0.2 rad over 16K positions and can carry
the key match (with base 1e6 the same model lost records more than about 4K tokens back, dense
or not). Contexts grow to 8K in training, so that the match stands out among 16K tokens of
filler (trained up to 2K only, dense accuracy at 16K was 0.81).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import KEY0, KEYS, RECORD0, VALUE0, VALUES, VOCAB, make_batch  # noqa: E402

CONFIG = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=32768, rope_theta=1e8, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=None, pad_token_id=None)
LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
UNLOCK = 0.9  # running accuracy that unlocks the next length (a curriculum)
TOKENS_PER_STEP = 4096
QUERIES = 8


def build_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**CONFIG, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a record starts as its key plus its value (training does the rest)
        table = model.get_input_embeddings().weight
        keys = table[KEY0:KEY0 + KEYS].repeat_interleave(VALUES, dim=0)
        values = table[VALUE0:VALUE0 + VALUES].repeat(KEYS, 1)
        table[RECORD0:RECORD0 + KEYS * VALUES] = keys + values
    return model


def sample(stage: int, generator: torch.Generator):
    """A batch at one of the unlocked lengths ``LENGTHS[:stage]`` (the newest half the time)."""
    newest = stage - 1
    pick = newest if torch.rand((), generator=generator) < 0.5 else \
        int(torch.randint(0, stage, (1,), generator=generator))
    length = LENGTHS[pick]
    batch = max(1, TOKENS_PER_STEP // length)
    pairs = int(torch.randint(QUERIES, max(QUERIES, min(length // 2, 128)) + 1, (1,),
                              generator=generator))
    return make_batch(batch, length, pairs, QUERIES, generator)


def loss_and_accuracy(model, batch) -> tuple[torch.Tensor, float]:
    tokens, answers = batch.with_queries()
    logits = model(tokens).logits[:, answers]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.values.flatten())
    return loss, (logits.argmax(-1) == batch.values).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = build_model(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / warmup) * (
        0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = [f"seed {args.seed}, steps {args.steps}, lr {args.lr}, lengths {LENGTHS}, "
           f"{TOKENS_PER_STEP} tokens per step, torch {torch.__version__}"]
    start, recent, stage, running = time.time(), [], 1, 0.0
    for step in range(args.steps):
        loss, accuracy = loss_and_accuracy(model, sample(stage, generator))
        running = 0.95 * running + 0.05 * accuracy
        if running > UNLOCK and stage < len(LENGTHS):
            stage, running = stage + 1, 0.0
            log.append(f"step {step + 1}: length {LENGTHS[stage - 1]} unlocked")
            print(log[-1], flush=True)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent.append((loss.item(), accuracy))
        if (step + 1) % 50 == 0:
            mean_loss = sum(r[0] for r in recent) / len(recent)
            mean_acc = sum(r[1] for r in recent) / len(recent)
            recent = []
            line = (f"step {step + 1}: loss {mean_loss:.4f} accuracy {mean_acc:.3f} "
                    f"({time.time() - start:.0f} s)")
            log.append(line)
            print(line, flush=True)
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "train_log.txt").write_text("\n".join(log) + "\n")
    print(json.dumps({"saved": str(args.out), "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
