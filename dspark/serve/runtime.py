"""What the server serves: a decoder, its tokenizer, the model id clients name, and limits.

`runtime_from_bundle` loads the bundle through `dspark.bundle.verify.open_bundle`, which runs every
check `dspark verify-bundle` makes except its test decode (and, for a referenced target, the hash
of its weights: its revision is still compared).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dspark.errors import DsparkError


@dataclass
class ServeRuntime:
    """decoder: a dspark.decode.SpeculativeDecoder; tokenizer: the target's."""

    decoder: Any
    tokenizer: Any
    model_id: str
    context_length: int
    policy: str
    created: int = field(default_factory=lambda: int(time.time()))
    info: dict = field(default_factory=dict)

    def make_constraint(self, spec):
        """A fresh grammar constraint for one request (compiled grammars are cached by xgrammar)."""
        from dspark.decode.grammar import make_constraint

        stops = self.decoder.default_stop_ids or None
        return make_constraint(spec, self.tokenizer, self.decoder.vocab, stop_token_ids=stops,
                               device=self.decoder.device)

    @property
    def vocab_limit(self) -> int:
        """Prompt token ids must be below this (the smaller embedding of the pair)."""
        return int(self.decoder.embed_limit)


def runtime_from_bundle(bundle: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                        log: Callable[[str], None] | None = None) -> ServeRuntime:
    from dspark.bundle.verify import open_bundle

    opened = open_bundle(bundle, device=device, dtype=dtype, full_hash=False, log=log)
    manifest, target = opened.manifest, opened.target
    decoder = opened.decoder()  # with the acceptance head from where the bundle keeps it
    ctx = int(decoder.target.max_positions)
    if ctx <= 1:
        raise DsparkError(f"target context length {ctx} is too small to serve")
    info = {"target": manifest.target.name, "draft": manifest.draft.name,
            "device": target.device, "dtype": target.dtype, "metrics": manifest.metrics.measured()}
    return ServeRuntime(decoder=decoder, tokenizer=target.tokenizer, model_id=manifest.name, context_length=ctx,
                        policy=manifest.policy.draft_length, info=info)
