"""Row formats (messages, prompt_completion, ShareGPT, Alpaca) and file kinds (JSONL, .json
arrays, Parquet, CSV/TSV, save_to_disk folders) all become the same training examples."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.data.preprocess import preprocess
from trainer_core.data.rows import RowFormat, read_rows, read_rows_cached
from trainer_core.data.tokenizer import load_tokenizer
from trainer_core.errors import UserError
from trainer_core.plugins.profile import PlainSFT

#: Single-turn conversations (user, assistant; the first with a system prompt): every format
#: can say them. The third user turn has a second line: Alpaca's instruction + input.
SIMPLE = [
    [("user", "What is 2 + 3?"), ("assistant", "5")],
    [("user", "Name a colour, with \"quotes\", commas, and ünïcode 🎨"), ("assistant", "Teal, say.")],
    [("user", "Translate to French:\ngood morning"), ("assistant", "bonjour")],
]
#: Multi-turn conversations with system prompts: messages and ShareGPT can say them.
RICH = [
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "And?"),
     ("assistant", "That is all.")],
    [("user", "Count to three"), ("assistant", "1, 2,\n3")],
]


def as_messages(conv) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in conv], "id": "x"}


def as_sharegpt(conv) -> dict[str, Any]:
    names = {"user": "human", "assistant": "gpt"}
    turns = [{"from": names[r], "value": c} for r, c in conv if r != "system"]
    system = [c for r, c in conv if r == "system"]
    return {"conversations": turns, **({"system": system[0]} if system else {}), "id": "x"}


def as_alpaca(conv) -> dict[str, Any]:
    (_, user), (_, answer) = conv
    instruction, _, extra = user.partition("\n")
    return {"instruction": instruction, "input": extra, "output": answer}


def as_prompt_completion(conv) -> dict[str, Any]:
    (_, user), (_, answer) = conv
    return {"prompt": user, "completion": answer}


FORMATS = {"messages": as_messages, "sharegpt": as_sharegpt, "alpaca": as_alpaca,
           "prompt_completion": as_prompt_completion}
LIST_COLUMNS = {"messages": "messages", "sharegpt": "conversations"}


def write(kind: str, records: list[dict[str, Any]], folder: Path, name: str = "data") -> Path:
    """Records as a file (or save_to_disk folder) of ``kind``."""
    if kind == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                        encoding="utf-8")
    elif kind == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind in ("csv", "tsv"):
        path = folder / f"{name}.{kind}"
        header = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", encoding="utf-8", newline="") as fh:
            out = csv.writer(fh, delimiter="\t" if kind == "tsv" else ",")
            out.writerow(header)
            for r in records:  # lists (messages) as JSON text, as exports write them
                out.writerow([json.dumps(r[k], ensure_ascii=False) if isinstance(r.get(k), list)
                              else r.get(k, "") for k in header])
    else:
        path = write_save_to_disk(pa.Table.from_pylist(records), folder / name)
    return path


def write_save_to_disk(table: pa.Table, folder: Path, shards: int = 2) -> Path:
    """The layout ``datasets.Dataset.save_to_disk`` writes (datasets 2.x-4.x): Arrow IPC
    stream shards named ``data-0000i-of-0000n.arrow``, listed in ``state.json``."""
    folder.mkdir()
    n = table.num_rows
    bounds = [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]
    names = []
    for i, (a, b) in enumerate(bounds):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.ipc.new_stream(folder / name, table.schema) as writer:
            writer.write_table(table.slice(a, b - a))
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({
        "_data_files": names, "_fingerprint": "0123456789abcdef", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "",
                                                          "features": {}}), encoding="utf-8")
    return folder


KINDS = ["jsonl", "json", "parquet", "csv", "tsv", "arrow"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def encoded(rows, tok, cache: Path) -> tuple[bytes, bytes, bytes]:
    ds, stats = preprocess(rows, PlainSFT(), tok, "chatml", 512, 0, False, cache,
                           use_cache=False, workers=1)
    assert stats.rows_kept == len(rows)
    return ds.input_ids.tobytes(), ds.trained.tobytes(), ds.offsets.tobytes()


def reference(convs, tok, tmp_path) -> tuple[bytes, bytes, bytes]:
    path = write("jsonl", [as_messages(c) for c in convs], tmp_path, "reference")
    rows, problems = read_rows(str(path))
    assert not problems
    return encoded(rows, tok, tmp_path / "c")


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_in_every_kind_gives_the_same_tokens(kind, tok, tmp_path):
    expected = reference(SIMPLE, tok, tmp_path)
    for name, convert in FORMATS.items():
        folder = tmp_path / name
        folder.mkdir()
        path = write(kind, [convert(c) for c in SIMPLE], folder)
        for fmt in (RowFormat(), RowFormat.of(name)):  # detected, and named
            rows, problems = read_rows(str(path), fmt)
            assert not problems, (name, fmt, [str(p) for p in problems])
            assert encoded(rows, tok, tmp_path / "c") == expected, (kind, name, fmt)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_turn_with_system_in_every_kind(kind, tok, tmp_path):
    expected = reference(RICH, tok, tmp_path)
    for name in ("messages", "sharegpt"):
        folder = tmp_path / name
        folder.mkdir()
        path = write(kind, [FORMATS[name](c) for c in RICH], folder)
        rows, problems = read_rows(str(path))
        assert not problems, [str(p) for p in problems]
        assert encoded(rows, tok, tmp_path / "c") == expected, (kind, name)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "arrow"])
def test_cached_rows_are_the_rows(kind, tmp_path):
    """The second read comes from the rows cache (read back lazily) and gives equal rows."""
    records = [as_sharegpt(c) for c in RICH]
    records.insert(1, {"conversations": [{"from": "human", "value": "q"},
                                         {"from": "robot", "value": "a"}]})
    path = str(write(kind, records, tmp_path))
    first, problems = read_rows_cached(path, tmp_path / "cache")
    again, problems_again = read_rows_cached(path, tmp_path / "cache")
    assert again._items is None  # really from the cache
    assert list(again) == list(first) == read_rows(path)[0]
    assert [str(p) for p in problems_again] == [str(p) for p in problems]
    assert len(problems) == 1 and "robot" in str(problems[0])
    assert again.digest == first.digest
    # Another row format is another identity (preprocessing keys on it).
    other, _ = read_rows_cached(path, tmp_path / "cache", RowFormat.of(
        "sharegpt", roles={"robot": "assistant"}))
    assert other.digest != first.digest and len(other) == 3


def test_columns_and_roles_mapping(tok, tmp_path):
    expected = reference(RICH, tok, tmp_path)
    records = [{"dialog": [{"speaker": {"user": "person", "assistant": "bot"}.get(r, r),
                            "text": c} for r, c in conv]} for conv in RICH]
    path = str(write("parquet", records, tmp_path))
    fmt = RowFormat.of("messages", columns={"messages": "dialog", "role": "speaker",
                                            "content": "text"},
                       roles={"person": "user", "bot": "assistant"})
    rows, problems = read_rows(path, fmt)
    assert not problems
    assert encoded(rows, tok, tmp_path / "c") == expected


def test_mapping_error_names_the_missing_column(tmp_path):
    path = str(write("jsonl", [as_sharegpt(c) for c in RICH], tmp_path))
    fmt = RowFormat.of("messages", columns={"messages": "dialog"})
    rows, problems = read_rows(path, fmt)
    assert not rows
    assert str(problems[0]) == (f"{path}:1: dialog: missing (data.format messages reads column "
                                "'dialog'; map another with data.columns.messages)")
    # A column inside the turns: named with its index, in the file's own words.
    fmt = RowFormat.of("sharegpt", columns={"content": "text"})
    _, problems = read_rows(path, fmt)
    assert str(problems[0]) == f"{path}:1: conversations[0].text: missing"
    # Through the CLI: exit 2, one problem a line, file and row index for Parquet.
    pq_path = str(write("parquet", [as_alpaca(c) for c in SIMPLE], tmp_path))
    result = CliRunner().invoke(cli, ["preview", "--dataset", pq_path, "--set",
                                      "data.format=alpaca", "--set",
                                      'data.columns={"completion": "answer"}'])
    assert result.exit_code == 2, result.output
    assert (f"{pq_path}: row index 0: answer: missing (data.format alpaca reads column "
            "'answer'; map another with data.columns.completion)") in result.stderr


@pytest.mark.parametrize("fmt, message", [
    ({"format": "auto", "columns": {"messages": "x"}}, "data.columns: set data.format too"),
    ({"format": "alpaca", "columns": {"role": "x"}}, "data.columns.role: not read by data.format "
                                                     "alpaca"),
])
def test_bad_mapping_options(fmt, message):
    with pytest.raises(UserError, match=message):
        RowFormat.of(fmt["format"], fmt["columns"])


#: One bad record per kind, and where it is reported.
BAD = {"jsonl": "{data}:2: ", "json": "{data}:15: ", "csv": "{data}:3: ", "tsv": "{data}:3: ",
       "parquet": "{data}: row index 1: ", "arrow": "{data}: row index 1: "}


@pytest.mark.parametrize("kind", KINDS)
def test_bad_rows_are_named_by_line_or_row_index(kind, tmp_path):
    records = [as_messages(c) for c in SIMPLE]
    records[1]["messages"][1]["role"] = "bot"
    path = str(write(kind, records, tmp_path))
    result = CliRunner().invoke(cli, ["preview", "--dataset", path, "-n", "1"])
    assert result.exit_code == 2, result.output
    where = BAD[kind].format(data=path)
    assert f'{where}messages[1].role: unknown role "bot"' in result.stderr, result.stderr
    assert "Traceback" not in result.output
    # skip: the two good rows are kept, with their own line or row index.
    rows, problems = read_rows(path)
    assert len(rows) == 2 and len(problems) == 1


def test_csv_rows_that_are_not_records(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,completion\n"a\nb",c\nonly one cell\n\nx,\xff\n')
    rows, problems = read_rows(str(path))
    assert [r["_line"] for r in rows] == [2]  # the quoted newline: the row starts on line 2
    assert [str(p) for p in problems] == [
        f"{path}:4: expected 2 cells (the header's), got 1",
        f"{path}:6: completion: lone surrogate \\udcff (not valid Unicode text)",
    ]


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": \n]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d.json:4:1: not valid JSON"):
        read_rows(str(path))
    # JSON Lines under a .json name is read as JSONL.
    path.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    assert read_rows(str(path))[0][0]["_line"] == 1


def test_folders_that_are_not_save_to_disk(tmp_path):
    result = CliRunner().invoke(cli, ["preview", "--dataset", str(tmp_path)])
    assert result.exit_code == 2 and "not one written by datasets' save_to_disk" in result.stderr
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    result = CliRunner().invoke(cli, ["preview", "--dataset", str(tmp_path)])
    assert result.exit_code == 2
    assert f"a DatasetDict with splits train, test; give one split's folder, e.g. " \
           f"{tmp_path / 'train'}" in result.stderr


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = str(write("parquet", [as_messages(c) for c in SIMPLE], tmp_path))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    result = CliRunner().invoke(cli, ["preview", "--dataset", path])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: reading Parquet or Arrow data needs pyarrow: "
                                     "pip install 'trainer-core[parquet]'")


def test_preview_names_the_row_index(tmp_path):
    path = str(write("parquet", [as_messages(c) for c in SIMPLE], tmp_path))
    result = CliRunner().invoke(cli, ["preview", "--dataset", path, "-n", "2", "--no-color",
                                      "--set", "data.validation_split=0"])
    assert result.exit_code == 0, result.output
    assert "=== example 2 (row index 1) ===" in result.stdout


def test_a_run_on_sharegpt_parquet_trains_like_the_jsonl(micro_model_dir, sample_rows, tmp_path):
    """The whole path (trainer run): the same rows as ShareGPT Parquet and as messages JSONL
    train to the same losses."""
    convs = [[(m["role"], m["content"]) for m in r["messages"]] for r in sample_rows[:16]]
    convs = [c for c in convs if [r for r, _ in c if r != "system"] == ["user", "assistant"]]
    jsonl = write("jsonl", [as_messages(c) for c in convs], tmp_path, "a")
    parquet = write("parquet", [as_sharegpt(c) for c in convs], tmp_path, "b")
    losses = []
    for data in (jsonl, parquet):
        result = CliRunner().invoke(cli, [
            "run", "--model", str(micro_model_dir), "--dataset", str(data), "--output-dir",
            str(tmp_path / f"out-{data.suffix[1:]}"), "--batch-size", "4", "--max-steps", "2", "--quiet",
            "--json", "--set", "data.validation_split=0", "--set", "hyperparams.eval_steps=0",
            "--set", "monitoring.num_preview_samples=0"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        losses.append((summary["loss_start"], summary["loss_end"], summary["tokens_trained"],
                       summary["steps_done"]))
    assert losses[0] == losses[1] and losses[0][3] == 2
