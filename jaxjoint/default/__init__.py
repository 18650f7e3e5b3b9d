"""The embedded default model and its held-out sentences (see ``MODEL_CARD.md`` here).

``jaxjoint evaluate`` without ``--model``/``--data`` uses these, so it runs offline;
``--data default`` and ``default-news`` name the two sentence sets.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEFAULT_DIR / "model"  # config.json, model.safetensors, tokenizer files
SENTENCE_FILES = {
    "short": DEFAULT_DIR / "heldout_short.txt",  # 300 short sentences (SNLI-like length)
    "news": DEFAULT_DIR / "heldout_news.txt",  # 300 longer sentences (XSUM-like length)
}

