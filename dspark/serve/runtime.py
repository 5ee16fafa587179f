"""What the server serves: a decoder, its tokenizer, the model id clients name, and limits.

`runtime_from_bundle` checks the bundle before loading it (schema, file hashes, the target's
revision, tokenizer fingerprints; the full decode check is `dspark verify-bundle`'s job).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    from dspark.bundle.manifest import read_manifest
    from dspark.bundle.verify import check_files, check_target_identity, load_pair
    from dspark.decode import make_decoder

    log = log or (lambda _m: None)
    bundle = Path(bundle).expanduser()
    manifest = read_manifest(bundle)
    log(f"checking {len(manifest.files)} files of {bundle}")
    check_files(bundle, manifest)
    identity = check_target_identity(bundle, manifest, full_hash=False)
    log(f"loading target {identity['source']} and draft {manifest.draft.name}")
    target, draft = load_pair(bundle, manifest, device, dtype)
    decoder = make_decoder(target.model, draft.model, target.tokenizer, manifest.policy.draft_length,
                           draft_tokenizer=draft.tokenizer)
    ctx = int(decoder.target.max_positions)
    if ctx <= 1:
        raise DsparkError(f"target context length {ctx} is too small to serve")
    info = {"target": manifest.target.name, "draft": manifest.draft.name,
            "device": target.device, "dtype": target.dtype, "metrics": manifest.metrics.measured()}
    return ServeRuntime(decoder=decoder, tokenizer=target.tokenizer, model_id=manifest.name, context_length=ctx,
                        policy=manifest.policy.draft_length, info=info)
