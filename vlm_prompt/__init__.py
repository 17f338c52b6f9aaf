"""Versioned prompt templates for the VLM (system text, task text, JSON schema, few-shot examples).

Each version lives in its own folder (``v1/``...) and is loaded once at start with :func:`load_prompt`.
"""

from vlm_prompt.loader import DEFAULT_VERSION, PromptTemplate, available_versions, load_prompt

__all__ = ["DEFAULT_VERSION", "PromptTemplate", "available_versions", "load_prompt"]
