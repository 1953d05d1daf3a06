#!/usr/bin/env python3
"""Train a Vision Transformer: ``python run.py --help``."""

from bvvit.cli.train import entry_point

if __name__ == "__main__":
    entry_point()
