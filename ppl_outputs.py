"""What the command line writes, checked before anything loads, and written so that a crash
never leaves half a file.

Every output path (`--json`, `--tokens-out`, `--words-out`, `--save-reference`, `--model-card`,
`--docs-out`) is refused when it is one of the inputs (the corpus, a file of a corpus folder,
the model's files, `--reference-file`), when two outputs name the same file, when its place
cannot hold it (a folder where a file is wanted, a file among its parent folders, a place
this process cannot write), and when the file exists (unless `--force`; never an input).
"""

import os
from pathlib import Path

__all__ = ["check_outputs", "atomic_write_text", "temporary_path", "card_file"]


def card_file(path):
    """The file `--model-card PATH` writes: PATH itself when it is a `.md` file, else PATH/README.md."""
    path = Path(path)
    return path if path.suffix.lower() == ".md" and not path.is_dir() else path / "README.md"


def temporary_path(path):
    """A hidden name beside `path`, unique to this process: renamed onto `path` when complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path, text):
    """Write `text` to `path` through a temporary file and a rename (all or nothing)."""
    tmp = temporary_path(path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _input_files(inputs):
    """{resolved path: what it is} for the inputs that are local files or folders, and the folders
    whose every file is read. An input is (label, path) — a file, or a folder read whole (a corpus)
    — or (label, folder, suffixes): a folder of which only the top-level files with those suffixes
    are read (a model: its weights, config and tokenizer, not its README.md)."""
    found, whole = {}, set()
    for label, value, *suffixes in inputs:
        if not value or not isinstance(value, (str, os.PathLike)) or not Path(value).exists():
            continue  # a Hub id, a datasets name
        path = Path(value).resolve()
        found[path] = label
        if path.is_dir():
            files = path.rglob("*") if not suffixes else (p for p in path.iterdir() if p.suffix.lower() in suffixes[0])
            for file in files:
                found.setdefault(file.resolve(), f"{label} (its file {file.relative_to(path)})")
            if not suffixes:
                whole.add(path)
    return found, whole


def _check_place(option, path, *, folder):
    """Refuse a place that cannot hold the output, naming the option."""
    if folder:
        if path.exists() and not path.is_dir():
            raise ValueError(f"Expected {option} to be a folder, but {str(path)!r} is a file.")
    elif path.is_dir():
        raise ValueError(f"Expected {option} to be a file, but {str(path)!r} is a folder.")
    parent = path if folder and path.is_dir() else path.parent  # an existing folder is written in, not beside
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"Cannot write {option} {str(path)!r}: {str(parent)!r} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write {option} {str(path)!r}: the folder {str(parent)!r} is not writable.")


def check_outputs(outputs, inputs, *, force=False):
    """Check every output before the model loads.

    Args:
        inputs: what the run reads: (label, path) or (label, folder, suffixes), see `_input_files`.
        force: let an existing "file" output be replaced (never an input).

    Raises:
        ValueError: naming the option and the path.
    """
    read, whole = _input_files(inputs)
    taken = {}
    for option, path, kind in outputs:
        if not path:
            continue
        path = Path(path)
        resolved = path.resolve()
        clash = read.get(resolved) or next((f"the folder of {read[p]}" for p in whole if resolved.is_relative_to(p)), None)
        if clash:
            raise ValueError(f"{option} {str(path)!r} is {clash}, an input of this run: give another path "
                             "(nothing this run reads is ever written).")
        if resolved in taken:
            raise ValueError(f"{taken[resolved]} and {option} name the same path {str(path)!r}: give each its own.")
        taken[resolved] = option
        _check_place(option, path, folder=kind == "folder")
        if kind in ("file", "keep") and path.exists() and not (force and kind == "file"):
            hint = ", or --force to replace it" if kind == "file" else ""
            raise ValueError(f"The {option} file {str(path)!r} exists: give a new path{hint} (nothing is overwritten "
                             "otherwise).")
