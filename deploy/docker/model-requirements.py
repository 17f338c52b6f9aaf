"""Prints the project's dependencies from pyproject.toml without torch (each image installs its own torch
build first): the model images' dependency layer, which a code change leaves as it was."""
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
print("\n".join(d for d in dependencies if re.split(r"[<>=!~;\[ ]", d)[0] != "torch"))
