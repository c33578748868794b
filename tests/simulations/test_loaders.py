"""Tests of the file loaders: each format, detection, overrides, thresholds and every error."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest

from fedpref.simulations.data.interactions import DataFormatError, DataWarning
from fedpref.simulations.data.loaders import FORMATS, detect_format, load_file

ML_100K = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n"
ML_1M = "1::1193::5::978300760\n1::661::3.5::978302109\n2::1193::4::978300000\n"
ML_LATEST = (
    "userId,movieId,rating,timestamp\n"
    "1,31,2.5,1260759144\n"
    "1,1029,3.0,1260759179\n"
    "7,31,4.5,1260759200\n"
)
GENERIC = "item,extra,user\nbook,x,alice\nfilm,y,bob\nbook,z,bob\n"


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(DataFormatError) as info:
        load_file(path, **kwargs)
    return str(info.value)


def assert_message(message: str, path, *parts: str) -> None:
    assert path.name in message, message
    for part in parts:
        assert part in message, f"{part!r} not in:\n{message}"


# --------------------------------------------------------------------------- happy paths


def test_ml_100k(tmp_path):
    data = load_file(write(tmp_path, "u.data", ML_100K))
    assert data.name == "u.data"
    assert (data.n_users, data.n_items, len(data)) == (2, 3, 3)
    assert data.user_ids.tolist() == [186, 196]
    assert data.item_ids.tolist() == [242, 302, 377]
    assert data.user_ids[data.user].tolist() == [196, 186, 196]
    assert data.item_ids[data.item].tolist() == [242, 302, 377]
    assert data.timestamp.tolist() == [881250949, 891717742, 878887116]
    assert data.rating.tolist() == [3.0, 3.0, 1.0]
    assert data.user.dtype == np.int64 and data.timestamp.dtype == np.int64


def test_ml_1m(tmp_path):
    data = load_file(write(tmp_path, "ratings.dat", ML_1M))
    assert (data.n_users, data.n_items, len(data)) == (2, 2, 3)
    assert data.user_ids.tolist() == [1, 2]
    assert data.item_ids.tolist() == [661, 1193]
    assert data.user_ids[data.user].tolist() == [1, 1, 2]
    assert data.item_ids[data.item].tolist() == [1193, 661, 1193]
    assert data.timestamp.tolist() == [978300760, 978302109, 978300000]
    assert data.rating.tolist() == [5.0, 3.5, 4.0]


def test_ml_latest(tmp_path):
    data = load_file(write(tmp_path, "ratings.csv", ML_LATEST))
    assert (data.n_users, data.n_items, len(data)) == (2, 2, 3)
    assert data.user_ids.tolist() == [1, 7]
    assert data.item_ids.tolist() == [31, 1029]
    assert data.item_ids[data.item].tolist() == [31, 1029, 31]
    assert data.timestamp.tolist() == [1260759144, 1260759179, 1260759200]
    assert data.rating.tolist() == [2.5, 3.0, 4.5]


def test_generic_csv_string_ids_any_order_extra_columns(tmp_path):
    data = load_file(write(tmp_path, "events.csv", GENERIC))
    assert (data.n_users, data.n_items, len(data)) == (2, 2, 3)
    assert data.user_ids.tolist() == ["alice", "bob"]
    assert data.item_ids.tolist() == ["book", "film"]
    assert data.user_ids[data.user].tolist() == ["alice", "bob", "bob"]
    assert data.item_ids[data.item].tolist() == ["book", "film", "book"]
    assert data.timestamp is None and data.rating is None


def test_generic_csv_with_timestamp_and_rating(tmp_path):
    text = "rating,timestamp,user,item\n4.5,100,10,20\n2,50,11,20\n"
    data = load_file(write(tmp_path, "g.csv", text))
    assert data.user_ids.tolist() == [10, 11]  # all-integer ids stay integers
    assert data.user_ids.dtype.kind == "i"
    assert data.timestamp.tolist() == [100, 50]
    assert data.rating.tolist() == [4.5, 2.0]


def test_generic_csv_mixed_and_float_like_ids_are_text(tmp_path):
    data = load_file(write(tmp_path, "g.csv", "user,item\n1,a\nx,2.5\n"))
    assert data.user_ids.tolist() == ["1", "x"]
    assert data.item_ids.tolist() == ["2.5", "a"]
    data = load_file(write(tmp_path, "h.csv", "user,item\n1.5,1\n2,1\n"))
    assert data.user_ids.tolist() == ["1.5", "2"]


def test_blank_lines_crlf_bom_and_trailing_separators_are_fine(tmp_path):
    text = "\ufeff\r\n196\t242\t3\t881250949\t\r\n\r\n186\t302\t3\t891717742\r\n"
    data = load_file(write(tmp_path, "u.data", text))
    assert data.timestamp.tolist() == [881250949, 891717742]
    data = load_file(write(tmp_path, "r.dat", "1::2::3::4::\n\n5::6::7::8::\n"))
    assert data.user_ids.tolist() == [1, 5]
    data = load_file(write(tmp_path, "g.csv", "\n User , Item ,\n a, b,\n c, d\n"))
    assert data.user_ids.tolist() == ["a", "c"]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "text, expected",
    [
        (ML_100K, "ml-100k"),
        (ML_1M, "ml-1m"),
        (ML_LATEST, "ml-latest"),
        (GENERIC, "csv"),
        ("\n\nuser,item\n1,2\n", "csv"),
    ],
)
def test_detect_format(tmp_path, text, expected):
    assert detect_format(write(tmp_path, "f.txt", text)) == expected


def test_format_override(tmp_path):
    # Both column sets: detection says csv (user, item); ml-latest reads userId, movieId.
    text = "user,item,userId,movieId,rating,timestamp\na,b,1,2,3.5,10\n"
    path = write(tmp_path, "both.csv", text)
    assert detect_format(path) == "csv"
    as_csv = load_file(path)
    assert as_csv.user_ids.tolist() == ["a"] and as_csv.item_ids.tolist() == ["b"]
    assert as_csv.rating.tolist() == [3.5] and as_csv.timestamp.tolist() == [10]
    as_latest = load_file(path, format="ml-latest")
    assert as_latest.user_ids.tolist() == [1] and as_latest.item_ids.tolist() == [2]


def test_format_override_wins_over_detection(tmp_path):
    path = write(tmp_path, "ratings.csv", ML_LATEST)
    message = error_of(path, format="csv")
    assert_message(message, path, "line 1", "missing: user, item", "--format ml-latest")


def test_unknown_format(tmp_path):
    path = write(tmp_path, "u.data", ML_100K)
    message = error_of(path, format="movielens")
    assert_message(message, path, "'movielens'", *FORMATS)


def test_undetectable_format(tmp_path):
    path = write(tmp_path, "mystery.txt", "hello world\n1 2 3\n")
    with pytest.raises(DataFormatError) as info:
        detect_format(path)
    message = str(info.value)
    assert_message(message, path, "line 1", "'hello world'", "--format", *FORMATS)
    assert "tab-separated" in message and "::" in message and "userId,movieId" in message
    assert str(info.value) == error_of(path)


def test_undetectable_headerless_csv_says_add_a_header(tmp_path):
    path = write(tmp_path, "data.csv", "\n1,2,3,4\n")
    assert_message(error_of(path), path, "line 2", "without a header", "user,item")


def test_undetectable_header_names_its_columns(tmp_path):
    path = write(tmp_path, "data.csv", "usr,itm\n1,2\n")
    assert_message(error_of(path), path, "line 1", "'usr', 'itm'", "rename the columns")


# --------------------------------------------------------------------------- thresholds


def test_rating_threshold_drops_and_warns(tmp_path):
    path = write(tmp_path, "u.data", ML_100K)
    with pytest.warns(DataWarning, match=r"u\.data: dropped 1 of 3 rows"):
        data = load_file(path, rating_threshold=3)
    assert len(data) == 2
    assert data.rating.min() >= 3
    assert data.item_ids.tolist() == [242, 302]  # item 377 only had a rating of 1


def test_no_warning_without_dropped_rows(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_file(write(tmp_path, "ratings.dat", ML_1M), rating_threshold=1)


def test_duplicates_are_merged_with_a_warning(tmp_path):
    path = write(tmp_path, "ratings.dat", ML_1M + "1::1193::2::978309999\n")
    with pytest.warns(DataWarning, match="merged 1 repeated"):
        data = load_file(path)
    assert len(data) == 3
    assert sorted(data.timestamp.tolist()) == [978300000, 978302109, 978309999]


def test_rating_threshold_without_ratings(tmp_path):
    path = write(tmp_path, "events.csv", GENERIC)
    assert_message(error_of(path, rating_threshold=4), path, "no rating column", "drop the threshold")


# --------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such file.*Check the path"):
        load_file(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        detect_format(path)


def test_folder_instead_of_file(tmp_path):
    write(tmp_path, "ratings.dat", ML_1M)
    with pytest.raises(IsADirectoryError, match=r"ratings\.dat"):
        load_file(tmp_path)


@pytest.mark.parametrize("text, what", [("", "empty"), ("\n  \n\t\n", "only blank lines")])
def test_empty_file(tmp_path, text, what):
    path = write(tmp_path, "ratings.csv", text)
    assert_message(error_of(path), path, what, "downloaded or extracted completely")
    assert_message(error_of(path, format="ml-1m"), path, what)


def test_compressed_file(tmp_path):
    path = tmp_path / "ratings.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(ML_LATEST)
    assert_message(error_of(path), path, "gzip", "decompress")


@pytest.mark.parametrize("fmt", ["csv", "ml-latest", None])
def test_header_only(tmp_path, fmt):
    header = "user,item\n" if fmt != "ml-latest" else ML_LATEST.splitlines()[0] + "\n\n"
    path = write(tmp_path, "ratings.csv", "\n" + header)
    assert_message(error_of(path, format=fmt), path, "line 2", "no data rows", "Add the interaction rows")


@pytest.mark.parametrize("header, missing", [("user,rating", "item"), ("id,item,timestamp", "user")])
def test_csv_missing_column(tmp_path, header, missing):
    path = write(tmp_path, "g.csv", header + "\n1,2,3\n")
    message = error_of(path, format="csv")
    found = ", ".join(repr(name) for name in header.split(","))
    assert_message(message, path, "line 1", found, f"missing: {missing}", "Rename the header")


def test_csv_header_that_is_data(tmp_path):
    path = write(tmp_path, "g.csv", "1,2,3\n4,5,6\n")
    assert_message(error_of(path, format="csv"), path, "line 1", "looks like data", "add a header line")


def test_ml_latest_missing_column(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating\n1,2,3\n")
    message = error_of(path, format="ml-latest")
    assert_message(message, path, "line 1", "missing: timestamp", "--format csv")


def test_not_utf8(tmp_path):
    path = tmp_path / "g.csv"
    path.write_bytes("user,item\nalice,caf\xe9\n".encode("latin-1"))
    assert_message(error_of(path), path, "line 2", "not UTF-8", "Re-encode")


# --------------------------------------------------------------------------- bad lines


@pytest.mark.parametrize(
    "name, text, fmt, line, parts",
    [
        # wrong number of fields
        ("u.data", ML_100K + "1\t2\t3\n", None, 4, ["3 fields where ml-100k needs 4", "'1\\t2\\t3'"]),
        ("u.data", "1\t2\t3\t4\n\n1\t2\t3\t4\t5\n", None, 3, ["5 fields where ml-100k needs 4"]),
        ("r.dat", ML_1M + "\n1::2::3\n", None, 5, ["3 fields where ml-1m needs 4"]),
        ("r.dat", ML_1M + "1::2::3::4::5\n", None, 4, ["5 fields where ml-1m needs 4"]),
        ("r.dat", "1::2::3::4\n1:2:3:4:5:6:7\n", None, 2, ["1 field where ml-1m needs 4"]),
        ("g.csv", "user,item\n1,2\n3,4,5\n", None, 3, ["3 fields but the header (line 1) has 2"]),
        ("g.csv", "user,x,item\n1,2,3\n3,4\n", None, 3, ["2 fields but the header (line 1) has 3"]),
        # non-numeric values and non-integer MovieLens ids
        ("u.data", ML_100K + "1\t2\tgood\t4\n", None, 4, ["rating 'good' is not a number"]),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\tyesterday\n", None, 2, ["timestamp 'yesterday'", "whole number of seconds"]),
        ("r.dat", "1::2::3::4\n1::2.5::3::4\n", None, 2, ["item id '2.5' is not an integer"]),
        ("r.dat", "1::2::3::4\nabc::2::3::4\n", None, 2, ["user id 'abc' is not an integer"]),
        ("r.dat", "1::2::3::4\n1::2::nan::4\n", None, 2, ["rating 'nan' is not a number"]),
        ("r.dat", "1::2::3::99999999999999999999\n", None, 1, ["does not fit in 64 bits"]),
        ("ratings.csv", ML_LATEST + "u1,31,2.5,1260759144\n", None, 5, ["user id 'u1' is not an integer"]),
        ("ratings.csv", ML_LATEST + "1,31,,1260759144\n", None, 5, ["rating '' is not a number"]),
        ("g.csv", "user,item,rating\na,b,1\nc,d,NA\n", None, 3, ["rating 'NA' is not a number"]),
        ("g.csv", "user,item,timestamp\na,b,1\nc,d,2020-01-01\n", None, 3, ["timestamp '2020-01-01'"]),
        ("g.csv", "user,item,timestamp\na,b,1\nc,d,1.5\n", None, 3, ["timestamp '1.5'"]),
        ("g.csv", "user,item\na,b\n,d\n", None, 3, ["the user id is empty"]),
    ],
)
def test_bad_line(tmp_path, name, text, fmt, line, parts):
    path = write(tmp_path, name, text)
    message = error_of(path, format=fmt)
    assert_message(message, path, f"line {line}:", "Fix or delete line", *parts)


def test_bad_line_content_is_truncated(tmp_path):
    path = write(tmp_path, "u.data", "1\t2\t3\t4\n1\t2\t3\t" + "9" * 50 + "x" * 500 + "\n")
    message = error_of(path)
    assert_message(message, path, "line 2:", "...")
    assert "x" * 200 not in message


def test_first_bad_line_is_reported(tmp_path):
    rows = [f"{u}\t{u + 1}\t3\t{1000 + u}" for u in range(200)]
    rows[150] = "150\t151\tthree\t1150"
    rows[170] = "170\t171"
    path = write(tmp_path, "u.data", "\n".join(rows) + "\n")
    assert_message(error_of(path), path, "line 151:", "'three'")


# --------------------------------------------------------------------------- wrong separators


@pytest.mark.parametrize(
    "name, text, fmt, parts",
    [
        ("u.data", "1,2,3,4\n", "ml-100k", ["1 field where ml-100k needs 4", "seems to use commas", "header"]),
        ("u.data", ML_LATEST, "ml-100k", ["seems to use commas", "try --format ml-latest"]),
        ("u.data", ML_1M, "ml-100k", ["seems to use '::'", "try --format ml-1m"]),
        ("r.dat", ML_100K, "ml-1m", ["seems to use tabs", "try --format ml-100k"]),
        ("g.csv", "user\titem\n1\t2\n", "csv", ["seems to use tabs", "comma-separated", "--format csv"]),
        ("g.csv", ML_100K, "csv", ["seems to use tabs", "try --format ml-100k"]),
        ("g.csv", ML_1M, "ml-latest", ["seems to use '::'", "try --format ml-1m"]),
        ("g.csv", "user;item\n1;2\n", "csv", ["seems to use semicolons", "comma-separated"]),
        ("g.csv", "user;item\n1;2\n", None, ["seems to use semicolons", "comma-separated"]),
        ("g.csv", "user\titem\n1\t2\n", None, ["seems to use tabs", "--format csv"]),
    ],
)
def test_wrong_separator(tmp_path, name, text, fmt, parts):
    path = write(tmp_path, name, text)
    assert_message(error_of(path, format=fmt), path, "line 1", *parts)


def test_wrong_separator_on_a_later_line(tmp_path):
    path = write(tmp_path, "g.csv", "user,item\na,b\nc;d\n")
    assert_message(error_of(path), path, "line 3:", "1 field but the header", "seems to use semicolons")
