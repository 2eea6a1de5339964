"""How rows become batches: flattened (varlen packing), length-grouped padded rows, or padded rows.

``data.packing`` picks one of three modes (:func:`choose_batching`):

- ``flatten``: transformers' ``DataCollatorWithFlattening``: a batch becomes one row of all
  examples back to back, ``position_ids`` restart at 0 for each, and the first label of each is
  -100 so no example learns to predict across the seam. With a varlen attention kernel
  (``flash_attention_2``/``_3``, or ``flex_attention``'s block-sparse mask) attention then costs
  the sum of each row's length squared and no compute goes to padding. With any other kernel (``sdpa``, ``eager``) transformers builds a dense
  block-diagonal mask over the whole flattened batch, so attention costs (sum of lengths)^2 and,
  on a GPU, as much memory: slower than plain padding on long rows (issue 15 measured 0.71x).
- ``group``: padded rows, but each batch holds rows of similar length (:class:`LengthGroupedBatches`),
  so little compute goes to padding and attention stays per row with any kernel. Never slower
  than ``pad``: the same batches up to order, less padding.
- ``pad``: each batch right-padded to its longest row, in the Trainer's random order.

``auto`` (the default) is ``flatten`` where the model's attention is a varlen kernel or the rows
are short enough that a flattened batch stays small (:data:`DENSE_FLATTEN_MAX_TOKENS`), and
``group`` otherwise. Methods with virtual tokens (prompt/prefix tuning) need one row per example, so
``flatten`` becomes ``group`` for them.

Rows of a source with a ``loss_weight`` carry it as a column; :class:`RowCollator` turns it into
``token_weights`` laid out as the batch's tokens are, which the Trainer's loss multiplies in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

IGNORE_INDEX = -100


@dataclass
class PaddedCollator:
    """Right-pads ``input_ids`` with ``pad_token_id`` and ``labels`` with -100, plus ``attention_mask``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [_as_list(f["input_ids"]) for f in features]
        labels = [
            _as_list(f["labels"]) if "labels" in f else list(i) for f, i in zip(features, ids, strict=True)
        ]
        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids, batch_labels, batch_mask = [], [], []
        for i, lab in zip(ids, labels, strict=True):
            pad = width - len(i)
            batch_ids.append(i + [self.pad_token_id] * pad)
            batch_labels.append(lab + [IGNORE_INDEX] * pad)
            batch_mask.append([1] * len(i) + [0] * pad)
        return {
            "input_ids": torch.tensor(batch_ids, dtype=torch.long),
            "labels": torch.tensor(batch_labels, dtype=torch.long),
            "attention_mask": torch.tensor(batch_mask, dtype=torch.long),
        }


def packs_without_dense_mask(attn_implementation: str) -> bool:
    """True for attention kernels that take a flattened batch as separate sequences, with no
    mask over the whole batch: every flash attention (transformers' own test, any name holding
    "flash": FA2/3/4 and hub kernels; cu_seqlens from the restarting position_ids) and
    FlexAttention (a block-sparse mask built from the same position_ids: blocks across two
    sequences are skipped, not computed)."""
    return "flash" in attn_implementation or attn_implementation == "flex_attention"


#: Columns of the prepared rows that are not model inputs (the collator drops them).
_ROW_COLUMNS = ("loss_weight", "length")


class Batching(NamedTuple):
    """What a ``data.packing`` value resolves to: the mode, why, and whether the user should be
    warned (the batching asked for is slow with this model, or not possible)."""

    mode: str
    why: str
    warn: bool = False


#: ``auto`` flattens even without a varlen kernel when nearly every flattened batch stays this
#: short: the dense mask over it is then small (1024^2 entries), and one row of back-to-back
#: examples beats padded rows on short data (issue 15: 1.15x on 20-120-token Q&A on CPU, where
#: length-grouped rows only matched plain padding).
DENSE_FLATTEN_MAX_TOKENS = 1024


def choose_batching(
    requested: str | bool,
    attn_implementation: str,
    virtual_tokens: bool,
    flat_batch_tokens: float | None = None,
) -> Batching:
    """The batching a ``data.packing`` value resolves to for this model. ``flat_batch_tokens``:
    how long a flattened batch would be (rows per device batch x the 95th percentile row length),
    when the rows are known."""
    mode = (
        {True: "auto", False: "pad"}.get(requested, requested) if isinstance(requested, bool) else requested
    )
    varlen = packs_without_dense_mask(attn_implementation)
    if mode == "auto":
        if varlen and not virtual_tokens:
            return Batching(
                "flatten", f"packing auto: {attn_implementation} takes flattened rows as separate sequences"
            )
        if (
            not virtual_tokens
            and flat_batch_tokens is not None
            and flat_batch_tokens <= DENSE_FLATTEN_MAX_TOKENS
        ):
            return Batching(
                "flatten",
                f"packing auto: flattened rows (short rows: a flattened batch is ~{flat_batch_tokens:.0f} tokens, "
                f"so {attn_implementation}'s dense mask over it is small)",
            )
        why = (
            "virtual tokens need one row per example"
            if virtual_tokens
            else f"{attn_implementation} attention would need a dense mask over a flattened batch"
        )
        return Batching("group", f"packing auto: length-grouped padded rows ({why})")
    if mode == "flatten" and virtual_tokens:
        return Batching(
            "group",
            "packing flatten is not possible with virtual tokens (one row per example): length-grouped rows",
            warn=True,
        )
    if mode == "flatten" and not varlen:
        return Batching(
            "flatten",
            f"packing flatten with {attn_implementation} attention: a dense mask over each flattened batch, "
            'attention costs (sum of lengths)^2; "auto" would group rows by length instead',
            warn=True,
        )
    return Batching(str(mode), f"packing {mode}")


@dataclass
class RowCollator:
    """Wraps the mode's collator: drops the row columns that are not model inputs, and turns rows'
    ``loss_weight`` into a ``token_weights`` tensor shaped like the batch's ``input_ids`` (one
    flattened row when flattening, padded rows otherwise, 0 on padding). Batches whose rows carry
    no weight are the inner collator's, unchanged."""

    inner: Any
    mode: str

    @property
    def groups_by_length(self) -> bool:
        return self.mode == "group"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        weights = [f.get("loss_weight") for f in features]
        batch: dict[str, Any] = self.inner(
            [{k: v for k, v in f.items() if k not in _ROW_COLUMNS} for f in features]
        )
        if all(w is None for w in weights):
            return batch
        import torch

        lengths = [len(_as_list(f["input_ids"])) for f in features]
        per_row = [[1.0 if w is None else float(w)] * n for w, n in zip(weights, lengths, strict=True)]
        if self.mode == "flatten":
            grid = [[w for row in per_row for w in row]]
        else:
            width = batch["input_ids"].shape[1]
            grid = [row + [0.0] * (width - len(row)) for row in per_row]
        batch["token_weights"] = torch.tensor(grid, dtype=torch.float32)
        return batch


def make_collator(tokenizer: Any, mode: str | bool) -> RowCollator:
    """The collator for a batching mode (``flatten``, ``group``, ``pad``; ``True`` is ``flatten``
    and ``False`` ``pad``, for scripts that only choose packed or not)."""
    if isinstance(mode, bool):
        mode = "flatten" if mode else "pad"
    if mode not in ("flatten", "group", "pad"):
        raise ValueError(f"unknown batching mode {mode!r}")
    inner: Any
    if mode == "flatten":
        from transformers import DataCollatorWithFlattening

        inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    else:
        pad = tokenizer.pad_token_id
        if pad is None:
            # Padded positions are masked out of attention and loss, so any id works; eos always exists.
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        inner = PaddedCollator(pad_token_id=int(pad))
    return RowCollator(inner, mode)


class LengthGroupedBatches:
    """A sampler whose every run of ``batch_size`` indices holds rows of similar length.

    Seeded by ``(seed, epoch)``: the rows are permuted, cut into mega-batches of ``mega_batches``
    batches, each mega-batch sorted by length and cut into batches, and the batches of each
    mega-batch shuffled. ``batch_size`` is the global batch (per device x devices x accumulation),
    so the rows of one optimizer step are the same whether one process or several take them
    (accelerate deals each rank its run of the global batch). Written here rather than using
    transformers' ``LengthGroupedSampler``: that one groups per device batch and leaves each
    mega-batch's batches in descending length (a length curriculum every 50 steps), and reads
    lengths as a Python list; this one takes the prepared rows' ``length`` column as numpy. Like
    transformers' sampler, it puts the batch with the longest row first.
    """

    def __init__(self, lengths: Any, batch_size: int, seed: int, mega_batches: int = 50):
        import numpy as np

        self.lengths = np.asarray(lengths)  # int32 from the Arrow column: 4 bytes a row
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.mega = max(1, min(mega_batches, len(self.lengths) // (self.batch_size * 4)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self) -> Any:
        import numpy as np

        rng = np.random.default_rng([self.seed, self.epoch])
        n, batch = len(self.lengths), self.batch_size
        # int32 indices: 4 bytes a row for each array alive at once (datasets hold < 2**31 rows).
        perm = rng.permutation(n).astype(np.int32)
        size = self.mega * batch
        out = np.empty(n, dtype=np.int32)
        pos = 0
        for start in range(0, n, size):  # vectorized per mega-batch: no Python object per batch
            chunk = perm[start : start + size]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            full = len(chunk) // batch * batch
            blocks = chunk[:full].reshape(-1, batch)[rng.permutation(full // batch)]
            out[pos : pos + full] = blocks.reshape(-1)
            # The short last batch of the last mega-batch stays last (it is the epoch's remainder).
            rest = chunk[full:]
            out[pos + full : pos + len(chunk)] = rest
            pos += len(chunk)
        # The batch holding the longest row goes first: a batch too big for memory then fails at
        # step 1, not hours in, and a run's peak memory shows in its first step.
        full = n // batch * batch
        if full >= batch:
            widest = int(self.lengths[out[:full]].reshape(-1, batch).max(axis=1).argmax())
            if widest:
                first = out[:batch].copy()
                out[:batch] = out[widest * batch : (widest + 1) * batch]
                out[widest * batch : (widest + 1) * batch] = first
            if full < n:  # the short remainder may hold the longest row: trade it for the shortest
                tail = full + int(self.lengths[out[full:]].argmax())
                head = int(self.lengths[out[:batch]].argmin())
                if self.lengths[out[tail]] > self.lengths[out[:batch]].max():
                    out[head], out[tail] = out[tail], out[head]
        return out

    def __iter__(self) -> Any:
        # One index at a time: a list of millions of Python ints would cost ~36 bytes a row.
        return (int(i) for i in self.order())


def flat_batch_tokens(dataset: Any, batch_size: int) -> float | None:
    """Rows per batch x the 95th-percentile row length: how long most flattened batches get."""
    import numpy as np

    lengths = np.asarray(row_lengths(dataset))
    if lengths.size == 0:
        return None
    return float(batch_size * np.percentile(lengths, 95))


def row_lengths(dataset: Any) -> Any:
    """The token count of each prepared row: its ``length`` column when it has one (read from
    Arrow without touching the rows), else counted."""
    names = getattr(dataset, "column_names", None) or []
    if "length" in names:
        return dataset.data.column("length").to_numpy()
    return [len(_as_list(row["input_ids"])) for row in dataset]


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)
