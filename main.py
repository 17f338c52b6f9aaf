"""The seed's command line: python main.py [--single PATH] [--skip_audio] [--skip_vlm] ...

A thin shim over i2s_cli/cli.py (installed as the `i2s` command); `python main.py --help` lists
every option. Needs the project installed (`make setup`, or `pip install -e .`).
"""
import os
import sys

from i2s_cli.cli import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
