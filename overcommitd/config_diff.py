"""What a reload changes: the running state, key by key, against the file just read.

The running state is not the previous file: a policy or dry-run set over MQTT is part of
it, so a reload that restores the file's policy says so instead of "config reloaded"."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_SHOWN_MAX = 120  # characters of one value in a log line


def changes(running: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """One ``"key: old -> new"`` per leaf that differs, dotted from the top; tables keyed
    by name (``guests``) say which keys were added, removed or changed."""
    out: list[str] = []
    for name in type(new).model_fields:
        old_v, new_v = getattr(running, name), getattr(new, name)
        if old_v == new_v:
            continue
        key = f"{prefix}{name}"
        if isinstance(old_v, BaseModel) and isinstance(new_v, BaseModel):
            out += changes(old_v, new_v, f"{key}.")
        elif isinstance(old_v, dict) and isinstance(new_v, dict) and _is_table(old_v, new_v):
            out += _table_changes(key, old_v, new_v)
        elif "password" in name:
            out.append(f"{key}: changed")  # never in a log line
        else:
            out.append(f"{key}: {_show(old_v)} -> {_show(new_v)}")
    return out


def _is_table(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return any(isinstance(v, BaseModel) for v in (*a.values(), *b.values()))


def _table_changes(key: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = [f"{key}.{k}: added" for k in sorted(new.keys() - old.keys())]
    out += [f"{key}.{k}: removed" for k in sorted(old.keys() - new.keys())]
    for k in sorted(old.keys() & new.keys()):
        if old[k] != new[k]:
            out += changes(old[k], new[k], f"{key}.{k}.")
    return out


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "..."
