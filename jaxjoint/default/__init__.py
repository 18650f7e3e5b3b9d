"""The embedded default model and its held-out sentences (see ``MODEL_CARD.md`` here).

``jaxjoint evaluate`` without ``--model``/``--data`` uses these, so it runs offline.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEFAULT_DIR / "model"  # config.json, model.safetensors, tokenizer files
SENTENCE_FILES = {
    "short": DEFAULT_DIR / "heldout_short.txt",  # 300 short sentences (SNLI-like length)
    "news": DEFAULT_DIR / "heldout_news.txt",  # 300 longer sentences (XSUM-like length)
}


def load_sentences(name: str = "short") -> list[str]:
    """The held-out sentences ``"short"`` or ``"news"``, one string per sentence, file order."""
    if name not in SENTENCE_FILES:
        raise ValueError(f"unknown default sentence set {name!r}; choose one of {', '.join(SENTENCE_FILES)}")
    text = SENTENCE_FILES[name].read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
