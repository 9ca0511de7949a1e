"""A synthetic long-context retrieval task: key-value records hidden among filler, then queries.

A sequence is ``BOS``, a context of ``length`` tokens (random filler with ``pairs`` record tokens
at random places; a record token stands for one ``(key, value)`` pair, every key distinct in a
sequence), then queries ``? key value`` for keys of the context. Answering a query (predicting
``value`` after ``? key``) is an exact lookup that may reach back over the whole context: the
query must attend to the one record token among all the filler whose key is its key. Nothing
about the answer is local, so a sparse attention that drops the record fails it.

Records are single tokens (not ``key value`` token pairs) so that one attention hop solves the
task: the two-hop form (an induction head) needs far more training than a CPU gives in an hour.

Token ids: ``0`` BOS, ``1`` the query mark ``?``, then filler, keys, values and records (record
of key i and value j: ``RECORD0 + i * VALUES + j``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BOS, QUERY = 0, 1
FILLERS, KEYS, VALUES = 96, 128, 16
FILLER0 = 2
KEY0 = FILLER0 + FILLERS
VALUE0 = KEY0 + KEYS
RECORD0 = VALUE0 + VALUES
VOCAB = RECORD0 + KEYS * VALUES


@dataclass
class Batch:
    """``context [B, 1 + length]`` (BOS first), ``keys / values [B, queries]`` token ids of the
    queried pairs, and ``where [B, queries]`` each queried record's position in ``context``."""

    context: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    where: torch.Tensor

    def with_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, 1 + length + 3Q], answer_positions [Q])``: the context followed by the
        teacher-forced queries; the logits at ``answer_positions`` predict ``values``."""
        batch, queries = self.keys.shape
        query = torch.stack([torch.full_like(self.keys, QUERY), self.keys, self.values], dim=2)
        tokens = torch.cat([self.context, query.reshape(batch, 3 * queries)], dim=1)
        answers = self.context.shape[1] + 1 + 3 * torch.arange(queries)
        return tokens, answers


def make_batch(batch: int, length: int, pairs: int, queries: int,
               generator: torch.Generator) -> Batch:
    """``batch`` sequences with ``length`` context tokens holding ``pairs`` records
    (``queries <= pairs <= min(KEYS, length)``)."""
    if not (queries <= pairs <= min(KEYS, length)):
        raise ValueError(f"need queries <= pairs <= min({KEYS}, length), got queries={queries}, "
                         f"pairs={pairs}, length={length}")
    context = torch.randint(FILLER0, KEY0, (batch, length), generator=generator)
    keys = torch.empty(batch, queries, dtype=torch.long)
    values = torch.empty(batch, queries, dtype=torch.long)
    where = torch.empty(batch, queries, dtype=torch.long)
    for b in range(batch):
        key_ids = torch.randperm(KEYS, generator=generator)[:pairs]
        value_ids = torch.randint(0, VALUES, (pairs,), generator=generator)
        places = torch.randperm(length, generator=generator)[:pairs]
        context[b, places] = RECORD0 + key_ids * VALUES + value_ids
        chosen = torch.randperm(pairs, generator=generator)[:queries]
        keys[b], values[b] = KEY0 + key_ids[chosen], VALUE0 + value_ids[chosen]
        where[b] = places[chosen] + 1  # after BOS
    bos = torch.full((batch, 1), BOS, dtype=torch.long)
    return Batch(torch.cat([bos, context], dim=1), keys, values, where)
