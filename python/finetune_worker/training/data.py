"""A job's data sources -> token rows for the Trainer: ``prepare_data`` and ``ChatEncoder``.

Two passes over the sources, each streamed (no pass holds the rows in memory):

1. every row is read and checked; the bad ones fail the job together, each named by file and
   row, before anything is tokenized;
2. the rows are split (a seeded hold-out of each source), mixed (each source's training rows
   repeated or subsampled to its ``weight`` or ``repeat``), tokenized and written to Arrow as
   they go. In a job the Arrow files live in the output_dir's data cache, memory-mapped by the
   Trainer's dataset (``datasets.Dataset.from_file``), so resident memory does not grow with
   the data; a resumed run with the same data and tokenizer reuses them.

Chat-like rows go through the chat template; with ``train_on_responses_only`` only the
assistant's tokens (its content, tool calls and end-of-turn token) carry labels, minus turns
flagged ``train: false``/``weight: 0``, plus turns flagged ``true``. Two ways to find them: the
template's ``{% generation %}`` tags through ``apply_chat_template(return_assistant_tokens_mask=True)``
when it has them and no turn is flagged, otherwise a prefix diff that works with any template
(render the conversation up to each turn with and without it; the difference is the turn).
Plain text trains on every token and is cut into blocks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune_worker import __version__
from finetune_worker.config.data import DataConfig
from finetune_worker.data.readers import DataFile, SourceProblem, splits_read
from finetune_worker.data.rows import Example
from finetune_worker.data.sources import (
    MAX_REPORTED,
    Source,
    bad_rows_failure,
    empty_source_failure,
    iter_examples,
    source_failure,
)
from finetune_worker.errors import JobFailed
from finetune_worker.hf import CHATML_TEMPLATE, chat_template
from finetune_worker.training.data_collate import make_collator

__all__ = [
    "IGNORE_INDEX",
    "ChatEncoder",
    "PreparedData",
    "build_datasets",
    "held_out_mask",
    "make_collator",
    "prepare_data",
    "split_examples",
]

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss's default ignore_index)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
log = logging.getLogger(__name__)

Row = dict[str, list[int]]
#: Examples tokenized together (text rows go through the tokenizer as one batch).
CHUNK_ROWS = 512
#: Datasets of at least this many rows report their tokenizing as progress events (unit rows).
PROGRESS_ROWS = 20_000
#: Rows per Arrow record batch written.
WRITE_ROWS = 1024
#: Bumped when what the cache holds changes meaning (so old caches are rebuilt, not misread).
CACHE_FORMAT = 2
#: Raw text is tokenized in pieces of at most this many characters (see ChatEncoder._tokenize_texts).
TEXT_PIECE_CHARS = 1_000_000


# ---- the split and the mixture -----------------------------------------------------------------


def held_out_count(n: int, fraction: float) -> int:
    """Rows held out of ``n``: at least one each side once a split is asked for and possible."""
    return min(max(round(n * fraction), 1), n - 1) if fraction > 0 and n >= 2 else 0


def held_out_mask(n: int, fraction: float, seed: int, index: int = 0) -> np.ndarray:
    """Which of a source's ``n`` rows are held out: a seeded sample of them (``index`` is the
    source's place in the mixture, so each source draws its own)."""
    mask = np.zeros(n, dtype=bool)
    k = held_out_count(n, fraction)
    if k:
        # A sample of k, not a permutation of n: memory in proportion to the held-out rows only.
        mask[np.random.default_rng([seed, index]).choice(n, k, replace=False)] = True
    return mask


def split_examples(
    examples: list[Example], validation_split: float, seed: int, index: int = 0
) -> tuple[list[Example], list[Example]]:
    """The same hold-out as training's, of a list; each side keeps file order."""
    mask = held_out_mask(len(examples), validation_split, seed, index)
    return [e for e, h in zip(examples, mask, strict=True) if not h], [
        e for e, h in zip(examples, mask, strict=True) if h
    ]


def mixture_targets(sources: list[Source], train_counts: list[int]) -> list[int]:
    """Training rows each source contributes: ``weight`` shares of the total, or ``repeat`` times its
    own; a source with a fixed ``share`` (replay) then gets that share of all the rows."""
    mixed = [(s, c) for s, c in zip(sources, train_counts, strict=True) if s.share is None]
    if all(s.weight is not None for s, _ in mixed):
        total_weight = sum(float(s.weight or 0) for s, _ in mixed)
        total = sum(c for _, c in mixed)
        targets = [max(1, round(float(s.weight or 0) / total_weight * total)) for s, _ in mixed]
    else:
        targets = [max(1, round(c * (s.repeat if s.repeat is not None else 1.0))) for s, c in mixed]
    rest = sum(targets)
    shared = iter(targets)
    return [
        next(shared) if s.share is None else max(1, round(rest * s.share / (1 - s.share))) for s in sources
    ]


def row_multiplicity(count: int, target: int, seed: int, index: int) -> np.ndarray:
    """How many times each of ``count`` training rows is used so they add up to ``target``:
    whole copies, plus a seeded sample of rows used once more."""
    copies, extra = divmod(target, count)
    out = np.full(count, copies, dtype=np.uint32)
    if extra:
        out[np.random.default_rng([seed, index, 1]).choice(count, extra, replace=False)] += 1
    return out


# ---- the result --------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """What :func:`prepare_data` gives the job."""

    train: Any  # a datasets.Dataset of {"input_ids", "labels", "length"[, "loss_weight"]}
    eval: Any  # the same for the held-out rows, or None
    stats: dict[str, Any]
    #: The first held-out and training examples (``keep_examples`` of each), for the evaluator.
    held_examples: list[Example] = field(default_factory=list)
    train_examples: list[Example] = field(default_factory=list)
    from_cache: bool = False


@dataclass
class _SourceCount:
    rows: int = 0
    formats: Counter[str] = field(default_factory=Counter)


def prepare_data(
    data_cfg: DataConfig,
    tokenizer: Any,
    sources: list[Source],
    *,
    seed: int,
    cache_dir: Path | None = None,
    warn: Callable[[str], None] | None = None,
    keep_examples: int = 0,
    check_cancelled: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    class_weights: Mapping[str, float] | None = None,
) -> PreparedData:
    """Read, check, split, mix and tokenize ``sources`` (see the module doc).

    ``class_weights`` (``loss_weights.classes``) multiply the ``loss_weight`` of the training rows
    whose answer is one of their keys; ``stats["class_counts"]`` counts those rows per class.

    ``progress(rows_done, rows)`` is called about once a second while the rows are tokenized,
    when there are at least PROGRESS_ROWS of them (a small dataset is ready before it matters).

    With ``cache_dir`` the token rows are Arrow files there (reused when the data, settings and
    tokenizer are the same); without, they are built in memory. When chat rows were rendered,
    ``tokenizer.chat_template`` is set to the template used, so the tokenizer saved with the
    outputs renders prompts as training did.
    """
    warn = warn or log.warning
    files = [files_of(s) for s in sources]
    label_files = sum(len(f) for f in files) > 1
    for source, source_files in zip(sources, files, strict=True):
        splits = splits_read(source_files)
        if source.split is None and len(splits) > 1:
            warn(
                f"{source.where}.path: {source.path} holds the splits {', '.join(splits)}; all were read for "
                f'training. Set split to read one (e.g. "split": "{"train" if "train" in splits else splits[0]}")'
            )
    encoder = ChatEncoder(tokenizer, data_cfg)
    classes = dict(class_weights or {})
    key = _cache_key(data_cfg, tokenizer, encoder.template, sources, files, seed, keep_examples, classes)

    def build(folder: Path | None) -> PreparedData:
        counts = scan_sources(sources, files, label_files, check_cancelled)
        total = sum(c.rows for c in counts)
        ticker = _Ticker(progress, total) if progress is not None and total >= PROGRESS_ROWS else None
        return _build(
            encoder,
            sources,
            files,
            counts,
            seed,
            folder,
            label_files,
            keep_examples,
            check_cancelled,
            ticker,
            classes,
        )

    result = _cached_or_built(cache_dir, key, build)
    for message in result.stats["warnings"]:
        warn(message)
    _adopt_template(tokenizer, encoder, result.stats)
    return result


def build_datasets(
    data_cfg: DataConfig,
    tokenizer: Any,
    path: str | Path,
    *,
    validation_split: float,
    seed: int,
    warn: Callable[[str], None] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """One dataset path, built in memory: ``(train_rows, eval_rows, stats)`` (``eval_rows`` is
    empty when nothing is held out). For scripts and benchmarks; jobs call :func:`prepare_data`."""
    source = data_cfg.source(Path(path), "dataset", validation_split=validation_split)
    data = prepare_data(data_cfg, tokenizer, [source], seed=seed, warn=warn)
    return data.train, (data.eval if data.eval is not None else []), data.stats


def _adopt_template(tokenizer: Any, encoder: ChatEncoder, stats: dict[str, Any]) -> None:
    if any(kind != "text" for kind in stats["format_counts"]):
        # The template the chat rows were rendered with goes out with the outputs: evaluate,
        # generate and anyone loading them with AutoTokenizer must render prompts the same way.
        tokenizer.chat_template = encoder.template


def files_of(source: Source) -> list[DataFile]:
    try:
        return source.files()
    except SourceProblem as exc:
        raise source_failure(source, exc) from None


def scan_sources(
    sources: list[Source],
    files: list[list[DataFile]],
    label_files: bool,
    check_cancelled: Callable[[], None] | None,
) -> list[_SourceCount]:
    """Pass 1: count each source's rows and check every one; fail listing the bad ones."""
    counts: list[_SourceCount] = []
    errors: list[str] = []
    bad = 0
    for source, source_files in zip(sources, files, strict=True):
        count = _SourceCount()
        try:
            for item in iter_examples(source, source_files, label_files=label_files):
                if isinstance(item, str):
                    bad += 1
                    if len(errors) < MAX_REPORTED:
                        errors.append(item)  # names its file whenever there are several (label_files)
                else:
                    count.rows += 1
                    count.formats[item.kind] += 1
                if check_cancelled is not None and (count.rows + bad) % 10_000 == 0:
                    check_cancelled()
        except SourceProblem as exc:
            raise source_failure(source, exc) from None
        counts.append(count)
    if bad:
        renames = {k: v for s in sources for k, v in s.spec.renames.items()}
        raise bad_rows_failure(
            errors, bad, [str(s.path) for s in sources], f" (columns map {renames})" if renames else ""
        )
    for source, count in zip(sources, counts, strict=True):
        if count.rows == 0:
            raise empty_source_failure(source)
    return counts


class _ArrowSink:
    """Token rows appended one at a time, written to Arrow in record batches."""

    def __init__(self, target: Path | None, weighted: bool):
        import pyarrow as pa

        fields = [
            pa.field("input_ids", pa.list_(pa.int32())),
            pa.field("labels", pa.list_(pa.int32())),
            pa.field("length", pa.int32()),  # for length-grouped batches, read without the rows
        ]
        if weighted:
            fields.append(pa.field("loss_weight", pa.float32()))
        self.schema = pa.schema(fields)
        self.target = target
        self._sink = pa.OSFile(str(target), "wb") if target is not None else pa.BufferOutputStream()
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._weighted = weighted
        self._columns: list[list[Any]] = [[] for _ in fields]
        self.rows = 0

    def add(self, row: Row, weight: float) -> None:
        self._columns[0].append(row["input_ids"])
        self._columns[1].append(row["labels"])
        self._columns[2].append(len(row["input_ids"]))
        if self._weighted:
            self._columns[3].append(weight)
        self.rows += 1
        if len(self._columns[0]) >= WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._columns[0]:
            arrays = [pa.array(c, type=f.type) for c, f in zip(self._columns, self.schema, strict=True)]
            self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
            self._columns = [[] for _ in self._columns]

    def close(self) -> Any:
        """The rows as a ``datasets.Dataset`` (memory-mapped from the file when there is one)."""
        import datasets

        self._flush()
        self._writer.close()
        if self.target is None:
            return datasets.Dataset.from_buffer(self._sink.getvalue())
        self._sink.close()
        return None


class _Ticker:
    """Calls ``progress(done, total)`` at most once a second (and once at the end)."""

    def __init__(self, progress: Callable[[int, int], None], total: int):
        self.progress, self.total, self.done = progress, total, 0
        self._last = time.monotonic()

    def at(self, done: int, force: bool = False) -> None:
        self.done = min(self.total, done)
        now = time.monotonic()
        if force or now - self._last >= 1.0:
            self._last = now
            self.progress(self.done, self.total)


class _ChunkWriter:
    """Tokenizes one source's examples a chunk at a time into the train and eval sinks."""

    def __init__(
        self,
        encoder: ChatEncoder,
        train_sink: _ArrowSink,
        eval_sink: _ArrowSink,
        loss_weight: float,
        totals: Counter[str],
        check_cancelled: Callable[[], None] | None,
        class_weights: Mapping[str, float],
        class_counts: Counter[str],
    ):
        self.encoder, self.train_sink, self.eval_sink = encoder, train_sink, eval_sink
        self.loss_weight, self.totals, self.check_cancelled = loss_weight, totals, check_cancelled
        self.class_weights, self.class_counts = class_weights, class_counts
        self.stat: Counter[str] = Counter(sequences=0, tokens=0, trained_tokens=0, eval_rows=0)
        self.chunk: list[tuple[Example, int]] = []  # (example, copies; 0 = held out)

    def flush(self) -> None:
        stat = self.stat
        encoded = self.encoder.encode_each([e for e, _ in self.chunk])
        for (example, copies), (rows, counted) in zip(self.chunk, encoded, strict=True):
            self.totals["truncated"] += counted["truncated"]
            self.totals["dropped"] += counted["dropped"]
            weight = self.loss_weight
            answer = example.answer if self.class_weights and copies and rows else None
            if answer is not None and answer in self.class_weights:
                weight *= self.class_weights[answer]
                self.class_counts[answer] += copies * len(rows)
            for row in rows:
                trained = sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)
                if copies == 0:
                    self.eval_sink.add(row, 1.0)
                    stat["eval_rows"] += 1
                    stat["eval_tokens"] += len(row["input_ids"])
                    stat["eval_trained_tokens"] += trained
                    continue
                for _ in range(copies):
                    self.train_sink.add(row, weight)
                stat["sequences"] += copies
                stat["tokens"] += copies * len(row["input_ids"])
                stat["trained_tokens"] += copies * trained
        self.chunk.clear()
        if self.check_cancelled is not None:
            self.check_cancelled()


def _build(
    encoder: ChatEncoder,
    sources: list[Source],
    files: list[list[DataFile]],
    counts: list[_SourceCount],
    seed: int,
    folder: Path | None,
    label_files: bool,
    keep_examples: int,
    check_cancelled: Callable[[], None] | None,
    ticker: _Ticker | None = None,
    class_weights: Mapping[str, float] | None = None,
) -> PreparedData:
    """Pass 2: split, mix, tokenize and write (see the module doc)."""
    class_weights = class_weights or {}
    class_counts: Counter[str] = Counter()
    weighted = any(s.loss_weight != 1.0 for s in sources) or bool(class_weights)
    train_sink = _ArrowSink(folder / "train.arrow" if folder else None, weighted)
    eval_sink = _ArrowSink(folder / "eval.arrow" if folder else None, False)
    held_masks = [
        held_out_mask(c.rows, s.validation_split, seed, s.index) for s, c in zip(sources, counts, strict=True)
    ]
    train_counts = [int(c.rows - m.sum()) for c, m in zip(counts, held_masks, strict=True)]
    targets = mixture_targets(sources, train_counts)
    totals: Counter[str] = Counter(truncated=0, dropped=0)
    per_source: list[dict[str, Any]] = []
    held_examples: list[Example] = []
    train_examples: list[Example] = []
    ticker_base = 0  # rows of the sources before this one
    for source, source_files, count, mask, n_train, target in zip(
        sources, files, counts, held_masks, train_counts, targets, strict=True
    ):
        uses = row_multiplicity(n_train, target, seed, source.index)
        writer = _ChunkWriter(
            encoder,
            train_sink,
            eval_sink,
            source.loss_weight,
            totals,
            check_cancelled,
            class_weights,
            class_counts,
        )
        stat = writer.stat
        chunk = writer.chunk
        flush = writer.flush

        i = j = 0
        try:
            for item in iter_examples(source, source_files, label_files=label_files):
                if not isinstance(item, Example) or i >= len(mask):
                    raise changed_failure(source)
                if mask[i]:
                    chunk.append((item, 0))
                    if len(held_examples) < keep_examples:
                        held_examples.append(item)
                else:
                    if uses[j]:
                        chunk.append((item, int(uses[j])))
                    if len(train_examples) < keep_examples:
                        train_examples.append(item)
                    j += 1
                i += 1
                if len(chunk) >= CHUNK_ROWS:
                    flush()
                    if ticker is not None:
                        ticker.at(ticker_base + i)
        except SourceProblem as exc:
            raise source_failure(source, exc) from None
        if i != len(mask):
            raise changed_failure(source)
        flush()
        ticker_base += i
        if ticker is not None:
            ticker.at(ticker_base, force=source is sources[-1])
        per_source.append(
            {
                "name": source.name,
                "path": str(source.path),
                "rows": i,
                "eval_rows": stat["eval_rows"],
                "train_rows": int(target),
                "sequences": stat["sequences"],
                "tokens": stat["tokens"],
                "trained_tokens": stat["trained_tokens"],
                "weight": source.weight,
                "repeat": source.repeat,
                "loss_weight": source.loss_weight,
                "format_counts": dict(sorted(count.formats.items())),
                "_eval_tokens": stat["eval_tokens"],
                "_eval_trained_tokens": stat["eval_trained_tokens"],
            }
        )
    train_ds = train_sink.close()
    eval_ds = eval_sink.close() if eval_sink.rows else None
    stats = _stats(encoder, sources, counts, per_source, totals)
    if class_weights:
        stats["class_counts"] = {name: class_counts[name] for name in class_weights}
    result = PreparedData(train_ds, eval_ds, stats, held_examples, train_examples)
    if folder is not None:
        meta = {
            "stats": stats,
            "eval_rows": eval_sink.rows,
            "held_examples": [asdict(e) for e in held_examples],
            "train_examples": [asdict(e) for e in train_examples],
        }
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    if not train_sink.rows:
        raise JobFailed(
            "bad_dataset_row",
            f"no trainable examples in {', '.join(str(s.path) for s in sources)}: every row lost its "
            "trained tokens to truncation",
            hint="raise data.max_seq_length, or shorten the prompts",
        )
    return result


def changed_failure(source: Source) -> JobFailed:
    return JobFailed(
        "bad_dataset_row",
        f"{source.where}.path: {source.path} changed while it was being read",
        hint="keep the dataset unchanged while a job trains on it, then submit again",
    )


def _stats(
    encoder: ChatEncoder,
    sources: list[Source],
    counts: list[_SourceCount],
    per_source: list[dict[str, Any]],
    totals: Counter[str],
) -> dict[str, Any]:
    sequences = sum(p["sequences"] for p in per_source)
    eval_rows = sum(p["eval_rows"] for p in per_source)
    train_tokens = sum(p["tokens"] for p in per_source)
    trained = sum(p["trained_tokens"] for p in per_source)
    eval_tokens = sum(p.pop("_eval_tokens") for p in per_source)
    eval_trained = sum(p.pop("_eval_trained_tokens") for p in per_source)
    for p in per_source:
        p["share"] = round(p["trained_tokens"] / trained, 4) if trained else None
    formats: Counter[str] = Counter()
    for c in counts:
        formats.update(c.formats)
    warnings: list[str] = []
    if totals["truncated"]:
        warnings.append(
            f"{totals['truncated']} example(s) longer than data.max_seq_length={encoder.cfg.max_seq_length} "
            "were truncated (their start is kept)"
        )
    if totals["dropped"]:
        warnings.append(
            f"{totals['dropped']} example(s) had no assistant tokens left after truncation and were skipped"
        )
    for source, count in zip(sources, counts, strict=True):
        if source.validation_split > 0 and held_out_count(count.rows, source.validation_split) == 0:
            warnings.append(
                f"{source.where}.validation_split={source.validation_split} but {source.name} is too small to "
                "hold rows out"
            )
    return {
        "rows": sum(c.rows for c in counts),
        "train_rows": sequences,
        "eval_rows": eval_rows,
        "tokens": train_tokens + eval_tokens,
        "trained_tokens": trained + eval_trained,
        "train_tokens": train_tokens,
        "truncated": totals["truncated"],
        "dropped": totals["dropped"],
        "format_counts": dict(sorted(formats.items())),
        "mask_method": encoder.mask_method,
        "max_seq_length": encoder.cfg.max_seq_length,
        "sources": per_source,
        "warnings": warnings,
    }


# ---- the on-disk cache -------------------------------------------------------------------------


def _cache_key(
    data_cfg: DataConfig,
    tokenizer: Any,
    template: str,
    sources: list[Source],
    files: list[list[DataFile]],
    seed: int,
    keep_examples: int,
    class_weights: Mapping[str, float] | None = None,
) -> str:
    """What the token rows depend on: the data settings, each file's identity, the tokenizer
    (and the class weights, which are in the rows' loss_weight column)."""
    parts: dict[str, Any] = {
        "classes": dict(class_weights or {}),
        "format": CACHE_FORMAT,
        "version": __version__,
        "data": data_cfg.model_dump(mode="json", exclude={"packing"}),  # batching is not in the rows
        "template": template,
        "seed": seed,
        "keep": keep_examples,
        "tokenizer": _tokenizer_identity(tokenizer),
        "sources": [],
    }
    for source, source_files in zip(sources, files, strict=True):
        entry = {k: v for k, v in asdict(source).items() if k != "spec"}
        entry["spec"] = {
            "format": source.spec.format,
            "renames": dict(source.spec.renames),
            "system_prompt": source.spec.system_prompt,
        }
        entry["path"] = str(source.path)
        stat_files = []
        for f in source_files:
            try:
                info = f.path.stat()
                stat_files.append([str(f.path), f.format, info.st_size, info.st_mtime_ns])
            except OSError:
                stat_files.append([str(f.path), f.format, None, None])
        entry["files"] = stat_files
        parts["sources"].append(entry)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(
        [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    )
    return hashlib.sha256((text + special).encode()).hexdigest()


def _open_cache(cache_dir: Path, key: str) -> PreparedData | None:
    import datasets

    folder = cache_dir / key
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        train = datasets.Dataset.from_file(str(folder / "train.arrow"))
        eval_ds = datasets.Dataset.from_file(str(folder / "eval.arrow")) if meta["eval_rows"] else None
    except (OSError, ValueError, KeyError):
        return None
    return PreparedData(
        train,
        eval_ds,
        meta["stats"],
        [Example(**e) for e in meta["held_examples"]],
        [Example(**e) for e in meta["train_examples"]],
        from_cache=True,
    )


def _cached_or_built(
    cache_dir: Path | None, key: str, build: Callable[[Path | None], PreparedData]
) -> PreparedData:
    """The data from ``cache_dir/key`` when it is there, else built into a fresh folder that is
    published as ``cache_dir/key`` once complete (in memory without a ``cache_dir``).

    Building holds an ``flock`` of ``cache_dir``: the ranks of one distributed job build the
    data once, the others waiting and then finding it built. Older caches go: one run's data
    at a time.
    """
    if cache_dir is None:
        return build(None)
    cached = _open_cache(cache_dir, key)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        cached = _open_cache(cache_dir, key)  # built by another rank while this one waited
        if cached is not None:
            return cached
        for old in cache_dir.iterdir():
            if old.name != ".lock":
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
        try:
            built = build(tmp)
            os.replace(tmp, cache_dir / key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(fd)
    reopened = _open_cache(cache_dir, key)
    if reopened is None:  # pragma: no cover - just written
        raise JobFailed("internal_error", f"the data cache {cache_dir / key} could not be read back")
    reopened.from_cache = built.from_cache
    return reopened


# ---- tokenization ------------------------------------------------------------------------------


def text_pieces(text: str, limit: int) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` characters, each cut after whitespace when there is any."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > limit:
        cut = max(text.rfind(" ", start, start + limit), text.rfind("\n", start, start + limit))
        end = cut + 1 if cut > start else start + limit
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


class ChatEncoder:
    """Tokenizes examples into ``{"input_ids", "labels"}`` rows under one DataConfig."""

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates (e.g. "default", "tool_use"): chat rows need the default
            own = own.get("default") or next(iter(own.values()), None)
        self.template: str = chat_template(cfg.chat_template) or own or CHATML_TEMPLATE
        # Offsets (fast tokenizers) are what the generation-tag mask is computed from.
        has_tags = bool(_GENERATION_TAG.search(self.template))
        self.mask_method = (
            "generation_tags" if has_tags and getattr(tokenizer, "is_fast", False) else "prefix_diff"
        )
        self.block_size = min(cfg.text_block_size or cfg.max_seq_length, cfg.max_seq_length)

    def encode_all(self, examples: list[Example]) -> tuple[list[Row], Counter[str]]:
        """Every example's rows, in order, and the counts (tokens, trained tokens, truncated, dropped)."""
        counts: Counter[str] = Counter(tokens=0, trained_tokens=0, truncated=0, dropped=0)
        rows: list[Row] = []
        for example_rows, counted in self.encode_each(examples):
            rows += example_rows
            counts.update(counted)
        for row in rows:
            counts["tokens"] += len(row["input_ids"])
            counts["trained_tokens"] += sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)
        return rows, counts

    def encode_each(self, examples: list[Example]) -> list[tuple[list[Row], Counter[str]]]:
        """Each example's rows (a text may give several blocks, a chat row one or none) and its
        truncated/dropped counts; text rows are tokenized as one batch."""
        out: list[tuple[list[Row], Counter[str]]] = [([], Counter()) for _ in examples]
        texts = [i for i, e in enumerate(examples) if e.kind == "text"]
        if texts:
            for i, ids in zip(
                texts, self._tokenize_texts([examples[i].text or "" for i in texts]), strict=True
            ):
                out[i] = (self._blocks(ids), Counter())
        for i, example in enumerate(examples):
            if example.kind == "text":
                continue
            counted: Counter[str] = Counter()
            ids, labels = self.encode_example(example)
            if len(ids) > self.cfg.max_seq_length:
                counted["truncated"] += 1
                ids, labels = ids[: self.cfg.max_seq_length], labels[: self.cfg.max_seq_length]
            # The first label never gets a prediction (causal shift): a row needs one after it.
            if all(label == IGNORE_INDEX for label in labels[1:]):
                counted["dropped"] += 1
                out[i] = ([], counted)
            else:
                out[i] = ([{"input_ids": ids, "labels": labels}], counted)
        return out

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each raw text. A text longer than TEXT_PIECE_CHARS is tokenized in pieces
        cut at whitespace and joined (the fast tokenizer aborts the process on a 32 MiB string);
        only the first piece gets the tokenizer's special tokens."""
        firsts, rests, owners = [], [], []
        for i, text in enumerate(texts):
            pieces = text_pieces(text, TEXT_PIECE_CHARS)
            firsts.append(pieces[0])
            rests += pieces[1:]
            owners += [i] * (len(pieces) - 1)
        out = [list(ids) for ids in self.tokenizer(firsts, add_special_tokens=True)["input_ids"]]
        if rests:
            for owner, ids in zip(
                owners, self.tokenizer(rests, add_special_tokens=False)["input_ids"], strict=True
            ):
                out[owner].extend(ids)
        return out

    def _blocks(self, ids: list[int]) -> list[Row]:
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # documents end with eos so the model learns where text stops
        out = []
        for start in range(0, len(ids), self.block_size):
            block = ids[start : start + self.block_size]
            if len(block) >= 2:  # one token has nothing to predict
                out.append({"input_ids": block, "labels": list(block)})
        return out

    def encode_example(self, example: Example) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a chat-like example (its tools and turn flags honoured)."""
        return self.encode_chat(
            example.messages, where=example.where, tools=example.tools, trained=example.trained
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        where: str = "row 0",
        tools: list[dict[str, Any]] | None = None,
        trained: list[bool | None] | None = None,
    ) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation; labels mask the tokens that do not train."""
        try:
            full = self._render(messages, tools)
            if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
                self._check_tools_rendered(messages, tools, full, where)
            if not self.cfg.train_on_responses_only and trained is None:
                ids = self._ids(full)
                return ids, list(ids)
            if self.mask_method == "generation_tags" and trained is None:
                enc = self.tokenizer.apply_chat_template(
                    messages,
                    tools=tools,
                    chat_template=self.template,
                    tokenize=True,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                )
                ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
            else:
                ids, mask = self._prefix_diff(messages, tools, trained, full)
        except JobFailed:
            raise
        except Exception as exc:  # a template's own raise_exception(), or a Jinja error
            raise JobFailed(
                "bad_dataset_row",
                f"{where}: the chat template cannot render this conversation ({type(exc).__name__}: {exc})",
                hint='fix the row, or set data.chat_template to a template that accepts it ("chatml" names '
                "the built-in ChatML one, which renders tools)",
            ) from exc
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        return ids, labels

    def _check_tools_rendered(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, full: str, where: str
    ) -> None:
        """A template without tool support renders tool calls and schemas as nothing: refuse it
        rather than train on conversations with their calls cut out."""
        missing = [t["function"]["name"] for t in tools or [] if t["function"]["name"] not in full]
        missing += [
            call["function"]["name"]
            for m in messages
            for call in m.get("tool_calls") or []
            if call["function"]["name"] not in full
        ]
        missing += ["a tool result" for m in messages if m["role"] == "tool" and m["content"] not in full]
        if missing:
            raise JobFailed(
                "bad_dataset_row",
                f"{where}: the chat template does not render tool use: {missing[0]!r} is missing from the "
                "rendered conversation",
                hint='set data.chat_template to a template that renders tools= and tool_calls ("chatml" names '
                "the built-in ChatML one, which does)",
                details={"errors": [where]},
            )

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        *,
        add_generation_prompt: bool = False,
    ) -> str:
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return str(text)

    def _ids(self, text: str) -> list[int]:
        # Templates write their own bos/special tokens, as apply_chat_template(tokenize=True) assumes.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _trained_turns(self, messages: list[dict[str, Any]], trained: list[bool | None] | None) -> list[bool]:
        flags = trained or [None] * len(messages)
        if self.cfg.train_on_responses_only:
            return [
                (f is not False and m["role"] == "assistant") or f is True
                for m, f in zip(messages, flags, strict=True)
            ]
        return [f is not False for f in flags]

    def _prefix_diff(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        trained: list[bool | None] | None,
        full: str,
    ) -> tuple[list[int], list[int]]:
        turns = self._trained_turns(messages, trained)
        # Responses only: the spans that train. Otherwise everything trains but the flagged-off spans.
        wanted = turns if self.cfg.train_on_responses_only else [not t for t in turns]
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if not wanted[i]:
                continue
            assistant = message["role"] == "assistant"
            before = self._render(messages[:i], tools, add_generation_prompt=assistant) if i else ""
            through = self._render(messages[: i + 1], tools)
            if not (through.startswith(before) and full.startswith(through)):
                raise JobFailed(
                    "invalid_config",
                    "the chat template renders earlier turns differently once later turns follow, so the "
                    "trained turns' tokens cannot be located",
                    hint="set data.train_on_responses_only to false (and drop per-turn train flags), or use a "
                    "template with {% generation %} tags",
                )
            # Trailing whitespace after the end-of-turn token is layout, not something the turn says.
            spans.append((len(before), max(len(before), len(through.rstrip()))))
        inside = 1 if self.cfg.train_on_responses_only else 0
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            mask = [
                inside if any(start < e and end > s for s, e in spans) else 1 - inside
                for start, end in enc["offset_mapping"]
            ]
            return ids, mask
        # Slow tokenizers have no offsets: count tokens of each rendered prefix instead.
        ids = self._ids(full)
        mask = [1 - inside] * len(ids)
        for s, e in spans:
            for k in range(len(self._ids(full[:s])), min(len(self._ids(full[:e])), len(ids))):
                mask[k] = inside
        return ids, mask
