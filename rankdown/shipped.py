"""The model this project trains and ships (see rankdown/shipped_model/README.md)."""

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent / "shipped_model"
