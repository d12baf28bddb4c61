"""A CLIP BPE tokenizer for the toy vocabulary, written offline as ``vocab.json`` + ``merges.txt``.

Every printable ASCII character is a token both mid-word (``c``) and word-final (``c</w>``), so any
text tokenizes; each toy word gets the chain of merges that makes it a single token, as common
words are in the real CLIP vocabulary.

``tokenizer.json``'s decoder (:func:`decoder`) reads the ``</w>`` end-of-word markers as spaces
(byte-level decoding alone keeps them: ``scarlet</w>ruby</w>``) and writes no space between a word
and the punctuation after it, so ``decode(encode(caption)) == caption`` for the toy captions and
the decoded text re-tokenises to the same ids. transformers' ``CLIPTokenizer`` builds its own
decoder on load and mends it with a decode wrapper (lost when the tokenizer is deep-copied); the
``tokenizers`` library and other readers of the file use this one.

:func:`write_t5_tokenizer` writes toy-flux's second tokenizer: a T5 unigram model whose pieces are
every toy word (one piece each) and every printable character, so nothing is unknown.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, decoders
from transformers import CLIPTokenizer

from efface.toy.world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 24
T5_MAX_LENGTH = 24  # toy-flux's T5 sequence; efface's Flux family pads to the tokenizer's length
T5_WORD_SCORE, T5_CHAR_SCORE = -5.0, -12.0  # a whole word always beats spelling it out
CHARS = string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id; BOS=0, EOS=PAD=1) and ordered merges for ``words``."""
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    for c in CHARS:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(words, key=len):
        # Add merges until BPE (lowest-rank pair first) turns the word into one token; new merges
        # rank after every existing one, so they never change how earlier words are split.
        while len(pieces := _bpe(word, {m: r for r, m in enumerate(merges)})) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    return vocab, merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def decoder() -> decoders.Decoder:
    """Byte-level decoding, then every ``</w>`` a space, no space between a letter or digit and the
    punctuation after it, and no trailing space."""
    return decoders.Sequence([
        decoders.ByteLevel(),
        decoders.Replace("</w>", " "),
        decoders.Replace(Regex(r"(?<=[\p{L}\p{N}]) (?=[^\s\p{L}\p{N}])"), ""),
        decoders.Strip(" ", 0, 1),
    ])


def write_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """Write the toy tokenizer (vocab.json, merges.txt, tokenizer.json) into ``directory`` and load it back through transformers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = [w for w in vocabulary() if all(c in CHARS for c in w)]
    vocab, merges = build_vocab(words)
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=MAX_LENGTH,
    )
    tok.backend_tokenizer.decoder = decoder()
    tok.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)


def t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces: specials (<pad> 0, </s> 1, <unk> 2), "▁", "▁word" for every toy word, and
    every printable ASCII character both word-initial ("▁c") and inside a word ("c")."""
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -3.0}
    for word in vocabulary():
        pieces.setdefault("▁" + word, T5_WORD_SCORE)
    chars = string.ascii_letters + string.digits + string.punctuation
    for c in chars:
        pieces.setdefault("▁" + c, T5_CHAR_SCORE)
    for c in chars:
        pieces.setdefault(c, T5_CHAR_SCORE)
    return list(pieces.items())


def write_t5_tokenizer(directory: str | Path, max_length: int = T5_MAX_LENGTH):
    """Write the toy T5 tokenizer (pad 0, eos 1, unk 2, no sentinels) into ``directory`` and load it
    back through transformers' ``AutoTokenizer``, exactly as a pipeline directory loads it."""
    from transformers import AutoTokenizer, T5Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    T5Tokenizer(vocab=t5_pieces(), extra_ids=0, model_max_length=max_length).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
