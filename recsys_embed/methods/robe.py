"""``robe``: ROBE, every table's vectors read at hashed offsets of one shared array of floats.

Idea (Desai et al., MLSys'22, "Random Offset Block Embedding (ROBE) for compressed embedding tables in deep
learning recommendation systems"): all tables share one 1-D array ``M`` of ``array_size`` floats. An id's ``d``
dims are ``d / Z`` blocks of ``Z`` consecutive array elements; block ``k`` of id ``x`` of table ``t`` starts at a
hashed offset ``o = Z * (h_{t,k}(x) mod (array_size / Z))`` and is multiplied by a sign ``g_{t,k}(x) = +-1``::

    e_t(x)[k * Z + i] = g_{t,k}(x) * M[o_{t,k}(x) + i]        i < Z

``Z = 1`` (the default, the VLDB'24 benchmark's setting, Zhang et al., arXiv 2311.15578) hashes every element on
its own; larger ``Z`` is the paper's cache-friendly form (one random read per block). Offsets are aligned to
block starts and ``array_size`` is a multiple of the row width below, so a block never wraps around the array's
end (the paper wraps; aligned blocks need no wrap and lose nothing: every array element is still shared). Offset
and sign come from one seeded SplitMix64 hash per (table, block): the bucket from its low 63 bits, the sign from
its top bit. Features of one table share its seeds (same id, same vector). ``hash="identity"`` lays the tables out
whole (block ``k`` of id ``x`` at ``start_t + x * d_t + k * Z``, sign +1): with ``array_size = sum n_t * d_t`` that
is the full tables (the known-answer test).

Storage: the array is a TorchRec table of ``array_size / W`` rows of ``W = lcm(Z, 4)`` floats (fbgemm's rows
are multiples of 4 wide), read by one physical feature in bags of one row each (so fbgemm's pooled kernels return
each block's row; its unpooled CPU backward measured ~8x slower): each block keeps its ``Z`` columns of the row
(all of them when ``Z = W``) times its sign, and the blocks are summed into their bags (one ``index_add``; a
reshape when every bag holds one id). So the array trains with fbgemm's fused sparse optimizer (only the rows read
are updated; row-wise Adagrad keeps one accumulator per ``W`` elements) and shards like any table. ROBE is a
remap method: its id map gives each id's ``d / Z`` physical rows; its combine (column, sign, pooling) is its own.
An id costs ``d / Z`` lookups (``hash``: one), so on CPU fbgemm's backward over them dominates the step at
``Z = 1``; a larger ``block_size`` cuts the lookups ``Z``-fold.

Memory: ``array_size * 4 + 8 * #tables * max_t(d_t) / block_size`` bytes (the array plus one int64 seed per
logical table and block slot). The budget solver takes the largest ``array_size`` (a multiple of ``W``, at most
the full tables' ``sum n_t * d_t``) that fits.

Example::

    emb = build_embedding("robe", tables, budget=Budget(ratio=1000))
    emb = build_embedding("robe", tables, array_size=1_000_000, block_size=4, seed=1)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.fx
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import FP32_BYTES, INT64_BYTES, TBE_DIM_MULTIPLE, Budget, check_tables, full_bytes
from recsys_embed.methods.hash_fn import check_hash_name, hash64, reference_hash64
from recsys_embed.methods.layouts import IdLayout, copies_per_feature, keyed, make_kjt, tracing
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import RemapMethod

log = logging.getLogger(__name__)
BLOCKS = "robe@blocks"  # the array's one physical feature
_LOW_63 = (1 << 63) - 1


@torch.fx.wrap
def hashed_slots(ids: torch.Tensor, seeds: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SplitMix64 of ``ids`` with (broadcast) ``seeds``: the slot (low 63 bits mod ``slots``) and whether the sign
    is negative (the top bit); an fx leaf (the hash mixes in place)."""
    mixed = hash64(ids, seeds)
    return (mixed & _LOW_63).remainder_(slots), mixed < 0


def row_width(block_size: int) -> int:
    """Floats per physical row: ``lcm(Z, 4)``, so a row holds whole blocks and fbgemm's width rule holds."""
    return math.lcm(block_size, TBE_DIM_MULTIPLE)


def check_blocks(tables: Sequence[EmbeddingBagConfig], block_size: int) -> None:
    """A clear error unless ``block_size >= 1`` divides every table's dim."""
    if block_size < 1 or any(t.embedding_dim % block_size for t in tables):
        raise ValueError(
            f"Method 'robe' needs block_size >= 1 dividing every embedding_dim (got block_size={block_size}, dims "
            f"{sorted({t.embedding_dim for t in tables})}); use block_size=1 or a divisor of the dims."
        )


@register("robe")
class ROBEEmbedding(RemapMethod):
    """One shared array of ``array_size`` floats; block ``k`` of an id is ``Z`` elements at a hashed offset."""

    budget_knobs = ("array_size",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        array_size: int,
        block_size: int = 1,
        hash: Literal["splitmix64", "identity"] = "splitmix64",
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        check_blocks(self._tables, block_size)
        check_hash_name("robe", hash)
        width = row_width(block_size)
        if array_size < width or array_size % width:
            raise ValueError(
                f"Method 'robe' needs array_size a positive multiple of {width} (rows of lcm(block_size, 4) floats "
                f"for fbgemm; got {array_size}); e.g. array_size={max(width, array_size // width * width)}."
            )
        self.array_size, self.block_size, self.hash_name = array_size, block_size, hash
        self.slots, self.per_row = array_size // block_size, width // block_size  # block slots; slots per row
        self.blocks = [d // block_size for d in self._length_per_key]  # per feature
        self.unbounded_features = set(self._feature_names) if hash != "identity" else set()
        self.declare_remap(self.blocks, combine="concat", shared=BLOCKS)  # the combine is lookup's (sign, column)
        dev = torch.device(device or "cpu")
        array = EmbeddingBagConfig(
            name="robe", num_embeddings=array_size // width, embedding_dim=width, feature_names=[BLOCKS]
        )
        self.tables = self.add_tables("tables", [array], device=dev)  # read in bags of one row (see lookup)
        most = max(self.blocks)
        seeds = seed * 1_000_003 + torch.arange(len(self._tables) * most).view(-1, most)  # per table and block
        self.register_buffer("seeds", seeds.to(dev))
        self.register_buffer("feature_table", torch.tensor(self._table_index, device=dev), persistent=False)
        starts = [sum(t.num_embeddings * t.embedding_dim for t in self._tables[:i]) for i in range(len(self._tables))]
        first = torch.tensor([[starts[i] // block_size + k for k in range(most)] for i in self._table_index])
        self.register_buffer("identity_slots", first.to(dev), persistent=False)  # (F, most), identity layout
        self.register_buffer("blocks_per_feature", torch.tensor(self.blocks, device=dev), persistent=False)
        first_block = torch.tensor([sum(self.blocks[:f]) for f in range(len(self.blocks))], device=dev)
        self.register_buffer("first_block", first_block, persistent=False)  # block column of each feature's output
        self.register_buffer("block_index", torch.arange(most, device=dev).unsqueeze(1), persistent=False)
        self.register_buffer("within_row", torch.arange(block_size, device=dev).unsqueeze(0), persistent=False)
        with torch.no_grad():
            bound = math.sqrt(1.0 / max(t.num_embeddings for t in self._tables))
            self.tables.embedding_bags["robe"].weight.uniform_(-bound, bound)

    def _slots(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(most, N)``: the block slot of block ``k`` of every id, and whether its sign is negative (None: +1)."""
        layout = IdLayout(features)
        if self.hash_name == "identity":
            slots = layout.spread(self.identity_slots.T) + layout.ids * layout.spread(self.blocks_per_feature)
            return layout.flat(torch.remainder(slots, self.slots)), None
        seeds = self.seeds.index_select(0, self.feature_table).T  # (most, F): each feature its table's
        slots, negative = hashed_slots(layout.ids, layout.spread(seeds), self.slots)
        return layout.flat(slots), layout.flat(negative)

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``(d / Z, N)``: the physical row of every block (blocks past a feature's own ``d / Z`` are ignored)."""
        return torch.div(self._slots(features)[0], self.per_row, rounding_mode="floor")

    def reference_slots(self, feature: str, id: int) -> list[tuple[int, int]]:
        """Block slot and sign of each block of one id, in plain Python (the definition the tests check)."""
        f = self._feature_names.index(feature)
        if self.hash_name == "identity":
            return [
                ((int(self.identity_slots[f, k]) + id * self.blocks[f]) % self.slots, 1) for k in range(self.blocks[f])
            ]
        seeds = self.seeds[self._table_index[f]].tolist()
        mixed = [reference_hash64(id, seeds[k]) for k in range(self.blocks[f])]
        return [((h & _LOW_63) % self.slots, -1 if h < 0 else 1) for h in mixed]

    def reference_rows(self, feature: str, id: int) -> list[int]:
        return [slot // self.per_row for slot, _ in self.reference_slots(feature, id)]

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        batch, count, ids = features.stride(), len(self._feature_names), features.values().numel()
        slots, negative = self._slots(features)

        def id_major(per_block: torch.Tensor) -> torch.Tensor:  # (most, N) -> each id's live blocks, in order
            if len(set(self.blocks)) == 1:
                return per_block.T.reshape(-1)
            return copies_per_feature(per_block, features.length_per_key(), self.blocks, True)

        picked = id_major(slots)
        rows = torch.div(picked, self.per_row, rounding_mode="floor") if self.per_row > 1 else picked
        if not tracing() and ids == 0:  # only empty bags: no block to read (TorchRec cannot look up zero bags)
            empty = torch.zeros(batch, sum(self._length_per_key), device=rows.device)
            return keyed(empty, self._feature_names, self._length_per_key)
        one_each = torch.ones_like(rows)  # every block its own bag: fbgemm's pooled kernels return its row
        values = self.tables(make_kjt([BLOCKS], rows, one_each, rows.numel())).values()  # (blocks, W)
        if self.per_row > 1:  # the block's Z columns within its row
            columns = (picked - rows * self.per_row).unsqueeze(1) * self.block_size + self.within_row
            values = values.gather(1, columns)
        if negative is not None:
            values = values * (1.0 - 2.0 * id_major(negative).to(values.dtype)).unsqueeze(1)
        if not tracing() and len(set(self.blocks)) == 1 and bool((features.lengths() == 1).all()):
            pooled = values.view(count, batch, -1).transpose(0, 1).reshape(batch, -1)  # one id per bag
        else:  # block k of an id of feature f in bag b goes to output block b * K + first_block[f] + k
            bags = torch.arange(count * batch, device=rows.device).repeat_interleave(
                features.lengths(), output_size=ids
            )
            total = sum(self.blocks)
            base = (
                torch.remainder(bags, batch) * total + self.first_block[torch.div(bags, batch, rounding_mode="floor")]
            )
            into = id_major(base + self.block_index)
            pooled = values.new_zeros(batch * total, self.block_size).index_add_(0, into, values).view(batch, -1)
        return keyed(pooled, self._feature_names, self._length_per_key)

    def memory_bytes(self) -> int:
        return self.array_bytes(self._tables, self.array_size, self.block_size)

    @staticmethod
    def array_bytes(tables: Sequence[EmbeddingBagConfig], array_size: int, block_size: int) -> int:
        """The memory formula (used by the budget solver)."""
        seeds = len(tables) * max(t.embedding_dim for t in tables) // block_size
        return array_size * FP32_BYTES + INT64_BYTES * seeds

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> ROBEEmbedding:
        tables = check_tables(tables)
        block_size = int(cls.with_defaults(options)["block_size"])
        check_blocks(tables, block_size)
        width, full, allowed = row_width(block_size), full_bytes(tables), budget.max_bytes(tables)
        seeds = cls.array_bytes(tables, 0, block_size)
        most = max(width, full // FP32_BYTES // width * width)  # past the full tables' values buys nothing
        size = min(most, max(0, allowed - seeds) // FP32_BYTES // width * width)
        if size < width:
            smallest = cls.array_bytes(tables, width, block_size)
            low = full / cls.array_bytes(tables, most, block_size)
            raise ValueError(
                f"Method 'robe' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): one row of {width} floats "
                f"plus the hash seeds need {smallest} bytes, so it reaches ratios {low:.3g}x to "
                f"{full / smallest:,.0f}x on these tables. Ask for at least {smallest} bytes."
            )
        method = cls(tables, array_size=size, **options)  # type: ignore[arg-type]
        log.info(
            "robe: array of %d floats (block %d) reaches ratio %.2f (asked %s)",
            size,
            block_size,
            method.compression_ratio(),
            budget,
        )
        return method
