"""The default model's corpus: WordNet 3.0 glosses and example sentences.

Why WordNet: it is real English written by people, it is on Debian's mirrors
(package ``wordnet-base``), so it can be fetched where only package registries
are reachable, and Princeton's licence grants use, copying, modification and
distribution "for any purpose", so weights trained on it and the held-out
sentences shipped with them may be redistributed (with the notice kept; see
``jaxjoint/default/LICENSE.WordNet``).

Fetch the source once, then build everything from it reproducibly::

    apt-get download wordnet-base          # wordnet-base_1%3a3.0-37_all.deb
    jaxjoint train-mlm --corpus wordnet-base_1%3a3.0-37_all.deb --out DIR

``--corpus`` takes the ``.deb`` itself (read with the standard library, no
``dpkg`` needed) or any directory holding ``data.noun`` ... ``data.adv``
(e.g. ``/usr/share/wordnet`` after ``apt-get install wordnet-base``).

Every synset is assigned to train or held-out by a hash of its id, so a
held-out sentence's synset contributed no text at all to training; any
training line that happens to equal a held-out line is dropped as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from jaxjoint.errors import UserError

WORDNET_PACKAGE = "wordnet-base"
FETCH_COMMAND = "apt-get download wordnet-base"
_POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Word-count windows of the shipped held-out sets. SNLI sentences are mostly
# 6-14 words; XSUM summaries about 15-30. The upper limits also bound the cost
# of an evaluation pair, which grows with the sentence length.
SHORT_WORDS = (6, 14)
NEWS_WORDS = (15, 28)


@dataclasses.dataclass(frozen=True)
class Synset:
    """One WordNet synset's text: ``key`` is ``<pos><offset>``, e.g. ``n00001740``."""

    key: str
    definitions: tuple[str, ...]
    examples: tuple[str, ...]


@dataclasses.dataclass
class CorpusSplits:
    """Training lines and held-out lines, one sentence or definition each.

    ``heldout_short`` / ``heldout_news`` (the shipped sets) and ``heldout_rest``
    are empty until ``select_heldout`` fills them: the selection needs the
    tokenizer, which is trained on ``train`` alone.
    """

    train: list[str]
    short_candidates: list[str]  # held-out example sentences, in selection order
    news_candidates: list[str]  # held-out long definitions, in selection order
    heldout_all: list[str]  # every held-out line
    stats: dict
    heldout_short: list[str] = dataclasses.field(default_factory=list)
    heldout_news: list[str] = dataclasses.field(default_factory=list)
    heldout_rest: list[str] = dataclasses.field(default_factory=list)


def _read_deb_member_files(deb: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """Files whose basename is in ``wanted`` from a ``.deb``'s data archive.

    A ``.deb`` is an ``ar`` archive (8-byte magic, then 60-byte member headers,
    members padded to even length) whose ``data.tar.*`` member holds the files.
    """
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise UserError(f"{deb} is not a Debian package (.deb); fetch it with `{FETCH_COMMAND}`")
    pos, data = 8, None
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name.startswith("data.tar"):
            data = raw[pos + 60 : pos + 60 + size]
            break
        pos += 60 + size + (size & 1)
    if data is None:
        raise UserError(f"{deb} has no data.tar member; is it a complete .deb?")
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in wanted and "/wordnet/" in member.name:
                found[base] = tar.extractfile(member).read()
    return found


def _wordnet_files(source: str | Path) -> dict[str, bytes]:
    """``data.noun`` ... ``data.adv`` contents from a ``.deb`` or a directory tree."""
    source = Path(source)
    wanted = [f"data.{p}" for p in _POS_FILES]
    if source.is_file():
        found = _read_deb_member_files(source, wanted)
    elif source.is_dir():
        found = {}
        for name in wanted:
            hits = sorted(source.rglob(name))
            if hits:
                found[name] = hits[0].read_bytes()
    else:
        raise UserError(
            f"corpus source {source} does not exist; fetch it with `{FETCH_COMMAND}` "
            "and pass the .deb (or a directory containing data.noun) to --corpus"
        )
    missing = [n for n in wanted if n not in found]
    if missing:
        raise UserError(f"{source} lacks WordNet files {', '.join(missing)}; expected {WORDNET_PACKAGE}")
    return found


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip(" ;,")


def parse_gloss(gloss: str) -> tuple[list[str], list[str]]:
    """Split a WordNet gloss into (definitions, example sentences).

    Examples are the double-quoted parts; an attribution after an example
    (``"..." - Shakespeare``) is dropped; the rest splits into definitions on ``;``.
    """
    examples = [_clean(e) for e in re.findall(r'"([^"]*)"', gloss)]
    rest = re.sub(r'"[^"]*"(\s*-+\s*[^;]*)?', ";", gloss)
    definitions = [_clean(d) for d in rest.split(";")]
    return [d for d in definitions if d], [e for e in examples if e]


def read_wordnet(source: str | Path) -> list[Synset]:
    """All synsets of WordNet 3.0, in file order (noun, verb, adj, adv)."""
    files = _wordnet_files(source)
    synsets = []
    for name, pos in _POS_FILES.items():
        # The files are ASCII apart from a handful of Latin-1 bytes.
        for line in files[f"data.{name}"].decode("latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            head, gloss = line.split(" | ", 1)
            definitions, examples = parse_gloss(gloss)
            synsets.append(Synset(f"{pos}{head.split(' ', 1)[0]}", tuple(definitions), tuple(examples)))
    return synsets


def _unit_hash(key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _words(text: str) -> int:
    return len(text.split())


def _plain(text: str) -> bool:
    """Prose only: ASCII, no underscores or brackets left from lexicographer notation."""
    return text.isascii() and not re.search(r"[_\[\]{}<>|]", text)


def build_corpus(source: str | Path, *, heldout_fraction: float = 0.04) -> CorpusSplits:
    """Split WordNet into training lines and held-out candidates.

    A synset is held out when ``sha256("split:" + key)`` falls below
    ``heldout_fraction``; candidates for the shipped sets are ordered by a
    second hash, so the whole split is a pure function of the data.
    """
    synsets = read_wordnet(source)
    heldout, train_synsets = [], []
    for s in synsets:
        (heldout if _unit_hash(s.key, "split") < heldout_fraction else train_synsets).append(s)

    def candidates(pairs: Iterable[tuple[str, str]], window: tuple[int, int]) -> list[str]:
        seen, out = set(), []
        for _, text in sorted(pairs, key=lambda kc: _unit_hash(kc[0] + kc[1], "pick")):
            if window[0] <= _words(text) <= window[1] and _plain(text) and text.lower() not in seen:
                seen.add(text.lower())
                out.append(text)
        return out

    short = candidates(((s.key, e) for s in heldout for e in s.examples), SHORT_WORDS)
    news = candidates(((s.key, d) for s in heldout for d in s.definitions), NEWS_WORDS)
    heldout_lines = sorted({t for s in heldout for t in s.definitions + s.examples})
    heldout_lower = {t.lower() for t in heldout_lines}

    train, dropped = [], 0
    for s in train_synsets:
        for text in s.definitions + s.examples:
            if text.lower() in heldout_lower:
                dropped += 1  # the same wording also occurs in a held-out synset
                continue
            if _words(text) >= 2:
                train.append(text)
    stats = {
        "source": f"WordNet 3.0, Debian package {WORDNET_PACKAGE}",
        "synsets": len(synsets),
        "heldout_synsets": len(heldout),
        "train_lines": len(train),
        "train_words": sum(_words(t) for t in train),
        "train_bytes": sum(len(t) + 1 for t in train),
        "train_lines_dropped_as_heldout_duplicates": dropped,
        "heldout_lines": len(heldout_lines),
    }
    return CorpusSplits(train, short, news, heldout_lines, stats)


def select_heldout(
    splits: CorpusSplits,
    count_tokens: Callable[[str], int],
    *,
    n_short: int = 300,
    n_news: int = 300,
    short_max_tokens: int = 16,
    news_max_tokens: int = 32,
) -> CorpusSplits:
    """Fill the shipped held-out sets: the first candidates that fit a token budget.

    ``count_tokens(text)`` counts tokens with ``[CLS]``/``[SEP]``. The limits match
    the evaluator's length buckets (16 and 32), so every short sentence costs a
    16-token forward pass and every news-like one a 32-token pass. The remaining
    held-out lines become ``heldout_rest`` (validation during training).
    """

    def take(cands: list[str], limit: int, n: int) -> list[str]:
        chosen = [t for t in cands if count_tokens(t) <= limit][:n]
        if len(chosen) < n:
            raise UserError(f"only {len(chosen)} held-out sentences fit {limit} tokens; lower the count")
        return chosen

    splits.heldout_short = take(splits.short_candidates, short_max_tokens, n_short)
    splits.heldout_news = take(splits.news_candidates, news_max_tokens, n_news)
    shipped = {t.lower() for t in splits.heldout_short + splits.heldout_news}
    splits.heldout_rest = [t for t in splits.heldout_all if t.lower() not in shipped and _words(t) >= 3]
    splits.stats.update(heldout_short=len(splits.heldout_short), heldout_news=len(splits.heldout_news),
                        heldout_rest=len(splits.heldout_rest))
    return splits


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """One line per item, UTF-8, trailing newline."""
    Path(path).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_splits(splits: CorpusSplits, directory: str | Path) -> None:
    """train.txt, heldout_short.txt, heldout_news.txt, heldout_rest.txt, corpus_stats.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_lines(d / "train.txt", splits.train)
    write_lines(d / "heldout_short.txt", splits.heldout_short)
    write_lines(d / "heldout_news.txt", splits.heldout_news)
    write_lines(d / "heldout_rest.txt", splits.heldout_rest)
    (d / "corpus_stats.json").write_text(json.dumps(splits.stats, indent=2) + "\n")


def train_tokenizer(lines: Sequence[str], vocab_size: int, directory: str | Path):
    """Train an uncased WordPiece vocabulary and save it as a BERT tokenizer.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(directory)``
    and adds ``[CLS] ... [SEP]``; special ids are [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3
    [MASK]=4. Returns that transformers tokenizer.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    # A small alphabet limit keeps rare symbols from taking vocabulary slots
    # that frequent word pieces need at V of a few thousand.
    wp.train_from_iterator(
        lines,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=120,
        show_progress=False,
    )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = wp.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    (d / "vocab.txt").write_text("".join(f"{t}\n" for t in ordered), encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True, strip_accents=True)
    tok.model_max_length = 128
    tok.save_pretrained(str(d))
    return tok
