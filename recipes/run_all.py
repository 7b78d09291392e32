"""The main job. For now: the embedded model answers one question (the full pipeline comes later)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat"]))
