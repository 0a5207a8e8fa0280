"""The word-level tokenizer of the generated tasks: `build_word_tokenizer`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .examples import DataError

if TYPE_CHECKING:  # transformers is slow to import; build_word_tokenizer imports it lazily
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIAL_TOKENS = (PAD, EOS, UNK, BOS)  # ids 0, 1, 2, 3


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (split by the same `Whitespace` pre-tokenizer the
    tokenizer uses, so "use," contributes "use" and ","), with specials <pad>=0, </s>=1,
    <unk>=2, <s>=3 and then the words, deduplicated and sorted.

    Encoding adds no BOS/EOS (the model code adds them); decoding joins tokens with single
    spaces (the `tokenizers` default when no decoder is set) without clean-up, so
    decode(encode(t)) == t for any text of in-vocabulary words joined by single spaces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    pieces: set[str] = set()
    for word in words:
        if not isinstance(word, str):
            raise DataError(f"build_word_tokenizer: {word!r} is not a string")
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(word))
    pieces -= set(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(pieces)])}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    # No post-processor: nothing is added around the ids.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,
    )
