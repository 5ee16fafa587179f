"""dspark's speculative decoder: lossless, adaptive, batched, constraint-aware.

Public API (stable; the CLI, bench, select and serve build on it):
- SpeculativeDecoder(target, draft | None, tokenizer, draft_length="auto", device=..., ...)
  .generate(prompts, config, constraints=None, ...) -> list[DecodeResult]; .stream(...) -> TokenEvent
- CrossTokenizerDecoder (cross.py): the same surface for a draft with another tokenizer;
  make_decoder(target, draft, tokenizer, draft_length, draft_tokenizer=...) picks one of the two
- GenerationConfig, DecodeStats, DecodeResult (types.py: the shared vocabulary and metric definitions)
- parse_draft_length and the policies (policy.py), the verifier (verify.py), the warping (sampling.py),
  the TokenConstraint hook (constraints.py), the acceptance head format (acceptance_head.py).
"""

from dspark.decode.acceptance_head import (AcceptanceHead, has_acceptance_head, load_acceptance_head,
                                           save_acceptance_head)
from dspark.decode.constraints import TokenConstraint
from dspark.decode.cross import CrossTokenizerDecoder
from dspark.decode.engine import SpeculativeDecoder, TokenEvent
from dspark.decode.factory import decoder_mode, make_decoder, pair_compat
from dspark.decode.policy import (DraftLengthPolicy, DraftPlan, PolicyContext, PolicyFactory, StepFeedback,
                                  analytical_speedup, best_draft_length, expected_tokens, parse_draft_length)
from dspark.decode.sampling import warp_logits
from dspark.decode.types import DecodeResult, DecodeStats, GenerationConfig
from dspark.decode.verify import (VerifyResult, check_same_tokenizer, common_vocab_size, expected_acceptance,
                                  verify_greedy, verify_sampling)

__all__ = [
    "AcceptanceHead", "CrossTokenizerDecoder", "DecodeResult", "DecodeStats", "DraftLengthPolicy", "DraftPlan",
    "GenerationConfig", "PolicyContext", "PolicyFactory", "SpeculativeDecoder", "StepFeedback", "TokenConstraint",
    "TokenEvent", "VerifyResult", "analytical_speedup", "best_draft_length", "check_same_tokenizer",
    "common_vocab_size", "decoder_mode", "expected_acceptance", "expected_tokens", "has_acceptance_head",
    "load_acceptance_head", "make_decoder", "pair_compat", "parse_draft_length", "save_acceptance_head",
    "verify_greedy", "verify_sampling", "warp_logits",
]
