"""Each default is written once (issue 25: the 600 s deadline stood in four places, the prefill chunk was
512 in the config and 0 in the engine). For each setting in the table, every literal default bound to a
name of that setting anywhere in the packages (a function parameter, a dataclass field, a `setting(...)`,
a module constant) must stand in its one home; everywhere else the name takes the home's constant. The
engine's mode names and the audio compile modes are written once too (vlm_service/engine_options.py,
audio_service/config.py): the flags take their choices from there (test_the_flags_offer_the_modes_the_code_knows)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serving", "i2s_formats", "vlm_service", "audio_service", "orchestrator", "gateway", "i2s_client",
            "i2s_cli", "vlm_prompt", "bench", "tiny_models")

# setting: (names it goes by, its value, the one file that may write it as a literal)
TABLE = {
    "default deadline": (r"deadline_seconds|request_timeout_seconds|DEFAULT_TIMEOUT_SECONDS|DEFAULT_DEADLINE_SECONDS",
                         600, "serving/deadline.py"),
    "clip length": (r"^(DEFAULT_)?DURATION_SECONDS$|^duration_seconds$|^audio_seconds$", 4, "i2s_formats/contract.py"),
    "guidance": (r"^(DEFAULT_)?GUIDANCE_SCALE$|^guidance_scale$|^audio_guidance$", 3.5, "i2s_formats/contract.py"),
    "prefill chunk": (r"prefill_chunk", 512, "vlm_service/engine_options.py"),
}


def literal_defaults(tree: ast.AST):
    """(name, literal) for every literal default bound to a name in the module."""
    def literal(node):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setting" and node.args:
            node = node.args[0]  # setting(default, help)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        return None

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults):
                yield arg.arg, literal(default)
            for arg, default in zip(args.kwonlyargs, args.kw_defaults):
                yield arg.arg, literal(default) if default is not None else None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            yield node.target.id, literal(node.value)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    yield target.id, literal(node.value)


def homes_of(pattern: str, value: float) -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for name, literal in literal_defaults(ast.parse(path.read_text(), str(path))):
                if literal is not None and literal == value and re.search(pattern, name):
                    found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("setting", sorted(TABLE))
def test_each_default_is_written_in_one_place(setting):
    pattern, value, home = TABLE[setting]
    assert homes_of(pattern, value) == {home}


def test_the_flags_offer_the_modes_the_code_knows():
    from audio_service.config import COMPILE_MODES, AudioConfig
    from serving.config import settings
    from vlm_service.config import VlmConfig
    from vlm_service.engine_options import ATTENTION_MODES, CAPTURE_MODES, JUMP_FORWARD_MODES, EngineOptions

    vlm = {s.flag: s for s in settings(VlmConfig)}
    assert tuple(vlm["engine-capture"].choices) == CAPTURE_MODES
    assert tuple(vlm["engine-attention"].choices) == ATTENTION_MODES
    assert tuple(vlm["engine-jump-forward"].choices) == JUMP_FORWARD_MODES
    config = VlmConfig()
    assert (config.engine_prefill_chunk, config.engine_capture, config.engine_max_batch) == \
        (EngineOptions.prefill_chunk, EngineOptions.capture, EngineOptions.max_batch)
    assert tuple({s.flag: s for s in settings(AudioConfig)}["compile"].choices) == COMPILE_MODES
