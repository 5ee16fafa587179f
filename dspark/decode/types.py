"""The decoder's shared vocabulary: generation settings, per-request statistics, results.

Terms (used everywhere in dspark, defined once here):
- drafted: tokens the draft proposed and the target verified.
- accepted: drafted tokens the target kept (greedy: equal to the target's argmax; sampling: kept
  with probability min(1, p(x)/q(x))).
- recovered: the token the target emits at the first rejection (greedy: its argmax; sampling: a
  sample from norm(max(0, p - q))).
- bonus: the extra token sampled from the target when every drafted token was accepted.
- target forward: one call of the target (prefill counts as one; each verify step counts as one).
Every verify step emits accepted + exactly one recovered-or-bonus token, so
    mean accepted tokens = (accepted + recovered + bonus) / verify steps
includes the bonus (vLLM's convention) and target-only decoding scores exactly 1.0.
acceptance rate = accepted / drafted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from dspark.errors import DsparkError


# Seeds are non-negative signed 64-bit integers (what every torch device's generator accepts as given).
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class GenerationConfig:
    """Per-request settings. temperature == 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # True: only `stop_token_ids` end a request (the tokenizer's / model's eos does not), e.g. for
    # fixed-length benchmarks. False: stop_token_ids, or when empty the decoder's default eos ids.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise DsparkError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise DsparkError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise DsparkError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DsparkError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            raise DsparkError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise DsparkError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class DecodeStats:
    """Counters for one request (or, merged, for many). Times are seconds of wall clock."""

    target_forwards: int = 0
    draft_forwards: int = 0
    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    recovered: int = 0
    bonus: int = 0
    generated: int = 0
    prompt_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    target_time_s: float = 0.0
    draft_time_s: float = 0.0
    total_time_s: float = 0.0
    # how drafts were verified: "same-tokenizer" (draft ids are target ids) or "cross-tokenizer"
    # (dspark.decode.cross: drafts re-tokenized through text; drafted / accepted count target tokens)
    mode: str = "same-tokenizer"

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        emitted = self.accepted + self.recovered + self.bonus
        return emitted / self.verify_steps if self.verify_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.total_time_s if self.total_time_s > 0 else 0.0

    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def record_position(self, position: int, accepted: bool) -> None:
        while len(self.drafted_per_position) <= position:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        self.drafted_per_position[position] += 1
        self.accepted_per_position[position] += int(accepted)

    def record_step(self, c: "StepCommit", verify_s: float, draft_forwards: int, draft_s: float) -> None:
        """Count one verify step of this request (its commit `c` and the step's forward costs)."""
        if c.extra == "bonus":
            self.bonus += 1
        elif c.extra == "recovered":
            self.recovered += 1
        self.drafted += c.drafted
        self.accepted += c.accepted
        for j in range(c.drafted):
            self.record_position(j, j < c.accepted)
        self.verify_steps += 1
        self.target_forwards += 1
        self.target_time_s += verify_s
        self.draft_forwards += draft_forwards
        self.draft_time_s += draft_s

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        out = DecodeStats()
        # an empty accumulator (DecodeStats()) takes the mode of what is merged into it
        empty = not (self.verify_steps or self.generated or self.target_forwards)
        out.mode = other.mode if empty or self.mode == other.mode else "mixed"
        for name in ("target_forwards", "draft_forwards", "verify_steps", "drafted", "accepted",
                     "recovered", "bonus", "generated", "prompt_tokens", "target_time_s",
                     "draft_time_s", "total_time_s"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        n = max(len(self.drafted_per_position), len(other.drafted_per_position))
        pad = lambda xs: xs + [0] * (n - len(xs))  # noqa: E731
        out.drafted_per_position = [a + b for a, b in zip(pad(self.drafted_per_position), pad(other.drafted_per_position))]
        out.accepted_per_position = [a + b for a, b in zip(pad(self.accepted_per_position), pad(other.accepted_per_position))]
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted_tokens=self.mean_accepted_tokens,
                 tokens_per_s=self.tokens_per_s)
        return d


# "dead_end": an output constraint (grammar) allowed no next token before the output was complete:
# the text so far does not match it (e.g. the grammar needs a character no token can produce).
FinishReason = Literal["stop", "length", "dead_end"]


@dataclass(frozen=True)
class StepCommit:
    """What one verify step commits for one request (see `commit_step`)."""

    tokens: list[int]    # emitted this step: accepted drafts, then the recovered / bonus token
    accepted: int        # drafts among `tokens`
    drafted: int         # drafts that count as drafted (those after an accepted stop token do not)
    extra: str | None    # "bonus", "recovered", or None when no target token was emitted
    stopped: bool        # a stop token ended the block


def commit_step(accepted_drafts: list[int], k: int, next_token: int | None, stops) -> StepCommit:
    """The block a row emits after verification: its n = len(accepted_drafts) accepted drafts (of k
    verified), then `next_token` (recovered when n < k, bonus when n == k; None: nothing may follow,
    e.g. a grammar allows no token), cut after the first stop token. If a stop token is accepted
    mid-block, the drafts after it never mattered: they count as neither drafted nor accepted, so
    accepted + recovered + bonus == generated always."""
    n = len(accepted_drafts)
    block = list(accepted_drafts) + ([next_token] if next_token is not None else [])
    cut = next((i for i, t in enumerate(block) if t in stops), None)
    if cut is not None:
        block = block[: cut + 1]
    accepted = min(n, len(block))
    extra = None if len(block) == accepted else ("bonus" if n == k else "recovered")
    drafted = k if cut is None or cut >= n else accepted
    return StepCommit(block, accepted, drafted, extra, cut is not None)


@dataclass
class DecodeResult:
    """One request's output: generated ids only (prompt excluded), why it ended, its stats."""

    token_ids: list[int]
    finish_reason: FinishReason
    stats: DecodeStats
