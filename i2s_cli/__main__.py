"""python -m i2s_cli [flags]: the same as `i2s` and `python main.py`."""
import sys

from i2s_cli.cli import main

if __name__ == "__main__":
    sys.exit(main())
