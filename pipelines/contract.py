"""The row contract every record kind's parser keeps (key, source, row, <its columns>, error):
raw file contents to records, with a reason for every bad one. Plain Python and pyarrow, run in
the Spark task that read the files (pipelines.sources.read_parsed)."""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from pipelines.sources import Parser, arrow_schema


def record_parser(root: str, fmt: str, encoding: str, key_column: str, schema: str, convert,
                  fast: Callable[[bytes], dict | None] | None = None) -> Parser:
    """Raw files -> one row per record: key, source, row, <schema>, error. `convert(record)`
    returns the kind's columns or raises records.Invalid with the reason. Without a key column
    the key is <file relative to the landing root>:<line>. A file that cannot be read, or holds
    no record at all, is one row with the reason: every listed file is accounted for.

    `fast(content)`, where given, parses a whole file with vectorized operations into Arrow
    columns (key, row and the schema's) or returns None; it must return None for any file
    where it would not give exactly what the record-by-record path gives (any bad row, quoting,
    blank lines), and that file then takes the record-by-record path."""
    import pandas as pd

    from pipelines.images import relative_key
    from pipelines.records import Invalid, read_records, text

    columns = ["key", "source", "row", *[c.split()[0] for c in schema.split(", ")], "error"]
    where = "row" if fmt == "parquet" else "line"
    full = f"key string, source string, row long, {schema}, error string"

    arrow = arrow_schema(full)

    def parse(paths: list[str], contents: list) -> pa.Table:
        out, batches = [], []
        for path, content in zip(paths, contents):
            parsed = fast(content) if fast is not None and isinstance(content, bytes) and content else None
            if parsed is not None:
                n = len(parsed["key"])
                parsed = parsed | {"source": pa.array([path] * n, pa.string()), "error": pa.nulls(n, pa.string())}
                batches.append(pa.RecordBatch.from_arrays([pa.array(parsed[f.name], f.type) if not isinstance(
                    parsed[f.name], pa.Array) else parsed[f.name].cast(f.type) for f in arrow], schema=arrow))
                continue
            relative = relative_key(path, root)
            found = len(out)
            read = [(None, None, str(content))] if isinstance(content, OSError) else read_records(content, fmt, encoding)
            for row, record, reason in read:
                item = {"key": f"{relative}:{row}" if row else relative, "source": path, "row": row, "error": reason}
                if record is not None:
                    try:
                        if key_column:
                            item["key"] = text(record, key_column)
                        item.update(convert(record))
                    except Invalid as exc:
                        item["error"] = f"{where} {row}: {exc}"
                out.append(item)
            if len(out) == found:
                out.append({"key": relative, "source": path, "row": None,
                            "error": "no records in the file (a header or blank lines only)"})
        # object columns: a missing value stays None (null), never NaN
        frame = pd.DataFrame({c: pd.Series([item.get(c) for item in out], dtype=object) for c in columns})
        batches.append(pa.RecordBatch.from_pandas(frame, schema=arrow, preserve_index=False))
        return pa.Table.from_batches(batches, arrow)

    return Parser(full, parse)
