"""Dataset rows -> what the teacher reads. `RowRenderer` resolves a dataset's text / messages / key
columns, checks each row, gives its key fields and its content (for the example key and the dataset
fingerprint), and renders it to (text, token ids, target positions) with the tokenizer or a chat
template; `RenderedExample` is one rendered row of a shard.

The row rules themselves (a row's messages, content and example key) are `xtok.rows.RowFormat`'s,
the same the collator applies; this module resolves the dataset's columns into one and checks rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..chat import ChatFormatError, validate_messages
from ..rows import RowFormat
from .config import ExtractConfig, ExtractError


@dataclass
class RenderedExample:
    """One rendered dataset row: its index in the shard, key, text, token ids and target positions."""
    row: int
    key: str
    text: str
    ids: np.ndarray        # int64 [T]
    positions: np.ndarray  # int64 [P]


def _resolve_columns(cfg: ExtractConfig, columns: list[str]):
    """(messages column, ('user', 'assistant') or None; text column or None) of a dataset with these
    columns: the --messages-column / --text-column given, else 'messages', then 'text', then
    user+assistant; ExtractError for a column (or --key-column) the dataset lacks."""
    mc = cfg.messages_column
    tc = cfg.text_column
    if mc is None and tc is None:
        if "messages" in columns:
            mc = "messages"
        elif "text" in columns:
            tc = "text"
        elif "user" in columns and "assistant" in columns:
            mc = ("user", "assistant")
        else:
            raise ExtractError(f"--dataset {cfg.dataset}: no 'text', 'messages' or 'user'+'assistant' column "
                               f"(columns: {columns}). Pass --text-column or --messages-column.")
    for c in ([tc] if tc else []) + ([mc] if isinstance(mc, str) else list(mc or ())):
        if c not in columns:
            raise ExtractError(f"--dataset {cfg.dataset}: column {c!r} not found (columns: {columns}). "
                               "Pass the right --text-column / --messages-column.")
    if cfg.key_column and cfg.key_column not in columns:
        raise ExtractError(f"--dataset {cfg.dataset}: --key-column {cfg.key_column!r} not found (columns: {columns}).")
    return mc, tc


class RowRenderer:
    """The rows of one dataset (its `columns`) as `cfg` reads them, rendered with `tok`.

    Attributes: mc (messages column, ('user', 'assistant'), or None), tc (text column or None), chat,
    targets ('assistant' | 'all'), add_bos, template (a --chat-template's source or None) and
    template_source (the jinja source chat rows render with; hashed into the manifest)."""

    def __init__(self, tok, cfg: ExtractConfig, columns: list[str]):
        self.tok, self.cfg = tok, cfg
        self.mc, self.tc = _resolve_columns(cfg, columns)
        self.chat = self.mc is not None
        # the row rules (messages, content, example key): one owner, shared with the collator
        self.fmt = RowFormat(text_column=self.tc, messages_column=self.mc if isinstance(self.mc, str) else None,
                             key_column=cfg.key_column)
        self.targets = cfg.targets if cfg.targets != "auto" else ("assistant" if self.chat else "all")
        if self.targets not in ("assistant", "all"):
            raise ExtractError(f"--targets {cfg.targets}: expected assistant, all or auto.")
        if self.targets == "assistant" and not self.chat:
            raise ExtractError("--targets assistant needs a chat dataset (a messages or user+assistant column).")
        self.add_bos = (tok.bos_id is not None) if cfg.add_bos is None else cfg.add_bos
        self.template, self.template_source = self._chat_template()

    # -- row rules: columns, key fields, content, validity ----------------------------------------

    def key_columns(self, columns: list[str]) -> list[str]:
        """The columns the key rule and the row checks read (in dataset order)."""
        mc, tc, kc = self.mc, self.tc, self.cfg.key_column
        return [c for c in columns if c in (kc, "id", "key", tc)
                or (isinstance(mc, str) and c == mc) or (isinstance(mc, tuple) and c in mc)]

    def messages(self, row) -> Any:
        return self.fmt.messages(row)

    def key_and_blob(self, row) -> tuple[str, str | None]:
        """(the row's example key, the content_json it hashed or None when a key/id column gave it);
        KeyError when --key-column is missing or null in the row."""
        return self.fmt.key_and_blob(row)

    def content(self, row):
        """The part of a row that the teacher reads (what a content-hash key and the dataset
        fingerprint hash)."""
        return self.fmt.content(row)

    def bad_type(self, row) -> str | None:
        """None, or what is wrong with the types of the row's fields."""
        def what(v):
            return f"{type(v).__name__} ({v!r:.40})"

        if not self.chat:
            v = row[self.tc]
            return None if v is None or isinstance(v, str) else f"column {self.tc!r} holds {what(v)}, expected a string"
        if isinstance(self.mc, tuple):
            for c in self.mc:
                if row[c] is not None and not isinstance(row[c], str):
                    return f"column {c!r} holds {what(row[c])}, expected a string"
            return None
        msgs = row[self.mc]
        if msgs is None:
            return None
        if not isinstance(msgs, (list, tuple)):
            return f"column {self.mc!r} holds {what(msgs)}, expected a list of {{'role', 'content'}} messages"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"column {self.mc!r}, message {j}: expected an object with 'role' and 'content', got {what(m)}"
            if not isinstance(m["role"], str):
                return f"column {self.mc!r}, message {j}: 'role' holds {what(m['role'])}, expected a string"
            if m["content"] is not None and not isinstance(m["content"], str):
                return f"column {self.mc!r}, message {j}: 'content' holds {what(m['content'])}, expected a string"
        return None

    def bad_messages(self, row) -> str | None:
        """None, or why xtok.chat would refuse the messages `render` passes it (its own validation,
        e.g. a message whose content is None); for a row that passed bad_type and is not empty."""
        if not self.chat:
            return None
        try:
            validate_messages(self.messages(row))
        except ChatFormatError as e:
            return f"column {self.mc!r}: {str(e).rstrip('.')}"
        return None

    def is_empty(self, row) -> str | None:
        """None, or the name of the empty field."""
        if self.chat:
            if isinstance(self.mc, tuple):
                for c in self.mc:
                    if not row[c]:
                        return c
                return None
            msgs = row[self.mc]
            if not msgs:
                return self.mc
            return None
        return self.tc if not row[self.tc] else None

    # -- rendering --------------------------------------------------------------------------------

    def _chat_template(self) -> tuple[str | None, str | None]:
        """(the --chat-template's source or None, the jinja source chat rows render with or None)."""
        cfg, template, source = self.cfg, None, None
        if cfg.chat_template:
            from ..chat import load_template

            try:
                template = load_template(cfg.chat_template)
            except Exception as e:  # noqa: BLE001
                raise ExtractError(f"--chat-template {cfg.chat_template}: {e}") from e
            if not self.chat:
                raise ExtractError(f"--chat-template {cfg.chat_template}: the dataset {cfg.dataset} is read as plain "
                                   f"text (column {self.tc!r}), and a chat template applies only to chat datasets (a "
                                   "messages column, or user+assistant columns). Drop --chat-template, or pass "
                                   "--messages-column.")
        if self.chat:
            from ..chat import chat_template_source

            try:
                source = chat_template_source(self.tok, template)
            except Exception as e:  # noqa: BLE001 - a --chat-template file with no jinja in it
                raise ExtractError(f"--chat-template {cfg.chat_template}: {e}") from e
        return template, source

    def render(self, row):
        """(text, ids int64, positions int64); errors (ChatFormatError, TypeError...) propagate raw."""
        if self.chat:
            from ..chat import render_chat

            rc = render_chat(self.tok, self.messages(row), template=self.template)
            text, ids, mask = rc.text, rc.ids, rc.assistant_mask
        else:
            text = row[self.tc]
            ids = self.tok.encode(text)
            if self.add_bos and self.tok.bos_id is not None:
                ids = np.concatenate([[self.tok.bos_id], ids])
            mask = None
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.shape[0]
        if self.targets == "all" or mask is None:
            pos = np.arange(max(T - 1, 0), dtype=np.int64)
        else:
            pos = np.nonzero(mask[1:])[0].astype(np.int64)
        return text, ids, pos
