#!/usr/bin/env python3
"""Quantize a trained ViT at 4-16 bits and compare with the original: ``python post_training.py --help``."""

from bvvit.cli.post_training import entry_point

if __name__ == "__main__":
    entry_point()
