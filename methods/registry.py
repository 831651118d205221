"""Method registry and spec parsing: ``name:key=value,...`` with ``+`` composition."""

from __future__ import annotations

import dataclasses
import typing

from methods.base import Method, SpecError, literal_choices

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def _convert(method: str, key: str, raw: str, tp):
    choices = literal_choices(tp)
    try:
        if choices:
            kind = type(choices[0])
            val = kind(raw)
            if val not in choices:
                raise ValueError
            return val
        if tp is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
    except ValueError:
        allowed = ", ".join(map(str, choices)) if choices else getattr(tp, "__name__", str(tp))
        raise SpecError(f"{method}: bad value {raw!r} for {key}; expected {allowed}") from None
    raise SpecError(f"{method}: parameter {key} has an unsupported type {tp}")


def parse_one(text: str) -> Method:
    """Parse ``name`` or ``name:key=value,key=value``."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in REGISTRY:
        raise SpecError(f"unknown method {name!r}; choose from: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise SpecError(f"{name}: malformed parameter {item!r}; write key=value")
        if key not in fields:
            raise SpecError(f"{name}: unknown parameter {key!r}; valid: {', '.join(sorted(fields)) or '(none)'}")
        kwargs[key] = _convert(name, key, raw.strip(), hints[key])
    return cls(**kwargs)


def parse_spec(text: str) -> Method:
    """Parse one spec, possibly composed with ``+`` (eviction first, then quantization)."""
    from methods.compose import Composite

    if not text.strip():
        raise SpecError(f"empty method spec; choose from: {', '.join(sorted(REGISTRY))}")
    parts = [parse_one(p) for p in text.split("+")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) != 2 or parts[0].kind != "eviction" or parts[1].kind != "quantization":
        kinds = {k: ", ".join(n for n, c in sorted(REGISTRY.items()) if c.kind == k)
                 for k in ("eviction", "quantization")}
        raise SpecError(f"cannot compose {text!r}: write eviction+quantization, e.g. snapkv:budget=0.2+kivi:bits=2 "
                        f"(eviction: {kinds['eviction']}; quantization: {kinds['quantization']})")
    if parts[0].decode_evicts and parts[1].per_channel_blocks:
        raise SpecError(f"cannot compose {text!r}: {parts[1].name} keeps keys in per-channel blocks of tokens, which "
                        f"{parts[0].name} would have to break at every step; use a prefill-only eviction (snapkv, "
                        f"pyramidkv) or a per-token quantizer (qaq)")
    return Composite(parts=parts)


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs; ``key=value`` items continue the previous method's parameters."""
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        head = item.split("+")[0]
        if specs and "=" in head and ":" not in head:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def parse_specs(text: str) -> list[Method]:
    """Parse a CLI ``--methods`` value into methods, de-duplicated by canonical spec, in order."""
    out: dict[str, Method] = {}
    for s in split_specs(text):
        m = parse_spec(s)
        out.setdefault(m.spec(), m)
    if not out:
        raise SpecError(f"no method given; choose from: {', '.join(sorted(REGISTRY))}")
    return list(out.values())


def describe() -> list[dict]:
    """One row per registered method: name, kind, parameters (type, default, help), paper."""
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        hints = typing.get_type_hints(cls)
        params = []
        for f in dataclasses.fields(cls):
            choices = literal_choices(hints[f.name])
            tp = "|".join(map(str, choices)) if choices else hints[f.name].__name__
            params.append({"name": f.name, "type": tp, "default": f.default, "help": f.metadata.get("help", "")})
        rows.append({"name": name, "kind": cls.kind, "params": params, "paper": cls.paper,
                     "summary": (cls.__doc__ or "").strip().splitlines()[0]})
    return rows
