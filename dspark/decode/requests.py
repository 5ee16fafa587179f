"""Request validation shared by the decoders (same rules and messages for every decoder): prompts,
per-prompt configs and draft-length policies."""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.decode.policy import CustomPolicyFactory, DraftLengthPolicy, PolicyContext, PolicyFactory, parse_draft_length
from dspark.decode.types import GenerationConfig
from dspark.errors import DsparkError


def check_prompts(prompts, context: int, embed_limit: int) -> list[list[int]]:
    """Token-id prompts (lists or tensors) -> lists; each non-empty, shorter than `context`, with ids
    in [0, embed_limit). Raises DsparkError naming the prompt and the bad value."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise DsparkError("prompts must be a list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.reshape(-1).tolist()
        p = list(p)
        if not p:
            raise DsparkError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")
        if len(p) >= context:
            raise DsparkError(f"prompt {i} has {len(p)} tokens; the target's context is {context} tokens, "
                              f"so a prompt may have at most {context - 1}")
        bad = [t for t in p if not isinstance(t, int) or t < 0 or t >= embed_limit]
        if bad:
            raise DsparkError(f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {embed_limit})")
        out.append(p)
    return out


def per_prompt_configs(config, n: int) -> list[GenerationConfig]:
    """One GenerationConfig for all prompts, or one each."""
    if isinstance(config, GenerationConfig):
        return [config] * n
    configs = list(config)
    if len(configs) != n:
        raise DsparkError(f"got {len(configs)} generation configs for {n} prompts")
    return configs


def make_policies(default_factory, context: PolicyContext, draft_length, n: int) -> list[DraftLengthPolicy]:
    """One fresh policy per prompt: `default_factory` when draft_length is None, else the form given
    (one for all, or one per prompt); each form is checked against `context` first."""
    if draft_length is None:
        factories = [default_factory] * n
    elif isinstance(draft_length, (list, tuple)):
        if len(draft_length) != n:
            raise DsparkError(f"got {len(draft_length)} draft lengths for {n} prompts")
        factories = [parse_draft_length(d) for d in draft_length]
    else:
        factories = [parse_draft_length(draft_length)] * n
    for f in set(factories):
        f.check(context)
    return [f(context) for f in factories]


def check_constraints(constraints, n: int) -> list:
    """None (no constraints) or one TokenConstraint-or-None per prompt -> a list of n."""
    from dspark.decode.constraints import TokenConstraint

    constraints = [None] * n if constraints is None else list(constraints)
    if len(constraints) != n:
        raise DsparkError(f"got {len(constraints)} constraints for {n} prompts")
    for i, c in enumerate(constraints):
        if c is not None and not isinstance(c, TokenConstraint):
            raise DsparkError(f"constraint {i} ({type(c).__name__}) lacks allowed/advance/rollback/is_finished")
    return constraints


def collect_results(events, n: int, on_tokens=None) -> list:
    """Drain a decoder's TokenEvent stream into one DecodeResult per prompt (input order), calling
    on_tokens(row, new_ids) as tokens are committed."""
    results: list = [None] * n
    for ev in events:
        if on_tokens is not None and ev.token_ids:
            on_tokens(ev.row, ev.token_ids)
        if ev.result is not None:
            results[ev.row] = ev.result
    return results


def stop_ids_for(cfg: GenerationConfig, default: tuple[int, ...]) -> tuple[int, ...]:
    """A request's stop ids: its own, else none with ignore_eos, else the decoder's default."""
    if cfg.stop_token_ids:
        return cfg.stop_token_ids
    return () if cfg.ignore_eos else default


def timed_call(device: torch.device, fn, *args):
    """(fn(*args), seconds), synchronising CUDA before and after so GPU time is counted."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def checked_policy_factory(draft_length, context: PolicyContext) -> PolicyFactory | CustomPolicyFactory:
    """A decoder's draft length parsed and checked against what the decoder can run (`context`);
    raises DsparkError (e.g. `learned` without an acceptance head)."""
    factory = parse_draft_length(draft_length)
    factory.check(context)
    return factory


def resolve_stop_ids(stop_token_ids, tokenizer, model) -> tuple[int, ...]:
    """A decoder's default stop ids: the ones given, else `default_stop_ids`."""
    if stop_token_ids is not None:
        return tuple(int(t) for t in stop_token_ids)
    return default_stop_ids(tokenizer, model)


def default_stop_ids(tokenizer, model) -> tuple[int, ...]:
    """The stop ids of requests that name none: the tokenizer's eos and the model's generation_config
    eos (either may be an int or a list), deduplicated in order."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (eos, gen_eos):
        if isinstance(e, int):
            ids.append(e)
        elif isinstance(e, (list, tuple)):
            ids.extend(int(x) for x in e)
    return tuple(dict.fromkeys(ids))
