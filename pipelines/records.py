"""Raw file bytes -> records, with the line (or row) of each and a reason for what cannot be
read. Plain Python, called inside Spark tasks by the table, ratings, text and time-series
pipelines; nothing here imports Spark."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Iterator

import pandas as pd

# (row, record or None, reason or None); row is the 1-based line of csv/jsonl/lines files
# (the header of a CSV file is line 1) and the 1-based row of a Parquet file; None = whole file
Record = tuple[int | None, dict | None, str | None]


def read_records(content: bytes, fmt: str, encoding: str = "utf-8") -> Iterator[Record]:
    if not content:
        yield None, None, "empty file"
        return
    if fmt == "parquet":
        yield from _parquet(content)
        return
    if fmt == "csv":
        yield from _csv(content, encoding)
        return
    for line_no, raw in enumerate(content.splitlines(), start=1):
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            yield line_no, None, f"line {line_no}: not valid {encoding}: {exc.reason}"
            continue
        if not line.strip():
            continue  # blank lines separate records; they are not records
        if fmt == "lines":
            yield line_no, {"text": line}, None
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            yield line_no, None, f"line {line_no}: not valid JSON: {exc}"
            continue
        if not isinstance(record, dict):
            yield line_no, None, f"line {line_no}: expected a JSON object, got {type(record).__name__}"
        else:
            yield line_no, record, None


def _csv(content: bytes, encoding: str) -> Iterator[Record]:
    try:
        text = content.decode(encoding)
    except UnicodeDecodeError as exc:
        yield None, None, f"not valid {encoding} at byte {exc.start}: {exc.reason}"
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        yield None, None, "CSV file without a header line"
        return
    line_no = reader.line_num
    for fields in reader:
        start, line_no = line_no + 1, reader.line_num  # quoted fields may span lines
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            yield start, None, f"line {start}: expected {len(header)} fields, got {len(fields)}"
        else:
            yield start, dict(zip(header, fields)), None


def _parquet(content: bytes) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(content))
    except Exception as exc:  # an unreadable file is data, not a crash
        yield None, None, f"cannot read Parquet: {type(exc).__name__}: {exc}"
        return
    for row_no, record in enumerate(table.to_pylist(), start=1):
        yield row_no, record, None


class Invalid(ValueError):
    """A value that breaks the contract; the message is the reason kept with the rejected row."""


def require(record: dict, column: str) -> Any:
    if column not in record:
        raise Invalid(f"column {column!r} is missing")
    value = record[column]
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value)):
        raise Invalid(f"column {column!r} is null")
    return value


def number(record: dict, column: str) -> float:
    """A finite number: JSON/Parquet numbers, or CSV text that parses as one."""
    value = require(record, column)
    if isinstance(value, bool):
        raise Invalid(f"column {column!r}: expected a number, got {value!r}")
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise Invalid(f"column {column!r}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise Invalid(f"column {column!r}: expected a finite number, got {value!r}")
    return out


def text(record: dict, column: str) -> str:
    value = require(record, column)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 read from a float column is the label "3"
    if isinstance(value, (dict, list)):
        raise Invalid(f"column {column!r}: expected a scalar, got {type(value).__name__}")
    return str(value).strip()


def is_timestamp(value: Any) -> bool:
    """Whether parse_time reads `value` as a timestamp (seconds since the epoch) rather than a number."""
    try:
        float(str(value).strip())
        return False
    except ValueError:
        return True


def parse_time(value: Any) -> float:
    """A time as a number: numbers (e.g. a year) stay as they are, timestamps become seconds
    since the epoch (UTC). Raises ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        try:
            out = float(str(value).strip())
        except ValueError:  # a timestamp (is_timestamp is this test on its own)
            stamp = pd.Timestamp(str(value).strip())  # ValueError when unparsable
            if stamp is pd.NaT:
                raise ValueError(f"not a time: {value!r}") from None
            if stamp.tzinfo is not None:
                stamp = stamp.tz_convert("UTC").tz_localize(None)
            out = (stamp - pd.Timestamp(0)).total_seconds()
    if not math.isfinite(out):
        raise ValueError(f"not a time: {value!r}")
    return out

