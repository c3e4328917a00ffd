"""Files written whole or not at all: the one home of the write-then-rename that every small file
of data_prep and ssl_us goes through (reports, configs, index caches, plots, previews).

A reader never sees a half-written file: the content goes to a temporary name beside the target,
is fsync'ed, and is renamed over the target only when complete; an error deletes it. The
temporary name is hidden (a leading '.'), so folder scans and globs of the target's kind do not
pick it up, and unique (a random part), so processes on several hosts writing one path of a
shared folder never write into each other's file. Standard library only: the training process
imports it on hosts without data_prep's dependencies.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """A temporary path to write ``path``'s content to; renamed to ``path`` when the block ends,
  deleted if it raises. ``suffix`` ends the temporary name, for writers that choose the format
  by the extension (``'.npz'`` for np.savez, ``'.png'`` for matplotlib)."""
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp{suffix}")
  try:
    yield tmp
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str, mode: int | None = None, newline: str | None = None):
  """``text`` to ``path``, atomically; ``mode`` (e.g. 0o600) is set before the first byte."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline=newline) as f:
      if mode is not None:
        os.fchmod(f.fileno(), mode)
      f.write(text)


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """``obj`` as JSON to ``path``, atomically (indented by 1, UTF-8 as it is, unless told)."""
  write_text(path, json.dumps(obj, **{"indent": 1, "ensure_ascii": False, **dump_kwargs}))
