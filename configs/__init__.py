"""MindFormers yaml configs, laid out as ``configs/<model>/<task>.yaml``.

This folder installs as the package ``knowlm.configs`` so that an installed knowlm finds its yaml files.
"""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
