"""The seed's command line: python main.py [--single PATH] [--skip_audio] [--skip_vlm] ...

A thin shim over orchestrator/cli.py; `python main.py --help` lists every option.
"""
import os
import sys
from pathlib import Path

# The generated gRPC stubs live under protos/ (make protos); make them importable from a plain checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent / "protos"))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
