"""One entry point for every stage that builds a decoder: pick the decoder the pair's tokenizers allow.

- no draft, or a draft whose tokenizer maps the same strings to the same ids ("same", "same-padded"
  in dspark.models.compat): `SpeculativeDecoder` (batched, draft ids verified directly);
- a draft with a different tokenizer ("different"): `CrossTokenizerDecoder` (dspark.decode.cross:
  re-tokenization through text for greedy, token-level intersection for sampling).
Both expose the same public surface (generate, stream, vocab, embed_limit, device, default_stop_ids,
context_length, policy_factory, policy_context, acceptance_head, target, draft) plus `mode`.
"""

from __future__ import annotations

from typing import Any

SAME_TOKENIZER = "same-tokenizer"
CROSS_TOKENIZER = "cross-tokenizer"


def _vocab_rows(model) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def pair_compat(target_model, draft_model, tokenizer, draft_tokenizer):
    """The TokenizerCompat of the pair (None when there is nothing to compare: no draft, or a
    tokenizer missing, which the same-tokenizer decoder treats as one shared tokenizer)."""
    if draft_model is None or tokenizer is None or draft_tokenizer is None:
        return None
    from dspark.models.compat import check_tokenizers

    return check_tokenizers(tokenizer, draft_tokenizer, _vocab_rows(target_model), _vocab_rows(draft_model))


def decoder_mode(compat) -> str:
    """"same-tokenizer" or "cross-tokenizer" for a TokenizerCompat (None: same)."""
    return SAME_TOKENIZER if compat is None or compat.compatible else CROSS_TOKENIZER


def make_decoder(target_model, draft_model=None, tokenizer=None, draft_length: Any = "auto", *,
                 draft_tokenizer=None, **kwargs):
    """A SpeculativeDecoder or a CrossTokenizerDecoder for this pair (module docstring). kwargs go
    to the decoder (device, stop_token_ids, lean; acceptance_head for the same-tokenizer decoder only:
    an acceptance head predicts same-tokenizer acceptance, so a cross pair ignores a head passed as None
    and refuses one given explicitly)."""
    compat = pair_compat(target_model, draft_model, tokenizer, draft_tokenizer)
    if decoder_mode(compat) == SAME_TOKENIZER:
        from dspark.decode.engine import SpeculativeDecoder

        dec = SpeculativeDecoder(target_model, draft_model, tokenizer, draft_length, draft_tokenizer=draft_tokenizer,
                                 **kwargs)
        if not hasattr(dec, "mode"):
            dec.mode = SAME_TOKENIZER
        if not hasattr(dec, "compat"):
            dec.compat = compat
        return dec
    from dspark.decode.cross import CrossTokenizerDecoder
    from dspark.errors import DsparkError

    if kwargs.pop("acceptance_head", None) is not None:
        raise DsparkError("an acceptance head predicts same-tokenizer acceptance; this draft has another tokenizer "
                          "(cross-tokenizer decoding): leave the acceptance head out")
    return CrossTokenizerDecoder(target_model, draft_model, tokenizer, draft_length, draft_tokenizer=draft_tokenizer,
                                 compat=compat, **kwargs)
