"""Architectures as a study's sizes: ``--variants`` may name timm architectures next to ViT sizes.

A variant is either a ViT size (``"Ti"``, ``"B/16"``, ``"mu/4:width=64"``; :func:`~.spec.parse_size`)
or ``timm:<name>[:<field>=<value>]...``, a ``model.TimmSpec`` whose typed shape fields
(``patch_size``, ``embed_dim``, ``depths``, ``num_heads``, ``mlp_ratio``, ``window_size``,
``class_depth``, ``sr_ratios``; tuples written ``1,1``) give a small member of that family::

    timm:swin_tiny_patch4_window7_224:patch_size=2:embed_dim=16:depths=1,1:num_heads=1,2:window_size=4

A trial of such a variant replaces the base recipe's model section with that spec (a study may
mix ViT sizes and architectures: the compute axis counts every model alike, ``model.flops``).
"""

from __future__ import annotations

import re
import typing

from model import TimmSpec
from model.zoo import SHAPE_FIELDS
from orchestration.experiment.overrides import parse_typed

PREFIX = "timm:"


def is_arch(variant: str) -> bool:
    return variant.startswith(PREFIX)


def split_variants(text: str) -> tuple[str, ...]:
    """``--variants`` split at its commas, except the commas inside a tuple value: a piece that
    starts with a digit continues the previous variant (``depths=1,1``); no size name does."""
    out: list[str] = []
    for piece in text.split(","):
        if out and piece[:1].isdigit():
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return tuple(out)


def parse_arch(variant: str) -> TimmSpec:
    """``timm:<name>[:k=v]...`` -> its ``model.TimmSpec`` (ValueError naming the bad part and the
    fields a spec takes)."""
    name, *items = variant.removeprefix(PREFIX).split(":")
    hints = typing.get_type_hints(TimmSpec)
    fields: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in SHAPE_FIELDS:
            raise ValueError(f"variant {variant!r}: {item!r} must be <field>=<value> with a field of "
                             f"{', '.join(SHAPE_FIELDS)}")
        try:
            fields[key] = parse_typed(text, hints[key])
        except (ValueError, SyntaxError):
            raise ValueError(f"variant {variant!r}: {key}={text!r} is not a {hints[key]}") from None
    try:
        return TimmSpec(name=name, **fields)
    except ValueError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:]] or [str(e)]
        raise ValueError(f"variant {variant!r}: {'; '.join(lines)}") from None


def arch_label(variant: str) -> str:
    """Canonical label of an architecture variant: its spec's set fields in a fixed order."""
    spec = parse_arch(variant)
    parts = [spec.name]
    for f in SHAPE_FIELDS:
        v = getattr(spec, f)
        if v not in (None, ()):
            parts.append(f"{f}={','.join(map(str, v)) if isinstance(v, tuple) else v}")
    return PREFIX + ":".join(parts)


def arch_slug(label: str) -> str:
    """Path-safe, short: ``timm:swin_tiny_patch4_window7_224:depths=1,1`` -> ``swin_tiny_patch4_window7_224-depths1x1``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "", label.removeprefix(PREFIX).replace(":", "-").replace(",", "x"))
