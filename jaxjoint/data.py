"""Evaluation sentences and the masking protocol of DESIGN.md §2.

A data source is a name or a path:

- ``default`` / ``default-news``: the held-out sets shipped with the embedded
  default model (``jaxjoint/default/heldout_short.txt``, ``heldout_news.txt``);
- ``snli`` / ``xsum``: the paper's sets, through ``datasets.load_dataset``
  (downloaded once, then read from the local cache; a script-based repository from
  the hub's Parquet conversion), selected by the paper's protocol (DESIGN.md §2);
- ``snli=PATH`` / ``xsum=PATH``: a local copy of the protocol's split with the hub's
  columns (Parquet, JSON Lines, or a directory saved by ``datasets``), selected the same way;
- a ``.txt`` file (one sentence a line) or a ``.jsonl`` file (a ``text`` field a line);
- a FASTA file (``.fa``, ``.faa``, ``.fasta``) of protein sequences, one record a pair, for
  a protein MLM (ESM-2) whose tokenizer reads one residue a token.

Blank lines are not sentences. A sentence's ``index`` is its 0-based position in
the source, and its masked positions depend only on ``(seed, index)``, so a
resumed run, or any subset of the sentences, picks the same pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxjoint.default import SENTENCE_FILES
from jaxjoint.errors import UserError
from jaxjoint.models.config import EncoderConfig

MASKINGS = ("random", "contiguous")
LOCAL_SETS = {"default": SENTENCE_FILES["short"], "default-news": SENTENCE_FILES["news"]}
HUB_SETS = {"snli": "stanfordnlp/snli", "xsum": "EdinburghNLP/xsum"}
HUB_SPLITS = {"snli": "train", "xsum": "validation"}  # the split the protocol reads
HUB_COLUMNS = {"snli": ("premise", "hypothesis"), "xsum": ("summary",)}  # the columns it reads
# The hub's own Parquet conversion of a dataset: what datasets >= 4 can read of a script-based repository.
PARQUET_REVISION = "refs/convert/parquet"
DATA_NAMES = (*LOCAL_SETS, *HUB_SETS)
TEXT_SUFFIXES = (".txt", ".jsonl")
FASTA_SUFFIXES = (".fa", ".faa", ".fasta")  # compared in lower case, as TEXT_SUFFIXES
MAX_TOKENS = 512  # the paper truncates every sentence to 512 tokens
# An embedded set is scored on its first sentences only unless a count is given,
# so that the README's first command answers in a few minutes on a laptop CPU.
EMBEDDED_SAMPLE = 60
# The paper's preprocessing joins SNLI rows in blocks of this many: the block's
# premises, then its hypotheses. The sentence order, and so "the first 1000
# sentences", depends on it.
SNLI_BLOCK_ROWS = 100


@dataclasses.dataclass(frozen=True)
class MaskedPair:
    """One evaluation pair: a tokenized sentence and its two masked positions.

    index: the sentence's position in its data source.
    text: the sentence as read.
    input_ids: int[L] with special tokens, gold tokens in place (a tuple).
    a, b: the positions A and B (A is the one drawn first).
    id: the FASTA record's id (``>id description``); None for text.
    truncated_from: the sentence's length in tokens (special tokens included) when it
      was cut to the model's maximum; None when ``input_ids`` is all of it.
    """

    index: int
    text: str
    input_ids: tuple[int, ...]
    a: int
    b: int
    id: str | None = None
    truncated_from: int | None = None

    @property
    def gold(self) -> tuple[int, int]:
        """The gold tokens ``(a0, b0)`` at A and B."""
        return self.input_ids[self.a], self.input_ids[self.b]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A sentence (or FASTA record) that has no pair: its index in the source and why."""

    index: int
    reason: str


def is_data_name(data: str) -> bool:
    """True for the built-in data names (``DATA_NAMES``), False for paths."""
    return data in DATA_NAMES


def default_limit(data: str) -> int | None:
    """How many sentences of ``data`` a run takes when no count is given:
    ``EMBEDDED_SAMPLE`` of an embedded set, all of anything else."""
    return EMBEDDED_SAMPLE if data in LOCAL_SETS else None


@dataclasses.dataclass(frozen=True)
class FastaRecord:
    """One protein of a FASTA file.

    id: the header's first word (``>id description``).
    sequence: the residues, upper-cased, the record's lines joined.
    path: the file; header_line: the 1-based line of its header.
    lines: ``(line number, residues on it)`` for each sequence line, to place a residue in the file.
    """

    id: str
    sequence: str
    path: str
    header_line: int
    lines: tuple[tuple[int, int], ...]

    def line_of(self, offset: int) -> int:
        """The file line holding residue ``offset`` (0-based) of the sequence."""
        for number, count in self.lines:
            if offset < count:
                return number
            offset -= count
        raise IndexError(offset)


# What a data source yields: sentences, or the records of a FASTA file.
Sentence = str | FastaRecord


def load_sentences(data: str, limit: int | None = None) -> list[str] | list[FastaRecord]:
    """The first ``limit`` sentences (all when None) of a named set or a file; for a
    FASTA file, its first ``limit`` records.

    Raises ``UserError`` for an unknown name, a missing, unreadable or empty file,
    a malformed ``.jsonl`` line or FASTA record, a local copy without the hub's
    columns, or a hub set that cannot be fetched (saying what failed).
    """
    copy = local_copy(data)
    if data in HUB_SETS:
        sentences = _hub_sentences(data, limit)
    elif copy is not None:
        sentences = _protocol(copy[0], _local_rows(*copy), limit)
    else:
        path = _data_path(data)
        sentences = fasta_records(path) if _suffix(path) in FASTA_SUFFIXES else _file_sentences(path)
    sentences = sentences if limit is None else sentences[:limit]
    if not sentences:
        what = "FASTA records" if _suffix(Path(data)) in FASTA_SUFFIXES else "sentences"
        raise UserError(f"data {data!r} holds no {what}")
    return sentences


def _data_path(data: str) -> Path:
    if data in LOCAL_SETS:
        path = LOCAL_SETS[data]
        if not path.is_file():
            raise UserError(
                f"the embedded data set {data!r} is missing ({path}); reinstall jaxjoint "
                "or give a .txt/.jsonl path")
        return path
    path = Path(data).expanduser()
    if _suffix(path) not in (*TEXT_SUFFIXES, *FASTA_SUFFIXES):
        if not path.exists():
            raise UserError(
                f"unknown data {data!r}: give one of {', '.join(DATA_NAMES)}, a local copy snli=PATH or "
                "xsum=PATH, or a path to a .txt, .jsonl or FASTA (.fa, .faa, .fasta) file")
        raise UserError(f"data file {data} must end in .txt (a sentence a line), .jsonl (a 'text' field) "
                        "or .fa/.faa/.fasta (protein sequences)")
    if not path.is_file():
        raise UserError(f"data file {data} does not exist")
    return path


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _read_lines(path: Path) -> list[str]:
    try:
        # Lines end at "\n" alone: str.splitlines would also split at form feeds and
        # U+2028, which may stand inside a sentence or a JSON string.
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not text.
        return [line.rstrip("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read data file {path} ({err})") from None


def _file_sentences(path: Path) -> list[str]:
    lines = _read_lines(path)
    if _suffix(path) == ".txt":
        return [line.strip() for line in lines if line.strip()]
    sentences = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, TypeError, KeyError):
            raise UserError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: 'text' must be a string")
        if text.strip():
            sentences.append(text.strip())
    return sentences


def fasta_records(path: Path) -> list[FastaRecord]:
    """The records of a FASTA file, in file order.

    A record is a header line ``>id description`` and the sequence lines up to the
    next header; sequence lines may wrap anywhere, blank lines and whitespace are
    dropped, lower case is read as upper case. Which characters are residues
    depends on the model: ``make_pairs`` checks them. A header without an id, a
    record without residues, or a sequence line before the first header is a
    ``UserError`` naming the line.
    """
    records: list[FastaRecord] = []
    header: tuple[str, int] | None = None  # (id, line) of the record being read
    chunks: list[str] = []
    spans: list[tuple[int, int]] = []

    def finish() -> None:
        if header is None:
            return
        if not chunks:
            raise UserError(f"{path}:{header[1]}: FASTA record {header[0]!r} has no sequence; "
                            "remove the record or add its residues")
        records.append(FastaRecord(header[0], "".join(chunks), str(path), header[1], tuple(spans)))

    for number, line in enumerate(_read_lines(path), 1):
        residues = "".join(line.split())
        if not residues:
            continue
        if residues.startswith(">"):
            finish()
            words = line.strip()[1:].split()
            if not words:
                raise UserError(f"{path}:{number}: FASTA header without an id; write '>ID description'")
            header, chunks, spans = (words[0], number), [], []
        elif header is None:
            raise UserError(f"{path}:{number}: sequence before the first header; "
                            "a FASTA record starts with a line '>ID description'")
        else:
            chunks.append(residues.upper())
            spans.append((number, len(residues)))
    finish()
    return records


@contextlib.contextmanager
def _cache_only() -> Iterator[None]:
    """Within: ``datasets`` and ``huggingface_hub`` read their caches, without a request (and so
    without the clients' retries), as under ``HF_HUB_OFFLINE``, which they read once at import."""
    import datasets.config
    from huggingface_hub import constants

    saved = [(m, m.HF_HUB_OFFLINE) for m in (constants, datasets.config)]
    try:
        for module, _ in saved:
            module.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, value in saved:
            module.HF_HUB_OFFLINE = value


def local_copy(data: str) -> tuple[str, str] | None:
    """``(name, path)`` of a local copy of a hub set (``snli=PATH``, ``xsum=PATH``), else None."""
    name, sep, path = data.partition("=")
    return (name, path) if sep and name in HUB_SETS and path.strip() else None


def _hub_sentences(name: str, limit: int | None) -> list[str]:
    """The paper's protocol (DESIGN.md §2) over a ``datasets`` hub set."""
    return _protocol(name, _hub_rows(name), limit)


def _fail(name: str, what: str) -> UserError:
    return UserError(f"cannot load {name!r} ({HUB_SETS[name]}): {what}; or give a local copy of the hub's "
                     f"{HUB_SPLITS[name]} split: --data {name}=PATH (Parquet, JSON Lines, or a directory saved "
                     "by datasets)")


def _hub_rows(name: str) -> Any:
    """The protocol's split of a hub set as a ``datasets.Dataset``, rows in the hub's order.

    Without network (``hub.unreachable``) the cache alone is read, at once. A repository that
    loads through a script (``datasets`` >= 4 refuses those) is read from the hub's
    Parquet conversion of the same dataset (``PARQUET_REVISION``): the same rows in the
    same order, so ``shuffle(seed=0)`` selects the same sentences.
    """
    import datasets

    from jaxjoint import hub

    repo, split = HUB_SETS[name], HUB_SPLITS[name]
    why = hub.unreachable(datasets=True)
    if why is not None:
        with _cache_only(), hub.quiet():
            for revision in (None, PARQUET_REVISION):
                try:
                    return datasets.load_dataset(repo, split=split, revision=revision)
                except Exception:  # not in the cache under this revision
                    continue
        raise _fail(name, f"the Hugging Face Hub is not reachable ({why}) and {repo} is not in the datasets "
                    "cache; connect once to cache it")
    try:
        with hub.quiet():
            return datasets.load_dataset(repo, split=split)
    except Exception as err:  # datasets raises many types
        if not _script_refused(err):
            raise _load_failure(name, err) from None
    try:
        with hub.quiet():
            return datasets.load_dataset(repo, split=split, revision=PARQUET_REVISION)
    except Exception as err:
        raise _fail(name, f"datasets {datasets.__version__} refuses its loading script, and its Parquet "
                    f"conversion (revision {PARQUET_REVISION}) failed too: {_describe(err)}") from None


def _script_refused(err: Exception) -> bool:
    return isinstance(err, RuntimeError) and "scripts are no longer supported" in str(err)


def _describe(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _load_failure(name: str, err: Exception) -> UserError:
    """What failed, from the type of ``datasets``' error."""
    from datasets.exceptions import DatasetNotFoundError

    if isinstance(err, ConnectionError):
        return _fail(name, f"the Hugging Face Hub did not answer ({_describe(err)})")
    if isinstance(err, DatasetNotFoundError):
        return _fail(name, f"the hub has no such dataset, or it cannot be accessed ({_describe(err)})")
    if isinstance(err, (ValueError, KeyError)) and "split" in str(err).lower():
        return _fail(name, f"it has no {HUB_SPLITS[name]!r} split ({_describe(err)})")
    return _fail(name, _describe(err))


def _local_rows(name: str, path_text: str) -> Any:
    """A local copy of a hub set as a ``datasets.Dataset``, rows in the file's order.

    path: a Parquet file, a JSON Lines file (``.jsonl``, ``.json``: one object a line), or
    a directory written by ``datasets``' ``save_to_disk`` (a dataset, or a dataset dict
    holding the protocol's split). The hub's columns are needed (``HUB_COLUMNS``).
    """
    import datasets

    path = Path(path_text).expanduser()
    where = f"--data {name}={path_text}"
    if not path.exists():
        raise UserError(f"{where}: {path} does not exist")
    columns = HUB_COLUMNS[name]
    try:
        if path.is_dir():
            rows = datasets.load_from_disk(str(path))
            if isinstance(rows, datasets.DatasetDict):
                split = HUB_SPLITS[name]
                if split not in rows:
                    raise UserError(f"{where}: the saved dataset has no {split!r} split (it has "
                                    f"{', '.join(rows) or 'none'}); the protocol reads {split}")
                rows = rows[split]
        elif _suffix(path) == ".parquet":
            import pyarrow.parquet as pq

            rows = datasets.Dataset(pq.read_table(path))
        elif _suffix(path) in (".jsonl", ".json"):
            rows = datasets.Dataset.from_list(_json_lines(path, columns))
        else:
            raise UserError(f"{where}: give a .parquet file, a .jsonl file or a directory saved by datasets")
    except UserError:
        raise
    except Exception as err:  # pyarrow and datasets raise many types for a broken file
        raise UserError(f"{where}: cannot read it ({_describe(err)})") from None
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise UserError(f"{where}: no {missing[0]!r} column (it has {', '.join(rows.column_names) or 'none'}); "
                        f"a copy of {HUB_SETS[name]} has the hub's columns: {', '.join(columns)}")
    return rows


def _json_lines(path: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected one JSON object a line")
        missing = [c for c in columns if c not in row]
        if missing:
            raise UserError(f"{path}:{number}: no {missing[0]!r} field; a local copy has the hub's columns "
                            f"({', '.join(columns)})")
        rows.append({c: row[c] for c in columns})
    return rows


def _protocol(name: str, rows: Any, limit: int | None) -> list[str]:
    """DESIGN.md §2's selection from the rows of the hub's split (a ``datasets.Dataset``)."""
    rows = rows.shuffle(seed=0)
    if name == "xsum":
        n = len(rows) if limit is None else min(limit, len(rows))
        return [str(s).strip() for s in list(rows.select(range(n))["summary"])]
    # datasets' train_test_split(test_size=f, shuffle=False) keeps the last ceil(f*n)
    # rows as its test part: 1% held out, then that part's first (train) half.
    held_out = math.ceil(0.01 * len(rows))
    start = len(rows) - held_out
    part = rows.select(range(start, start + held_out - math.ceil(0.5 * held_out)))
    premises, hypotheses = list(part["premise"]), list(part["hypothesis"])
    sentences: list[str] = []
    for first in range(0, len(premises), SNLI_BLOCK_ROWS):
        block = slice(first, first + SNLI_BLOCK_ROWS)
        sentences += [str(s).strip() for s in premises[block] + hypotheses[block]]
        if limit is not None and len(sentences) >= limit:
            break
    return sentences


# --- the masking protocol ------------------------------------------------------------


def max_tokens(config: EncoderConfig) -> int:
    """Longest sentence (with special tokens) the model takes, at most ``MAX_TOKENS``."""
    offset = config.pad_token_id + 1 if config.padding_aware_positions else 0
    return min(MAX_TOKENS, config.max_positions - offset)


def choose_positions(special: Sequence[bool], masking: str, rng: np.random.Generator) -> tuple[int, int] | None:
    """Positions ``(A, B)`` for one sentence, or None when it has too few maskable tokens.

    special: bool[L], True at special tokens ([CLS], [SEP], ...), which are never masked.
    random: two distinct non-special positions uniformly without replacement, A drawn first.
    contiguous: A uniform over non-special positions whose right neighbour is non-special; B = A + 1.
    """
    free = ~np.asarray(special, bool)
    if masking == "random":
        candidates = np.flatnonzero(free)
        if candidates.size < 2:
            return None
        a, b = rng.choice(candidates, size=2, replace=False)
        return int(a), int(b)
    if masking == "contiguous":
        candidates = np.flatnonzero(free[:-1] & free[1:])
        if candidates.size == 0:
            return None
        a = int(rng.choice(candidates))
        return a, a + 1
    raise UserError(f"unknown masking {masking!r}; choose one of {', '.join(MASKINGS)}")


def sentence_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for sentence ``index``: independent of every other sentence."""
    return np.random.default_rng([seed, index])


def make_pairs(
    sentences: Sequence[Sentence],
    tokenizer: Any,
    *,
    masking: str,
    seed: int,
    max_length: int,
) -> tuple[list[MaskedPair], list[Skipped]]:
    """Tokenize ``sentences`` (or FASTA records) and choose each one's pair.

    Sentences are truncated to ``max_length`` tokens (special tokens included); a
    pair cut so keeps the whole length as ``truncated_from``.
    A FASTA record's residues must all be in the tokenizer's alphabet
    (``protein_alphabet``), else a ``UserError`` names the record, its line and
    the character; its pair keeps the record's id.
    Returns the pairs, in sentence order, and the sentences skipped for having fewer
    than two maskable tokens (no adjacent pair, for contiguous masking), with why.
    """
    if tokenizer is None:
        raise UserError("the checkpoint has no tokenizer files; evaluation needs one to read text")
    alphabet = protein_alphabet(tokenizer) if any(isinstance(s, FastaRecord) for s in sentences) else None
    pairs, skipped = [], []
    for index, item in enumerate(sentences):
        text, record_id = item, None
        if isinstance(item, FastaRecord):
            check_residues(item.sequence, alphabet,
                           lambda i, r=item: f"{r.path}:{r.line_of(i)}: FASTA record {r.id!r}")
            text, record_id = item.sequence, item.id
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        whole = None
        if len(encoded["input_ids"]) >= max_length:  # cut, or exactly the maximum: count the whole
            length = len(tokenizer(text, verbose=False)["input_ids"])
            whole = length if length > max_length else None
        positions = choose_positions(encoded["special_tokens_mask"], masking, sentence_rng(seed, index))
        if positions is None:
            free = len(encoded["special_tokens_mask"]) - sum(encoded["special_tokens_mask"])
            reason = (f"{free} maskable token{'' if free == 1 else 's'}, fewer than two" if masking == "random"
                      else f"no two adjacent maskable tokens ({free} maskable)")
            skipped.append(Skipped(index, reason))
            continue
        pairs.append(MaskedPair(index, text, tuple(int(t) for t in encoded["input_ids"]), *positions,
                                id=record_id, truncated_from=whole))
    return pairs, skipped


# --- proteins -------------------------------------------------------------------------------

# The twenty standard amino acids: a protein tokenizer reads each as one token.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def protein_alphabet(tokenizer: Any) -> frozenset[str]:
    """The residues ``tokenizer`` reads, one token each: its one-character tokens that
    are not special (ESM-2: the 20 amino acids, X B U Z O, and the gaps ``.`` ``-``).

    Raises ``UserError`` when the tokenizer is not a protein one: it lacks one of
    the 20 standard amino acids, or does not read them one token each.
    """
    special = set(tokenizer.all_special_ids)
    alphabet = frozenset(t for t, i in tokenizer.get_vocab().items() if len(t) == 1 and i not in special)
    encoded = tokenizer(AMINO_ACIDS, add_special_tokens=False)["input_ids"]
    if not set(AMINO_ACIDS) <= alphabet or tokenizer.convert_ids_to_tokens(encoded) != list(AMINO_ACIDS):
        raise UserError("protein sequences need a protein MLM whose tokenizer reads one residue a token "
                        "(ESM-2, such as facebook/esm2_t6_8M_UR50D); this model's tokenizer does not")
    return alphabet


def check_residues(sequence: str, alphabet: frozenset[str], where: Callable[[int], str]) -> None:
    """``UserError`` at the first character of ``sequence`` outside ``alphabet``;
    ``where(offset)`` says where that character is, as the message's start."""
    for offset, char in enumerate(sequence):
        if char not in alphabet:
            letters = "".join(sorted(alphabet, key=lambda c: (not c.isalpha(), c)))  # letters, then gaps
            unknown = " (X stands for an unknown residue)" if "X" in alphabet else ""
            raise UserError(f"{where(offset)}: {char!r} is not in the model's alphabet {letters}; "
                            f"remove or replace it{unknown}")
