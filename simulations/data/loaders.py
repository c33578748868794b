"""Read an interaction file (MovieLens or a generic CSV) into an :class:`Interactions` table.

Four formats are understood; :func:`detect_format` tells them apart from the file's first
non-blank line, and ``load_file(..., format=...)`` (``--format`` on the command line)
overrides the detection:

``ml-100k``
    MovieLens 100K ``u.data``: tab-separated ``user item rating timestamp``, no header.
``ml-1m``
    MovieLens 1M / 10M ``ratings.dat``: ``user::item::rating::timestamp``, no header.
``ml-latest``
    MovieLens latest / 20M / 25M ``ratings.csv``: comma-separated, header
    ``userId,movieId,rating,timestamp``.
``csv``
    A generic comma-separated file whose header names the columns ``user`` and ``item`` and,
    optionally, ``timestamp`` (integer seconds) and ``rating``, in any order; other columns are
    ignored. User and item ids may be strings: a column that is not all integers is kept as text.

Files are parsed by pandas' C engine (parsing 10M rows takes a few seconds). Every malformed input
raises a :class:`DataFormatError` whose message names the file, the 1-based line at fault
with its content, and the fix; to find that line the file is scanned again in Python, which
happens only on the error path. Blank lines are skipped; a single trailing separator on a
line (an empty last field) is tolerated; no other row is ever skipped. Rating thresholds,
duplicate merging (both reported as :class:`DataWarning`) and reindexing are done by
:func:`build_interactions`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from fedpref.simulations.data.interactions import DataFormatError, Interactions, build_interactions

__all__ = ["FORMATS", "FORMAT_DESCRIPTIONS", "detect_format", "load_file"]

FORMATS = ("ml-100k", "ml-1m", "ml-latest", "csv")

FORMAT_DESCRIPTIONS = {
    "ml-100k": "MovieLens 100K u.data: tab-separated user, item, rating, timestamp, no header "
    "(e.g. '196<TAB>242<TAB>3<TAB>881250949')",
    "ml-1m": "MovieLens 1M/10M ratings.dat: user::item::rating::timestamp, no header "
    "(e.g. '1::1193::5::978300760')",
    "ml-latest": "MovieLens latest/20M/25M ratings.csv: comma-separated with the header "
    "userId,movieId,rating,timestamp",
    "csv": "comma-separated with a header naming the columns user and item, optionally "
    "timestamp (integer seconds) and rating, in any order; other columns are ignored",
}

# Header formats: canonical column -> (header name, lower case; required?)
_HEADER_COLUMNS = {
    "ml-latest": {
        "user": ("userid", True),
        "item": ("movieid", True),
        "rating": ("rating", True),
        "timestamp": ("timestamp", True),
    },
    "csv": {
        "user": ("user", True),
        "item": ("item", True),
        "rating": ("rating", False),
        "timestamp": ("timestamp", False),
    },
}
_ML_LATEST_HEADER = ["userid", "movieid", "rating", "timestamp"]

_SEPARATOR = {"ml-100k": "\t", "ml-1m": "::", "ml-latest": ",", "csv": ","}
_SEP_NAMES = {
    "::": "'::'",
    "\t": "tabs",
    ",": "commas",
    ";": "semicolons",
    "|": "'|'",
    " ": "spaces",
}
_ARCHIVE_FILES = ("u.data", "ratings.dat", "ratings.csv")
_MAGIC = {
    b"\x1f\x8b": "gzip-compressed (decompress it first, e.g. gunzip)",
    b"PK\x03\x04": "a zip archive (unzip it and pass the ratings file inside)",
    b"BZh": "bzip2-compressed (decompress it first, e.g. bunzip2)",
    b"\xfd7zXZ": "xz-compressed (decompress it first, e.g. unxz)",
}
_INT = re.compile(r"\s*[+-]?\d+\s*\Z")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SHOW = 120  # characters of a line shown in a message

# Column kinds: "int" (MovieLens ids, timestamps), "id" (generic ids: integers or text),
# "float" (ratings).
_KINDS_ML = {"user": "int", "item": "int", "rating": "float", "timestamp": "int"}
_KINDS_CSV = {"user": "id", "item": "id", "rating": "float", "timestamp": "int"}


@dataclass(frozen=True)
class _Plan:
    """How to read one file: the pandas call, and the same layout for the Python scanner."""

    fmt: str
    pandas_sep: str
    width: int  # number of pandas columns (names 0..width-1)
    columns: dict[str, int]  # canonical column -> pandas column
    kinds: dict[str, str]  # canonical column -> kind
    must_be_empty: tuple[int, ...]  # pandas columns that must hold no value
    skiprows: int  # physical lines before the data (header included)
    header_line: int | None  # 1-based line of the header, None if the format has none
    n_fields: int  # fields per line as the scanner splits it
    fields: dict[str, int]  # canonical column -> field index for the scanner
    text_columns: frozenset[int] = field(default_factory=frozenset)  # read as str


# --------------------------------------------------------------------------- public API


def detect_format(path: str | Path) -> str:
    """Return the format of ``path`` (one of :data:`FORMATS`), told from its first line.

    Raises :class:`FileNotFoundError` for a missing file and :class:`DataFormatError` for an
    empty file or one whose first line matches no format (the message lists the formats and
    what each looks like).
    """
    path = _check_path(path)
    lineno, line = _first_line(path)
    return _detect_or_raise(path, lineno, line)


def load_file(
    path: str | Path,
    *,
    format: str | None = None,
    rating_threshold: float | None = None,
) -> Interactions:
    """Load an interaction file into an :class:`Interactions` table named after the file.

    ``format`` is one of :data:`FORMATS` (see the module docstring); ``None`` detects it
    from the first non-blank line. ``rating_threshold`` keeps only rows rated at least that
    much (the file must have ratings). Original user and item ids are kept in
    ``user_ids`` / ``item_ids``: integers for MovieLens files, and for generic CSV integers
    when every id is an integer, text otherwise.
    """
    if format is not None and format not in FORMATS:
        raise DataFormatError(
            f"{path}: unknown format {format!r}; pass --format with one of "
            f"{', '.join(FORMATS)}, or leave it out to detect the format from the file.\n"
            + _formats_table()
        )
    path = _check_path(path)
    lineno, line = _first_line(path)
    fmt = format if format is not None else _detect_or_raise(path, lineno, line)

    if fmt in _HEADER_COLUMNS:
        plan = _header_plan(path, fmt, lineno, line)
    else:
        plan = _headerless_plan(fmt)
        # The first line tells most wrong-format mistakes at once, before pandas runs.
        reason = _check_line(line, plan)
        if reason is not None:
            raise _bad_line_error(path, plan, lineno, line, reason)

    user, item, timestamp, rating = _read_columns(path, plan)
    return build_interactions(
        user,
        item,
        timestamp,
        rating,
        name=path.name,
        rating_threshold=rating_threshold,
    )


# --------------------------------------------------------------------------- the file


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file. Check the path; MovieLens archives hold u.data (ml-100k), "
            "ratings.dat (ml-1m, ml-10m) or ratings.csv (ml-latest, ml-20m, ml-25m)."
        )
    if path.is_dir():
        found = [str(path / name) for name in _ARCHIVE_FILES if (path / name).is_file()]
        hint = f"; it holds {', '.join(found)}" if found else ""
        raise IsADirectoryError(f"{path}: is a folder, not a file: pass the ratings file inside it{hint}")
    return path


def _open_text(path: Path):
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _first_line(path: Path) -> tuple[int, str]:
    """The 1-based number and content of the first non-blank line; errors if there is none."""
    with open(path, "rb") as raw:
        head = raw.read(8192)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise DataFormatError(f"{path}: this file is {what}; fedpref reads plain text files.")
    if b"\x00" in head:
        raise DataFormatError(
            f"{path}: this looks like a binary file, not text; pass the ratings file "
            "(u.data, ratings.dat, ratings.csv or a CSV with a header)."
        )
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                return lineno, line.rstrip("\r\n")
    what = "is empty (0 bytes)" if path.stat().st_size == 0 else "has only blank lines"
    raise DataFormatError(
        f"{path}: the file {what}, so there are no interactions to read. Check that it was "
        "downloaded or extracted completely, or pass the right file (u.data, ratings.dat, "
        "ratings.csv or a CSV with a header naming user and item)."
    )


# --------------------------------------------------------------------------- detection


def _split_csv(line: str) -> list[str]:
    return next(csv.reader([line], skipinitialspace=True), [])


def _is_int(text: str) -> bool:
    """An integer literal that fits in int64 (what pandas reads as an int64 column)."""
    return _INT.match(text) is not None and _INT64_MIN <= int(text) <= _INT64_MAX


def _drop_trailing(fields: list[str]) -> list[str]:
    """Fields without the empty one that a trailing separator leaves."""
    return fields[:-1] if len(fields) > 1 and not fields[-1].strip() else fields


def _is_number(text: str) -> bool:
    if "_" in text:  # Python accepts 1_000, pandas does not
        return False
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _detect_line(line: str) -> str | None:
    """The format a first line belongs to, or None."""
    text = line.strip(" \r\n")
    if "::" in text:
        return "ml-1m" if len(_drop_trailing(text.split("::"))) == 4 else None
    if "\t" in text:
        fields = _drop_trailing(text.split("\t"))
        if len(fields) == 4 and all(_is_int(f) for f in fields[:2] + fields[3:]) and _is_number(fields[2]):
            return "ml-100k"
        return None
    names = [f.strip().lower() for f in _split_csv(text)]
    if sorted(names) == sorted(_ML_LATEST_HEADER):
        return "ml-latest"
    if "user" in names and "item" in names:
        return "csv"
    return None


def _guess_separator(line: str) -> str | None:
    text = line.strip()
    for sep in ("::", "\t", ",", ";", "|"):
        if sep in text:
            return sep
    return " " if " " in text else None


def _separator_hint(line: str, fmt: str | None) -> str:
    """A sentence on the separator ``line`` seems to use, when it is not ``fmt``'s; else ''."""
    expected = _SEPARATOR.get(fmt) if fmt else None
    seen = _guess_separator(line)
    if seen is None or seen == expected:
        return ""
    text = f"The line seems to use {_SEP_NAMES[seen]} as separator"
    if expected is not None:
        text += f", but {fmt} uses {_SEP_NAMES[expected]}"
    other = _detect_line(line)
    if other is not None and other != fmt:
        return text + f": try --format {other}."
    if seen == ",":
        return (
            text + ": a comma-separated file needs a header line: userId,movieId,rating,timestamp "
            "for --format ml-latest, or one naming user and item (optionally timestamp, rating) "
            "for --format csv."
        )
    if seen == "\t":
        return (
            text + ": tab-separated files are read only as ml-100k (user, item, rating, "
            "timestamp; no header); convert any other to comma-separated with a header naming "
            "user and item and use --format csv."
        )
    if seen == "::":
        return text + ": '::'-separated files are read as ml-1m (user::item::rating::timestamp)."
    return (
        text + ": convert the file to comma-separated with a header naming user and item "
        "(optionally timestamp, rating) and use --format csv."
    )


def _formats_table() -> str:
    return "\n".join(f"  {fmt:<10} {FORMAT_DESCRIPTIONS[fmt]}" for fmt in FORMATS)


def _show(text: str, limit: int = _SHOW) -> str:
    """``text`` quoted, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _detect_or_raise(path: Path, lineno: int, line: str) -> str:
    fmt = _detect_line(line)
    if fmt is not None:
        return fmt
    fields = [f.strip() for f in _split_csv(line)]
    if _guess_separator(line) != ",":
        hint = _separator_hint(line, None)
    elif all(_is_number(f) for f in fields):
        hint = (
            "It looks like comma-separated data without a header line: add one first, e.g. "
            "user,item,rating,timestamp (--format csv) or userId,movieId,rating,timestamp "
            "(--format ml-latest)."
        )
    else:
        hint = (
            f"It looks like a comma-separated header with the columns {', '.join(map(repr, fields))}, "
            "but --format csv needs columns named user and item (optionally timestamp, rating) "
            "and --format ml-latest the header userId,movieId,rating,timestamp: rename the columns."
        )
    raise DataFormatError(
        f"{path}, line {lineno}: cannot tell the format of this file from its first line:\n"
        f"    {_show(line)}\n"
        + (hint + "\n" if hint else "")
        + f"Pass --format (format= in Python) with one of {', '.join(FORMATS)}:\n"
        + _formats_table()
    )


# --------------------------------------------------------------------------- plans


def _headerless_plan(fmt: str) -> _Plan:
    fields = {"user": 0, "item": 1, "rating": 2, "timestamp": 3}
    if fmt == "ml-100k":
        # One spare column catches a fifth field (a trailing tab leaves it empty).
        return _Plan(fmt, "\t", 5, dict(fields), _KINDS_ML, (4,), 0, None, 4, fields)
    # ml-1m: split on ':' (the C engine takes one-character separators only), so '::'
    # leaves empty columns 1, 3, 5; columns 7 and 8 catch extra fields.
    columns = {"user": 0, "item": 2, "rating": 4, "timestamp": 6}
    return _Plan(fmt, ":", 9, columns, _KINDS_ML, (1, 3, 5, 7, 8), 0, None, 4, fields)


def _header_plan(path: Path, fmt: str, lineno: int, line: str) -> _Plan:
    """Check the header line of a comma-separated format and map its columns."""
    header = _split_csv(line)
    names = [name.strip().lower() for name in header]
    if len(header) == 1:
        hint = _separator_hint(line, fmt)
        if hint:
            raise DataFormatError(
                f"{path}, line {lineno}: {fmt} files are comma-separated with a header, but "
                f"this header line is not:\n    {_show(line)}\n{hint}"
            )
    wanted = _HEADER_COLUMNS[fmt]
    columns = {col: names.index(name) for col, (name, _) in wanted.items() if name in names}
    missing = [name for col, (name, required) in wanted.items() if required and col not in columns]
    if missing:
        raise _missing_columns_error(path, fmt, lineno, line, header, missing)
    kinds = _KINDS_ML if fmt == "ml-latest" else _KINDS_CSV
    return _Plan(
        fmt=fmt,
        pandas_sep=",",
        width=len(header) + 1,  # one spare column catches extra fields
        columns=columns,
        kinds={col: kinds[col] for col in columns},
        must_be_empty=(len(header),),
        skiprows=lineno,
        header_line=lineno,
        n_fields=len(header),
        fields=dict(columns),
    )


def _missing_columns_error(
    path: Path, fmt: str, lineno: int, line: str, header: list[str], missing: list[str]
) -> DataFormatError:
    found = ", ".join(repr(name.strip()) for name in header) or "none"
    if fmt == "ml-latest":
        needs = "userId, movieId, rating and timestamp"
        fix = (
            "ml-latest needs the header userId,movieId,rating,timestamp; for other column "
            "names use --format csv with columns user and item (optionally timestamp, rating)."
        )
    else:
        needs = "user and item (optionally timestamp and rating)"
        fix = (
            "Rename the header's columns so that the user id column is called 'user' and the "
            "item id column 'item' (optionally 'timestamp', in integer seconds, and 'rating'); "
            "other columns are ignored."
        )
    if len(header) > 1 and all(_is_number(name) for name in header):
        fix = (
            "The line looks like data, not a header: add a header line first, e.g. "
            "user,item,rating,timestamp (--format csv). " + fix
        )
    other = _detect_line(line)
    if other is not None and other != fmt:
        fix += f" This header looks like {other}: try --format {other}."
    return DataFormatError(
        f"{path}, line {lineno}: the header has the columns {found}, but {fmt} needs {needs}; "
        f"missing: {', '.join(missing)}.\n    {_show(line)}\n{fix}"
    )


# --------------------------------------------------------------------------- reading


def _read_columns(path: Path, plan: _Plan):
    """Read and check the columns; returns (user, item, timestamp | None, rating | None)."""
    df = _read_table(path, plan)
    if len(df) == 0:
        raise DataFormatError(
            f"{path}, line {plan.header_line}: the file has a header but no data rows below "
            "it. Add the interaction rows, or check that the file was written or downloaded "
            "completely."
        )
    for pos in plan.must_be_empty:
        if df[pos].notna().any():
            raise _scan_error(path, plan, f"unexpected values in column {pos + 1}")
    out: dict[str, np.ndarray] = {}
    as_text: list[int] = []
    for col, pos in plan.columns.items():
        values = _column(df[pos], plan.kinds[col], as_text_ok=pos in plan.text_columns)
        if values is None:
            raise _scan_error(path, plan, f"the {col} column does not parse as {plan.kinds[col]}")
        if values is _RETRY_AS_TEXT:
            as_text.append(pos)
        else:
            out[col] = values
    if as_text:  # ids such as 1.5 or True: read those columns again, as text
        del df
        return _read_columns(path, replace(plan, text_columns=plan.text_columns | frozenset(as_text)))
    return out["user"], out["item"], out.get("timestamp"), out.get("rating")


def _read_table(path: Path, plan: _Plan) -> pd.DataFrame:
    dtype: dict[int, str] = {pos: "category" for pos in plan.must_be_empty}  # all-NaN: cheap
    dtype.update({pos: "str" for pos in plan.text_columns})
    try:
        return pd.read_csv(
            path,
            sep=plan.pandas_sep,
            header=None,
            names=list(range(plan.width)),
            skiprows=plan.skiprows,
            index_col=False,
            dtype=dtype,
            engine="c",
            encoding="utf-8",
            keep_default_na=False,  # only an empty field is missing; 'NA' is an id or an error
            na_values=[""],
            skipinitialspace=plan.header_line is not None,
            quoting=csv.QUOTE_MINIMAL if plan.header_line is not None else csv.QUOTE_NONE,
            low_memory=plan.fmt != "csv",  # generic ids: infer each column's type at once
        )
    except UnicodeDecodeError:
        raise _encoding_error(path) from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(range(plan.width)))
    except (ValueError, OverflowError) as exc:  # pandas.errors.ParserError is a ValueError
        raise _scan_error(path, plan, str(exc).strip()) from None


_RETRY_AS_TEXT = object()  # _column's answer for ids that pandas parsed as float or bool


def _column(series: pd.Series, kind: str, *, as_text_ok: bool) -> np.ndarray | object | None:
    """The column as a numpy array if every value is of ``kind``, else None (or
    :data:`_RETRY_AS_TEXT` for generic ids that must be read again as text)."""
    dtype = series.dtype
    is_int = ptypes.is_signed_integer_dtype(dtype)
    if kind == "int":
        return series.to_numpy() if is_int else None
    if kind == "float":
        if not ptypes.is_numeric_dtype(dtype) or ptypes.is_bool_dtype(dtype):
            return None
        values = series.to_numpy(dtype=np.float64)
        return values if np.isfinite(values).all() else None
    # "id": integers stay integers, anything else is text
    if is_int:
        return series.to_numpy()
    if series.isna().any():
        return None
    if as_text_ok or ptypes.is_string_dtype(dtype) or ptypes.is_object_dtype(dtype):
        return series.to_numpy(dtype=str)
    return _RETRY_AS_TEXT  # parsed as float or bool: read again as text to keep the ids


# --------------------------------------------------------------------------- errors


def _fields(n: int) -> str:
    return f"{n} field" + ("" if n == 1 else "s")


def _check_line(line: str, plan: _Plan) -> str | None:
    """Why a data line is bad (as the scanner sees it), or None if it is fine."""
    if plan.header_line is None:
        fields = line.split(_SEPARATOR[plan.fmt])
    else:
        fields = _split_csv(line)
    n = len(fields)
    if n == plan.n_fields + 1 and not fields[-1].strip():
        n -= 1  # a trailing separator
    needed = max(plan.fields.values()) + 1
    if plan.header_line is None and n != plan.n_fields:
        sep = _SEP_NAMES[_SEPARATOR[plan.fmt]]
        return f"it has {_fields(n)} where {plan.fmt} needs {plan.n_fields} separated by {sep}"
    if n > plan.n_fields or n < needed:
        return f"it has {_fields(n)} but the header (line {plan.header_line}) has {plan.n_fields}"
    for col, index in plan.fields.items():
        value = fields[index]
        kind = plan.kinds[col]
        if kind == "int" and not _is_int(value):
            if _INT.match(value):
                return f"the {col} {_show(value, 40)} does not fit in 64 bits"
            if col == "timestamp":
                return f"the timestamp {_show(value, 40)} is not a whole number of seconds (Unix time)"
            return f"the {col} id {_show(value, 40)} is not an integer ({plan.fmt} ids are integers)"
        if kind == "float" and not _is_number(value):
            return f"the rating {_show(value, 40)} is not a number"
        if kind == "id" and not value.strip():
            return f"the {col} id is empty"
    return None


def _bad_line_error(path: Path, plan: _Plan, lineno: int, line: str, reason: str) -> DataFormatError:
    hint = _separator_hint(line, plan.fmt)
    return DataFormatError(
        f"{path}, line {lineno}: not valid {plan.fmt} data: {reason}:\n"
        f"    {_show(line)}\n"
        + (hint + "\n" if hint else "")
        + f"{plan.fmt} is {FORMAT_DESCRIPTIONS[plan.fmt]}.\n"
        f"Fix or delete line {lineno}, or pass the right --format ({', '.join(FORMATS)})."
    )


def _scan_error(path: Path, plan: _Plan, detail: str) -> DataFormatError:
    """Find the first bad line in Python (error path only) and describe it."""
    blank_sep = ":" if plan.fmt == "ml-1m" else plan.pandas_sep
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= plan.skiprows:
                continue
            line = line.rstrip("\r\n")
            if not line.strip() and (plan.header_line is not None or blank_sep not in line):
                continue  # pandas skips blank lines too
            reason = _check_line(line, plan)
            if reason is not None:
                return _bad_line_error(path, plan, lineno, line, reason)
    return DataFormatError(
        f"{path}: cannot be read as {plan.fmt} data ({detail}).\n"
        f"{plan.fmt} is {FORMAT_DESCRIPTIONS[plan.fmt]}. Check the file, or pass the right "
        f"--format ({', '.join(FORMATS)})."
    )


def _encoding_error(path: Path) -> DataFormatError:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                return DataFormatError(
                    f"{path}, line {lineno}: not UTF-8 text:\n    {_show(line)}\n"
                    f"Re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > "
                    f"{path.stem}.utf8{path.suffix}"
                )
    return DataFormatError(f"{path}: not UTF-8 text; re-encode the file as UTF-8.")
