"""Checking that a draft model speaks the target's vocabulary."""

from __future__ import annotations

from typing import Any

import torch

from .errors import VocabularyMismatchError
from .modelinfo import embedding_rows, output_rows

_HINT = "use a draft of the same tokenizer family, or --method prompt_lookup (no draft needed)"


def check_vocabularies(target: torch.nn.Module, draft: torch.nn.Module, tokenizer: Any, draft_tokenizer: Any) -> None:
    """Raise :class:`VocabularyMismatchError` when draft tokens would not mean the target's.

    Padded vocabulary sizes (e.g. 151936 vs 152064) are fine when the tokens
    they share agree. With both tokenizers, every token string must map to
    the same id; without them, the output sizes may differ only by padding.
    """
    t_rows, d_rows = output_rows(target), output_rows(draft)
    t_vocab = tokenizer.get_vocab() if tokenizer is not None else None
    if t_vocab is not None:  # the draft reads every token the target writes: its embedding must hold them all
        d_inputs = embedding_rows(draft.get_input_embeddings())
        t_ids = min(t_rows, max(t_vocab.values(), default=0) + 1)
        if d_inputs is not None and d_inputs < t_ids:
            raise VocabularyMismatchError(
                f"the draft's embedding has {d_inputs} rows, but the target's tokens go up to id {t_ids - 1}",
                _HINT,
            )
    if t_vocab is not None and draft_tokenizer is not None:
        d_vocab = draft_tokenizer.get_vocab()
        differ = [tok for tok, i in d_vocab.items() if t_vocab.get(tok, i) != i]
        only_draft = [tok for tok in d_vocab if tok not in t_vocab]
        if differ or len(only_draft) > 0.01 * max(len(d_vocab), 1):
            examples = ", ".join(repr(t) for t in (differ or only_draft)[:3])
            raise VocabularyMismatchError(
                f"the draft's tokenizer differs from the target's ({len(differ)} tokens have other ids, "
                f"{len(only_draft)} draft tokens are unknown to the target; e.g. {examples})",
                _HINT,
            )
        if max(d_vocab.values(), default=0) >= t_rows:
            raise VocabularyMismatchError(
                f"the draft produces token ids up to {max(d_vocab.values())}, beyond the target's {t_rows} outputs",
                _HINT,
            )
        return
    if abs(t_rows - d_rows) > 1024:
        raise VocabularyMismatchError(
            f"the draft has {d_rows} output tokens and the target {t_rows}: not the same vocabulary",
            _HINT,
        )
