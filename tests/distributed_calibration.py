"""One rank of a calibration run (run by tests/test_calibration.py, 1 or 2 processes).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python distributed_calibration.py OUT

With WORLD_SIZE > 1 it joins a gloo process group; rank 0 saves the adapter to OUT.
"""

from __future__ import annotations

import os
import sys

import torch
from models import tiny_model

import dsa_compile


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=int(os.environ["RANK"]),
                                             world_size=world)
    torch.manual_seed(0)
    model = tiny_model("llama", "sdpa")
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 100, (1, 48), generator=gen) for _ in range(4)]
    dsa_compile.attach(model, batches[0], topk=8, query_block=1, key_block=0, min_seq_len=0)
    # 2 batches per optimizer step in all: one per rank with two ranks, both on one rank.
    dsa_compile.calibrate(model, batches, steps=3, lr=1e-2, batches_per_step=2 // world,
                          progress=False)
    if world == 1 or torch.distributed.get_rank() == 0:
        dsa_compile.save_adapter(model, out)
    if world > 1:  # leave together: a rank tearing gloo down while its peer still saves
        torch.distributed.barrier()  # aborted once in CI ("terminate called without an
        torch.distributed.destroy_process_group()  # active exception")


if __name__ == "__main__":
    main(sys.argv[1])
