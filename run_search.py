#!/usr/bin/env python3
"""The main job: ``python run_search.py --budget 0.7GFLOPs`` (same as ``nasloc search``; see --help)."""
import sys

from nasloc.cli.main import search_main

if __name__ == "__main__":
    sys.exit(search_main())
