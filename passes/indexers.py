"""Each rewritten site's lightning indexer, as a module its model can own.

A site's indexer is a :class:`DSAIndexer` registered (by the API layer) at
``<attention module path>.dsa_indexer``, so ``model.state_dict()`` holds
``<module path>.dsa_indexer.{q_proj,k_proj,head_weights}``. The pass asks an
:class:`IndexerStore` for a site's indexer (:class:`SiteRequest`: what the pass knows about the
site), initialises one when the store has none, and hands it back to the store to keep:
:class:`GraphIndexers` keeps it in the compiled graph only; the API's model store registers it
in the model. The rewritten graph reads the indexer's parameters as trailing inputs that ARE
the module's parameter objects, read at every call: in-place updates (an optimizer step,
``load_adapter``) change the compiled model's output without a recompile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from .sites import AttentionSite

INDEXER_NAME = "dsa_indexer"
# ``index_init`` of a site that runs on the model's own indexer (HF DeepseekV32).
MODEL_INDEXER_INIT = "the model's own indexer"
PARAMETERS = ("q_proj", "k_proj", "head_weights")


@dataclass
class SiteInfo:
    """What an indexer was made for (stored in adapters, checked when loading one)."""

    module_path: str
    pattern: str
    heads: int  # H: query heads of the site
    kv_heads: int  # Hkv
    head_dim: int  # D of q and k
    init: str  # how the weights were made (training-free init, adapter, calibration)
    per_kv_head: bool = False  # one selection per kv head (else one shared by all heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class DSAIndexer(torch.nn.Module):
    """The lightning indexer of one attention site.

    Parameters: ``q_proj [H * D, HI * DI]`` (maps a token's queries, all heads concatenated, to
    HI indexer queries of DI), ``k_proj [Hkv * D, DI]`` (its keys to one indexer key),
    ``head_weights [HI]``. The score of key s for query t is
    ``sum_j head_weights[j] * relu(q_idx[t, j] . k_idx[s])``. Frozen by default
    (``requires_grad_()`` to train them). ``detached`` is set when its model lets it go:
    compiled graphs that read it then run their dense graph instead.
    """

    def __init__(self, q_proj: torch.Tensor, k_proj: torch.Tensor, head_weights: torch.Tensor,
                 info: SiteInfo):
        super().__init__()
        self.q_proj = torch.nn.Parameter(q_proj, requires_grad=False)
        self.k_proj = torch.nn.Parameter(k_proj, requires_grad=False)
        self.head_weights = torch.nn.Parameter(head_weights, requires_grad=False)
        self.info = info
        self.detached = False
        # The base model's q / k projection weights the site reads ("q", "k": weak references,
        # set by the owner): adapters fingerprint them.
        self.base_weights: dict[str, Any] = {}

    @property
    def index_heads(self) -> int:
        return int(self.head_weights.shape[0])

    @property
    def groups(self) -> int:
        """Selections per query (tile): the kv heads with ``per_kv_head``, else 1."""
        return self.info.kv_heads if self.info.per_kv_head else 1

    @property
    def index_dim(self) -> int:
        return int(self.k_proj.shape[1]) // self.groups

    def tensors(self) -> list[torch.Tensor]:
        """The parameters in the order the rewritten graph takes them."""
        return [getattr(self, name) for name in PARAMETERS]

    def structure_masks(self) -> dict[str, torch.Tensor]:
        """Per parameter name, the entries training may change (1) or must keep at zero (0):
        with ``per_kv_head``, group g's index heads read only the queries of g's heads and kv
        head g's keys (block-diagonal ``q_proj`` and ``k_proj``); a dense indexer has none."""
        if not self.info.per_kv_head:
            return {}
        groups, dim = self.groups, self.info.head_dim
        group = self.info.heads // groups
        masks = {"q_proj": torch.zeros_like(self.q_proj), "k_proj": torch.zeros_like(self.k_proj)}
        q_width = self.q_proj.shape[1] // groups
        for g in range(groups):
            masks["q_proj"][g * group * dim:(g + 1) * group * dim,
                            g * q_width:(g + 1) * q_width] = 1
            masks["k_proj"][g * dim:(g + 1) * dim, g * self.index_dim:(g + 1) * self.index_dim] = 1
        return masks

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(getattr(self, name).shape) for name in PARAMETERS}

    def mismatch(self, heads: int, kv_heads: int, head_dim: int) -> str | None:
        """Why this indexer cannot serve a site of these sizes (None when it can)."""
        if self.info.per_kv_head and (kv_heads != self.info.kv_heads or
                                      self.index_heads % kv_heads):
            return (f"it selects per kv head for Hkv={self.info.kv_heads} with "
                    f"{self.index_heads} index heads; the site has Hkv={kv_heads}")
        expected = {"q_proj": [heads * head_dim, self.index_heads * self.index_dim],
                    "k_proj": [kv_heads * head_dim, self.groups * self.index_dim],
                    "head_weights": [self.index_heads]}
        for name, shape in expected.items():
            if list(getattr(self, name).shape) != shape:
                return (f"{name} is {list(getattr(self, name).shape)}, a site with H={heads}, "
                        f"Hkv={kv_heads}, D={head_dim} needs {shape}")
        return None

    def extra_repr(self) -> str:
        i = self.info
        per = ", per kv head" if i.per_kv_head else ""
        return (f"H={i.heads}, Hkv={i.kv_heads}, D={i.head_dim}, index_heads={self.index_heads}, "
                f"index_dim={self.index_dim}{per}, init={i.init!r}")


@dataclass
class SiteRequest:
    """A rewritable site asking for its indexer.

    ``q_weight`` / ``k_weight``: the q and k projection weights found upstream of the site (the
    model's own parameter tensors; None when not found).
    """

    site: AttentionSite
    heads: int
    kv_heads: int
    head_dim: int
    device: torch.device
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    rotary: bool = False


class IndexerStore(Protocol):
    """Where a graph's indexers come from and where new ones go."""

    def lookup(self, request: SiteRequest) -> tuple[str, DSAIndexer] | None:
        """The site's existing indexer and its name, or None (then the pass initialises one).
        Raises :class:`IndexerMismatch` when the existing one cannot serve the site."""

    def adopt(self, request: SiteRequest, indexer: DSAIndexer) -> str:
        """Keeps a newly initialised indexer; returns its name."""


class IndexerMismatch(ValueError):
    """A site's stored indexer does not fit the site (names the site and what to do)."""


class GraphIndexers:
    """Indexers owned by the compiled graph only (nothing to look up; new ones are named
    ``<module path>.dsa_indexer``, numbered when a module holds several sites)."""

    def __init__(self) -> None:
        self.indexers: dict[str, DSAIndexer] = {}

    def lookup(self, request: SiteRequest) -> tuple[str, DSAIndexer] | None:
        return None

    def adopt(self, request: SiteRequest, indexer: DSAIndexer) -> str:
        name = unique_name(self.indexers, request.site.module_path)
        self.indexers[name] = indexer
        return name


def unique_name(taken: Any, module_path: str) -> str:
    """``<module path>.dsa_indexer``, or ``..._2``, ``..._3`` when taken."""
    base = INDEXER_NAME if module_path == "<top>" else f"{module_path}.{INDEXER_NAME}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name
