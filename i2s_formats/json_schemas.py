"""The JSON Schemas of the files handed to the next stage (i2s_formats/schemas/): mix.json and the Phase 2
export's manifest.json. Writers validate against them before writing; a broken document is refused with
the field that breaks it named."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).resolve().parent / "schemas"
MIX = "mix.schema.json"
PHASE2_MANIFEST = "phase2_manifest.schema.json"


class SchemaError(ValueError):
    """A document does not match its schema; the message names the field."""


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema
    from referencing import Registry, Resource

    schemas = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in _DIR.glob("*.schema.json")}
    registry = Registry().with_resources((n, Resource.from_contents(s)) for n, s in schemas.items())
    cls = jsonschema.validators.validator_for(schemas[name])
    cls.check_schema(schemas[name])
    return cls(schemas[name], registry=registry)


def validate(document: Any, name: str) -> None:
    """Raises SchemaError naming the first field (as a JSON path) that breaks schema ``name``."""
    errors = sorted(_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        raise SchemaError(f"{name}: {error.json_path}: {error.message}")
