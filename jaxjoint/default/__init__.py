"""The embedded default model and its held-out sentences (see ``MODEL_CARD.md`` here).

``jaxjoint evaluate`` without ``--model``/``--data`` uses these, so it runs offline;
``--model default`` names the model, ``--data default`` and ``default-news`` the
two sentence sets.
"""

from __future__ import annotations

from pathlib import Path

from jaxjoint.errors import UserError

NAME = "default"  # the --model value that means the embedded model
DEFAULT_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEFAULT_DIR / "model"  # config.json, model.safetensors, tokenizer files
SENTENCE_FILES = {
    "short": DEFAULT_DIR / "heldout_short.txt",  # 300 short sentences (SNLI-like length)
    "news": DEFAULT_DIR / "heldout_news.txt",  # 300 longer sentences (XSUM-like length)
}


def model_source(model: str) -> str:
    """The directory or hub name ``load_mlm`` gets for a config's ``model``: the
    embedded model's directory for ``"default"``, anything else unchanged."""
    if model != NAME:
        return model
    if not (MODEL_DIR / "config.json").is_file():
        raise UserError(f"the embedded default model is missing ({MODEL_DIR}); reinstall jaxjoint or give --model PATH")
    return str(MODEL_DIR)
