"""One dataset, end to end: read rows -> preset / column mapping -> validate -> tokenise.

Every bad row is quarantined with its number, field and reason (or refused, when strict);
the counts are reported and a dataset with too many bad rows refuses to start.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import DataConfig, DatasetSource
from rlhf.data.formats import PromptRow, is_conversation, validate
from rlhf.data.presets import PRESETS, hub_split
from rlhf.data.quarantine import DataError, Quarantine, RowError, where
from rlhf.data.sources import read_rows
from rlhf.data.synthetic import builtin_preset
from rlhf.data.tokenize import FEATURIZERS, Tokenizer, TokenizeSettings, require_chat_template
from rlhf.envs import tool_schemas

log = logging.getLogger(__name__)


@dataclass
class TokenizedDataset:
    """Features of one split, with the account of what was read and what was quarantined."""

    source: str
    format: str
    features: list[Any]
    rows_read: int
    quarantine: Quarantine
    quarantine_file: Path | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int):
        return self.features[i]

    def summary(self) -> str:
        text = (
            f"{self.source}: {len(self.features)} of {self.rows_read} rows usable ({self.format})"
        )
        if self.quarantine.count:
            text += f", {self.quarantine.count} quarantined" + (
                f" -> {self.quarantine_file}" if self.quarantine_file else ""
            )
        cut = {k.split("/", 1)[1]: v for k, v in self.stats.items() if k.startswith("truncated/")}
        if cut:
            text += ", truncated to fit data.max_length: " + ", ".join(
                f"{n} {field}" for field, n in sorted(cut.items())
            )
        return text


def map_row(source: DatasetSource, fmt: str, row: dict[str, Any], index: int) -> dict[str, Any]:
    """Apply the source's preset, renames and dropped columns to one raw row."""
    preset = PRESETS[source.preset] if source.preset is not None else builtin_preset(source.path)
    if preset is not None:
        row = preset(row, fmt, index)
    if source.columns:
        row = {source.columns.get(k, k): v for k, v in row.items()}
    if source.ignore_columns:
        row = {k: v for k, v in row.items() if k not in source.ignore_columns}
    return row


def _uses_chat(typed) -> bool:
    return any(
        is_conversation(getattr(typed, f, None))
        for f in ("prompt", "chosen", "rejected", "completion", "messages")
    )


def load_split(
    source: DatasetSource,
    data: DataConfig,
    fmt: str,
    tokenizer,
    quarantine_path: Path | None = None,
    required: tuple[str, ...] = (),
) -> TokenizedDataset:
    """Read, validate and tokenise one dataset source for the given row format (`required`:
    see load_datasets)."""
    settings = TokenizeSettings(
        data.max_length,
        data.prompt_limit,
        data.truncation_mode,
        data.completion_only_loss,
        tool_schemas(data.tools, "data.tools"),
    )
    t = Tokenizer(tokenizer, settings)
    featurize = FEATURIZERS[fmt]
    quarantine = Quarantine(source.path, quarantine_path, strict=data.strict)
    features, rows_read, stats = [], 0, Counter()
    split = hub_split(source.preset, fmt, source.split)
    for number, raw in read_rows(source.path, split, source.name, source.data_dir):
        if source.limit is not None and rows_read >= source.limit:
            break
        rows_read += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            row = map_row(source, fmt, raw, number - 1)
            typed = validate(row, fmt, data.num_labels, required)
            if data.chat_prompts and isinstance(typed, PromptRow) and isinstance(typed.prompt, str):
                typed = PromptRow(({"role": "user", "content": typed.prompt},), typed.fields)
            if _uses_chat(typed):
                require_chat_template(tokenizer, where(source.path, number, None))
            t.truncated.clear()
            features.append(featurize(t, typed, len(features)))
            stats.update(f"truncated/{f}" for f in t.truncated)
        except RowError as err:
            quarantine.add(number, err, None if isinstance(raw, RowError) else raw)
    dataset = TokenizedDataset(
        source.path, fmt, features, rows_read, quarantine, quarantine.write(), dict(stats)
    )
    _check_health(dataset, data.max_bad_fraction)
    return dataset


def _check_health(dataset: TokenizedDataset, max_bad_fraction: float) -> None:
    q = dataset.quarantine
    if dataset.rows_read == 0:
        raise DataError(f"{dataset.source}: no rows to read")
    if not dataset.features:
        raise DataError(
            f"{dataset.source}: none of its {dataset.rows_read} rows is usable; first: {q.first_message()}"
        )
    fraction = q.count / dataset.rows_read
    if fraction > max_bad_fraction:
        raise DataError(
            f"{dataset.source}: {q.count} of {dataset.rows_read} rows are bad ({fraction:.0%}, above "
            f"data.max_bad_fraction={max_bad_fraction:g}); first: {q.first_message()}"
            + (f"; all are listed in {dataset.quarantine_file}" if dataset.quarantine_file else "")
        )
    if q.count:
        log.warning(
            "%s: %d bad rows quarantined; first: %s", dataset.source, q.count, q.first_message()
        )


def load_datasets(
    data: DataConfig,
    fmt: str,
    tokenizer,
    output_dir: str | Path | None = None,
    required: tuple[str, ...] = (),
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Train and eval splits; quarantine files go to OUTPUT_DIR/quarantine/{train,eval}.jsonl.
    `required`: fields every prompt row must carry (those the reward reads)."""
    qdir = Path(output_dir) / "quarantine" if output_dir is not None else None
    train = load_split(
        data.train, data, fmt, tokenizer, qdir / "train.jsonl" if qdir else None, required
    )
    if data.eval is not None:
        return train, load_split(
            data.eval, data, fmt, tokenizer, qdir / "eval.jsonl" if qdir else None, required
        )
    if data.eval_fraction > 0:
        return split_off_eval(train, data.eval_fraction, data.seed)
    return train, None


def split_off_eval(
    train: TokenizedDataset, fraction: float, seed: int
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """A seeded random `fraction` of train as eval (features re-indexed from 0 in each)."""
    import dataclasses
    import random

    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * fraction))
    if n_eval >= len(order):
        raise DataError(f"{train.source}: data.eval_fraction={fraction} leaves no training rows")

    def subset(indices: list[int], label: str) -> TokenizedDataset:
        feats = [
            dataclasses.replace(train.features[i], index=j) for j, i in enumerate(sorted(indices))
        ]
        return dataclasses.replace(train, source=f"{train.source} ({label})", features=feats)

    return subset(order[n_eval:], "train"), subset(order[:n_eval], "eval")
