"""Dataset rows: which fields hold what, and the example key that links a row to the teacher store.

A row is plain text (a `text` column), a chat (a `messages` column of `{role, content}` dicts), or a
single exchange (`user` + `assistant` columns, read as a two-message chat). `RowFormat` names the
columns and owns the rules that read them, for `xtok extract` (which writes the store) and for the
collator (which looks rows up in it), so the two always agree on:

* the *content* of a row: the part the teacher reads (the messages list, the text string, or the
  `{"user", "assistant"}` fields), and its canonical serialisation `content_json`;
* the *example key*: `str(row[key_column])` when a key column is set, else the `id` or `key` column
  when present and not None, else `content_key(content_json(content))` (sha256 hex). The collator
  finds a row's teacher example by this key; `xtok extract`'s dataset fingerprint hashes the same
  serialisation.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["RowFormat", "example_key", "content_json", "content_key", "ID_COLUMNS"]

ID_COLUMNS = ("id", "key")  # columns that key a row when no key column is set


def content_json(content: Any, default=None) -> str:
    """The text a row's content is hashed as (example key; `xtok extract`'s dataset fingerprint): a
    string as itself, else JSON with sorted keys and ensure_ascii=False. `default` as in json.dumps
    (None: a value JSON cannot hold raises TypeError)."""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, sort_keys=True,
                                                               default=default)


def content_key(blob: str) -> str:
    """The key of a row keyed by its content: sha256 (hex) of the UTF-8 of its `content_json`."""
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RowFormat:
    """The columns of a dataset's rows. `text_column` / `messages_column`: where plain text and chat
    messages are (a row uses the messages when they are not None, else the text, else `user` +
    `assistant` columns); `key_column`: the column holding the example key (None: the `id`/`key`
    column when present and not None, else a content hash)."""

    text_column: str | None = "text"
    messages_column: str | None = "messages"
    key_column: str | None = None

    # -- what the row holds (a column set to None is never read) ---------------------------------
    def _get(self, row: Mapping, column: str | None):
        return row.get(column) if column is not None else None

    def is_chat(self, row: Mapping) -> bool:
        return self._get(row, self.messages_column) is not None or (
            self._get(row, self.text_column) is None and "user" in row and "assistant" in row)

    def content(self, row: Mapping) -> Any:
        """The part of the row the teacher reads: the messages list, else the text string, else the
        {"user", "assistant"} fields (those present)."""
        msgs = self._get(row, self.messages_column)
        if msgs is not None:
            return msgs
        text = self._get(row, self.text_column)
        if text is not None:
            return text
        return {c: row.get(c) for c in ("user", "assistant") if c in row}

    def messages(self, row: Mapping) -> list[dict] | None:
        """The row's chat messages with None-valued fields dropped (a `user`/`assistant` row becomes
        two messages), or None for a text row."""
        msgs = self._get(row, self.messages_column)
        if msgs is None:
            if self._get(row, self.text_column) is not None or not ("user" in row and "assistant" in row):
                return None
            msgs = [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        return [{k: v for k, v in m.items() if v is not None} for m in msgs]

    def text(self, row: Mapping) -> str | None:
        v = self._get(row, self.text_column)
        return v if isinstance(v, str) else None

    # -- the example key --------------------------------------------------------------------------
    def explicit_key(self, row: Mapping) -> str | None:
        """The key a key column (or an `id`/`key` column) gives the row, None when it is keyed by its
        content. KeyError when the configured key column is missing or None."""
        if self.key_column is not None:
            if self.key_column not in row or row[self.key_column] is None:
                raise KeyError(f"key column {self.key_column!r} missing in row")
            return str(row[self.key_column])
        for c in ID_COLUMNS:
            if c in row and row[c] is not None:
                return str(row[c])
        return None

    def key_and_blob(self, row: Mapping) -> tuple[str, str | None]:
        """(example key, the content_json it hashed or None when the key came from a column)."""
        k = self.explicit_key(row)
        if k is not None:
            return k, None
        blob = content_json(self.content(row))
        return content_key(blob), blob

    def key(self, row: Mapping) -> str:
        """The row's example key (module doc)."""
        return self.key_and_blob(row)[0]


def example_key(row: Mapping, key_column: str | None = None, *, text_column: str = "text",
                messages_column: str = "messages") -> str:
    """The example key of a dataset row (see the module doc; `RowFormat.key`)."""
    return RowFormat(text_column, messages_column, key_column).key(row)
