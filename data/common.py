"""data/common.py: what every task shares: the Record and Expert dataclasses, file reading with
errors that say what to do, and the download helper.

Choices:
- A **Record** is one question with its gold answer and the reference traces its experts have for
  it. `answer` is already in the form verify.py compares against (GSM8K `72`, MathQA `(c) 625`,
  StrategyQA `yes`), so `verify.reward(task, record.traces[e], record.answer) == 1.0` for every
  trace.
- `traces` holds only the experts whose style could be built for this record (e.g. a GSM8K solution
  without `<<a*b=c>>` annotations has no equation chain). Where a trace is missing, consumers fall
  back to the first expert's trace (METHOD.md 4(e): "else the dataset rationale"); see
  `reference_trace`.
- An **Expert** is `(name, system_prompt, source)` as in METHOD.md section 2. `source` says where
  its stage-1 traces come from: "gold" (built from the dataset, the default), "file" (teacher JSONL)
  or "self" (rejection-sampled from a model); data/traces.py implements the last two.
- Files live in `data_dir/<task>/<file>`, with `data_dir` defaulting to this package's folder (the
  `data/<task>/` folders are gitignored). The layout is the one of ../shared/data, so tests point
  `data_dir` there. A missing file raises MissingDataError naming the file, its source and the
  exact command that fetches it; a malformed one raises DataError with file and line (or record
  index). Both are UserErrors (errors.py): the command line prints their message alone, without a
  traceback.
"""

import hashlib
import json
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass, field

from plumbing.errors import UserError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Record:
    id: str
    question: str  # the user turn, self-contained (MathQA includes its options)
    answer: str  # gold final answer, in verify.py's form for the task
    traces: dict[str, str] = field(default_factory=dict)  # expert name -> reference trace
    meta: dict = field(default_factory=dict)  # task extras: options, category, difficulty, ...


@dataclass(frozen=True)
class Expert:
    name: str
    system_prompt: str
    source: str = "gold"  # "gold" | "file" | "self" (METHOD.md section 2)
    description: str = ""  # one line for people and logs, never shown to the model


def reference_trace(record: Record, expert: str, fallback: str) -> str | None:
    """The expert's own trace, else the fallback expert's (usually the dataset rationale), else
    None."""
    return record.traces.get(expert, record.traces.get(fallback))


class DataError(UserError):
    """A data file exists but a line or record in it is malformed."""


class MissingDataError(UserError, FileNotFoundError):
    """A data file is not where it should be; the message says how to get it."""


@dataclass(frozen=True)
class Source:
    """Where one file of a task comes from: a plain URL, or a member of a zip archive."""

    file: str  # name inside data_dir/<task>/
    url: str
    sha256: str | None = None  # of the file itself (not of the zip); checked after download
    zip_member: str | None = None  # basename inside the archive at `url`
    what: str = ""


def resolve_dir(data_dir: str | None) -> str:
    return os.path.abspath(data_dir) if data_dir else PACKAGE_DIR


def require(task: str, source: Source, data_dir: str | None) -> str:
    """Path of a task's file, or MissingDataError with the command that downloads it."""
    root = resolve_dir(data_dir)
    path = os.path.join(root, task, source.file)
    if os.path.isfile(path):
        return path
    command = f"python -m data download {task} --data-dir {root}"
    if source.zip_member is None:
        manual = f"mkdir -p {os.path.dirname(path)} && curl -L -o {path} {source.url}"
    else:
        manual = (f"curl -L -o /tmp/{task}.zip {source.url} && unzip -j -o /tmp/{task}.zip "
                  f"'*{source.zip_member}' -x '__MACOSX/*' -d {os.path.dirname(path)}")
    raise MissingDataError(
        f"missing data file {path}\n"
        f"  it is {source.what or source.file}, from {source.url}\n"
        f"  download it (from the project root) with:\n    {command}\n"
        f"  or by hand:\n    {manual}"
    )


def read_jsonl(path: str, keys: tuple[str, ...], check=None,
               types: dict | None = None, empty_ok=False) -> list[dict]:
    """One JSON object per non-empty line, each with all `keys` (of the given `types`); errors name
    file:line, and a file with no record at all is an error too unless empty_ok (it would fail much
    later, as a division by zero). check(row, where), when given, replaces the key check (it raises
    DataError itself)."""
    check = check or (lambda row, where: _check_keys(row, keys, where, types))
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text "
                                f"(byte {raw[e.start]:#04x} at column {e.start + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            check(row, f"{path}:{lineno}")
            rows.append(row)
    if not rows and not empty_ok:
        raise DataError(f"{path}: holds no records (an empty file?)")
    return rows


def read_json_array(path: str, keys: tuple[str, ...], types: dict | None = None) -> list[dict]:
    """A file holding one JSON array of objects, each with all `keys` (of the given `types`);
    errors name file:line or [index]."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: holds no records (an empty array)")
    for i, row in enumerate(rows):
        _check_keys(row, keys, f"{path}: record [{i}]", types)
    return rows


def _check_keys(row, keys: tuple[str, ...], where: str, types: dict | None = None) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    for key, kind in (types or {}).items():
        if key in row and not isinstance(row[key], kind):
            want = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise DataError(f"{where}: field {key!r} should be {want}, "
                            f"got {type(row[key]).__name__} {row[key]!r:.40}")


def download(task: str, sources: list[Source], data_dir: str | None = None) -> list[str]:
    """Fetch a task's files into data_dir/<task>/ (skips files already there). For a user's machine:
    it needs internet access, which the tests never assume."""
    out_dir = os.path.join(resolve_dir(data_dir), task)
    os.makedirs(out_dir, exist_ok=True)
    archives: dict[str, str] = {}  # url -> local zip, fetched once for all its members
    paths = []
    for src in sources:
        path = os.path.join(out_dir, src.file)
        paths.append(path)
        if os.path.isfile(path):
            continue
        print(f"downloading {src.url} -> {path}", file=sys.stderr)
        if src.zip_member is None:
            _fetch(src.url, path)
        else:
            if src.url not in archives:
                archives[src.url] = os.path.join(out_dir, os.path.basename(src.url))
                _fetch(src.url, archives[src.url])
            _extract(archives[src.url], src.zip_member, path)
        _check_sha256(path, src.sha256)
    for archive in archives.values():
        os.remove(archive)
    return paths


def _fetch(url: str, path: str) -> None:
    tmp = path + ".part"  # never leave a half-written file under the final name
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
        shutil.copyfileobj(response, f)
    os.replace(tmp, path)


def _extract(archive: str, member: str, path: str) -> None:
    import zipfile

    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist()
                 if os.path.basename(n) == member and not n.startswith("__MACOSX")]
        if not names:
            raise MissingDataError(f"{member} not found in {archive}; members: {z.namelist()[:20]}")
        with z.open(names[0]) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _check_sha256(path: str, expected: str | None) -> None:
    if expected is None:
        return
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected:  # a warning, not an error: a re-release may differ from our tested copy
        print(f"warning: {path} has sha256 {digest}, the tested copy has {expected}",
              file=sys.stderr)
