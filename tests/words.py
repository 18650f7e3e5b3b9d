"""The tiny test vocabulary: WordPiece entries and sentence words (no PyTorch needed)."""

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a cat dog sat on mat and ran to park man woman saw bird tree house red blue "
    "big small is was in of with by it he she they we eat ate food water over under "
    "quick brown fox jumps lazy day night"
).split()


def vocabulary(size: int) -> list[str]:
    """``size`` WordPiece entries: the specials, words, then filler sub-words."""
    tokens = SPECIALS + WORDS
    tokens += [f"##x{i}" for i in range(size - len(tokens))]
    return tokens[:size]
