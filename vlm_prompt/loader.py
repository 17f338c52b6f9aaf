"""Loads a prompt version from ``vlm_prompt/<version>/``."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_VERSION = "v1"
EXAMPLE_PLACEHOLDER = "{example}"
_ROOT = Path(__file__).resolve().parent
_VERSION_RE = re.compile(r"^v[0-9]+$")


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt version, as files on disk say it.

    ``task`` is the raw task text (may hold the ``{example}`` placeholder); :attr:`user_text` is what
    goes with the image in the user turn: after it (``image_first``, v1) or before it (v2, so that all the
    prompt's text comes before the image and its KV can be computed once, a prefix cache).
    """

    version: str
    system: str
    task: str
    schema: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    image_first: bool = True

    @property
    def user_text(self) -> str:
        example = ""
        if self.examples:
            example = json.dumps(self.examples[0]["output"], separators=(",", ":"), ensure_ascii=False)
        return self.task.replace(EXAMPLE_PLACEHOLDER, example).strip()

    def messages(self) -> list[dict[str, Any]]:
        """Chat messages in the Hugging Face / Qwen format, with one image placeholder in the user turn."""
        user = [{"type": "image"}, {"type": "text", "text": self.user_text}]
        if not self.image_first:
            user.reverse()
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


    def located(self) -> "PromptTemplate":
        """This version asking also where each source is (``vlm_prompt/locate.json``): one more task line
        and a bounded pixel ``box`` in each source. The version itself is unchanged, so a request without
        locate_sources gets exactly the prompt and grammar it always had."""
        spec = json.loads((_ROOT / "locate.json").read_text(encoding="utf-8"))
        schema = copy.deepcopy(self.schema)
        source = schema["properties"]["sources"]["items"]
        props = list(source["properties"].items())
        at = [k for k, _ in props].index(spec["after"]) + 1
        source["properties"] = dict(props[:at] + [(spec["property"], spec["schema"])] + props[at:])
        source["required"] = [k for k in source["properties"] if k in source["required"] or k == spec["property"]]
        lines = self.task.splitlines()
        at = next((i for i, line in enumerate(lines) if EXAMPLE_PLACEHOLDER in line), len(lines))
        task = "\n".join(lines[:at] + [spec["task_line"]] + lines[at:])
        return replace(self, task=task, schema=schema)


def available_versions() -> list[str]:
    return sorted(
        (p.name for p in _ROOT.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)),
        key=lambda v: int(v[1:]),
    )


def load_prompt(version: str = DEFAULT_VERSION) -> PromptTemplate:
    """Read ``vlm_prompt/<version>/``: system.txt, task.txt, schema.json, optional examples.json and optional
    layout.json (``{"image_first": false}`` puts the task text before the image).

    Raises ValueError for an unknown or malformed version name, or an example without ``output``.
    """
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"bad prompt version {version!r}: expected v1, v2, ...")
    folder = _ROOT / version
    if not folder.is_dir():
        raise ValueError(f"unknown prompt version {version!r}; available: {', '.join(available_versions())}")
    system = (folder / "system.txt").read_text(encoding="utf-8").strip()
    task = (folder / "task.txt").read_text(encoding="utf-8").strip()
    schema = json.loads((folder / "schema.json").read_text(encoding="utf-8"))
    examples_path = folder / "examples.json"
    examples = json.loads(examples_path.read_text(encoding="utf-8")) if examples_path.exists() else []
    if not isinstance(examples, list) or any(not isinstance(e, dict) or "output" not in e for e in examples):
        raise ValueError(f"{examples_path}: expected a list of objects with an 'output' key")
    layout_path = folder / "layout.json"
    layout = json.loads(layout_path.read_text(encoding="utf-8")) if layout_path.exists() else {}
    if not isinstance(layout, dict) or set(layout) - {"image_first"} or not isinstance(layout.get("image_first", True), bool):
        raise ValueError(f"{layout_path}: expected {{\"image_first\": true|false}}")
    return PromptTemplate(version=version, system=system, task=task, schema=schema, examples=examples,
                          image_first=layout.get("image_first", True))
