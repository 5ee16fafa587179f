"""Draft-length policies: how many tokens to draft next. A policy sees only statistics and draft
signals (never a model), one policy object per request, so rows of a batch adapt independently.

Per step the decoder asks `plan()` for a DraftPlan: at most `max_tokens` drafts, and early-exit
thresholds the decoder applies to the request's row after each drafted token:
- `min_confidence`: stop after a drafted token whose draft confidence is below it. Confidence is the
  draft's probability of the token it proposed (greedy: its max softmax probability at temperature 1;
  sampling: the probability of the sampled token under the draft's warped distribution).
- `min_acceptance`: stop once the product of the acceptance head's predicted acceptance
  probabilities of this step's drafts falls below it (needs an acceptance head).
The token that triggers a stop is still verified (its draft forward is already paid for).
After verification the decoder calls `observe(StepFeedback)` with the counts and measured costs.

Forms accepted by `parse_draft_length` (also the CLI's `--draft-length`):
- `K` or `static:K`: always K drafts (K >= 1).
- `confidence:T[:KMAX]`: draft up to KMAX (default 16) and stop when confidence < T (0 < T < 1).
- `goodput[:KMAX]`: per step choose K in 0..KMAX (default 12) maximising Leviathan's
  expected tokens per unit time E(K) / (K * c_draft + c_verify(B * (K + 1))), E(K) = (1 - a^(K+1)) / (1 - a)
  for a constant acceptance a, refined per draft position from this request's own counts (see
  GoodputPolicy), c_draft = measured seconds per draft forward, c_verify(n) = measured seconds of
  a verify forward over n tokens in all (a line fitted to the sizes seen; B = rows in the batch, so
  a large batch that is compute-bound drafts less). K = 0 (no drafts: a plain target step) wins
  when the draft does not pay for itself; then a probe step with the best K >= 1 every
  `probe_every` steps keeps the estimates fresh. Before the first measurement it drafts 4.
- `learned[:T]`: needs the draft's acceptance head (`acceptance_head.safetensors`); the goodput rule
  gives the cap and drafting stops once the predicted cumulative acceptance < T (default 0.5).
- `auto` (the default): `learned` when the draft carries an acceptance head, otherwise `goodput`
  with a confidence early exit at `AUTO_CONFIDENCE` (the cost model picks the cap; the exit trims
  steps where the draft itself is unsure). Without a draft model every form means target-only
  decoding.
Batches: when every row of a batch (B >= 2) runs an adaptive policy (`goodput`, `learned`, `auto`:
`BatchablePolicy`), the decoder's `BatchPlanner` picks one K for the whole batch, maximising the
batch's expected tokens per second sum_i E_i(K) / (K * c_draft(B) + c_verify(B * (K + 1))) from each
row's own acceptance curve E_i and the decoder's measured costs; each row then applies its own early
exits to it. Per-row choices combined by max would let the most optimistic row set K for everyone,
and rows probing out of phase would make a batch that should run target-only draft every other step.
Programmatic plug-ins: `parse_draft_length` (and the decoder's `draft_length`) also take any callable
PolicyContext -> DraftLengthPolicy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from dspark.errors import DsparkError

AUTO_CONFIDENCE = 0.3
DEFAULT_CONFIDENCE_KMAX = 16
DEFAULT_GOODPUT_KMAX = 12
DEFAULT_LEARNED_THRESHOLD = 0.5

VALID_FORMS = ("auto, K (an integer >= 1), static:K, confidence:T[:KMAX] (0 < T < 1), goodput[:KMAX], "
               "learned[:T]")


@dataclass(frozen=True)
class DraftPlan:
    """What to draft in the next step (see the module docstring for the thresholds)."""

    max_tokens: int
    min_confidence: float = 0.0
    min_acceptance: float = 0.0
    # in a batch that drafts more than this row asked for (another row wants more), verify those
    # extra drafts too: they are free (the batch pays for them anyway); a static K says no
    take_extra: bool = True


@dataclass(frozen=True)
class StepFeedback:
    """The outcome of one step for one request.

    drafted: drafts of this request that were verified; accepted: how many of them were accepted;
    draft_forwards / draft_s: draft forwards run in the step and their total seconds;
    verify_s: seconds of the step's target forward, over verify_width tokens per row (the batch's
    K + 1) and batch_rows rows. Times are shared by a batch's rows."""

    drafted: int
    accepted: int
    draft_forwards: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    verify_width: int = 0
    batch_rows: int = 1


@dataclass
class CostLine:
    """Measured seconds of a forward as a function of its size n (tokens, or rows): a running mean
    per size seen, and a least-squares line through them (slope >= 0). Before two sizes are seen the
    slope is `slope_prior` x the cost of size 1: t(n) = t(1) * (1 + slope_prior * (n - 1))."""

    momentum: float = 0.8
    slope_prior: float = 0.1
    points: dict = field(default_factory=dict)  # size -> running mean seconds

    @property
    def known(self) -> bool:
        return bool(self.points)

    def observe(self, n: int, seconds: float) -> None:
        if n <= 0 or seconds <= 0:
            return
        old = self.points.get(n)
        self.points[n] = seconds if old is None else self.momentum * old + (1 - self.momentum) * seconds

    def at(self, n: int) -> float:
        """Seconds of a forward of size n (needs `known`)."""
        pts = sorted(self.points.items())
        if len(pts) == 1:
            n0, t0 = pts[0]
            sp = self.slope_prior
            return t0 * (1 + sp * (n - 1)) / (1 + sp * (n0 - 1))
        n_mean = sum(m for m, _ in pts) / len(pts)
        t_mean = sum(t for _, t in pts) / len(pts)
        var = sum((m - n_mean) ** 2 for m, _ in pts)
        slope = max(sum((m - n_mean) * (t - t_mean) for m, t in pts) / var, 0.0)
        return max(t_mean + slope * (n - n_mean), 1e-9)


def batch_goodput(curves, draft_cost: Callable[[int], float], verify_cost: Callable[[int], float]) -> list[float]:
    """Expected tokens per second of a batch for K = 0..k_max.

    curves: B lists of k_max + 1 floats, curves[i][k] = row i's expected tokens from a step with k
    drafts (bonus included, so curves[i][0] = 1); draft_cost(B): seconds of one draft forward over
    the B rows; verify_cost(n): seconds of a verify forward over n = B * (K + 1) tokens.
    Returns rate[K] = sum_i curves[i][K] / (K * draft_cost(B) + verify_cost(B * (K + 1)))."""
    b = len(curves)
    if b == 0:
        return []
    k_max = min(len(c) for c in curves) - 1
    cd = draft_cost(b) if k_max > 0 else 0.0
    return [sum(c[k] for c in curves) / (k * cd + verify_cost(b * (k + 1))) for k in range(k_max + 1)]


@runtime_checkable
class BatchablePolicy(Protocol):
    """An adaptive policy that lets a batch planner choose K for it (see the module docstring)."""

    batchable: bool
    k_max: int

    def expected_curve(self, k_max: int) -> list[float]:
        """Expected tokens of a step with k = 0..k_max drafts for this request (bonus included)."""
        ...

    def batch_plan(self, k: int) -> "DraftPlan":
        """This request's plan when the batch drafts k (its own early exits applied to k)."""
        ...


@dataclass
class BatchPlanner:
    """One K for a batch of adaptive rows: the K in 0..k_max maximising `batch_goodput` over the rows'
    acceptance curves and this planner's measured costs (a decoder owns one: forward costs belong
    to the models and the machine, not to a request, so they carry over from batch to batch).
    K = 0 (a plain target step) competes; after `probe_every` steps at K = 0 one step drafts the best
    K >= 1, so the rows' acceptance keeps being measured. Before any cost is measured it drafts
    `initial_k`."""

    initial_k: int = 4
    probe_every: int = 16
    draft: CostLine = field(default_factory=lambda: CostLine(slope_prior=0.5))  # by rows
    verify: CostLine = field(default_factory=CostLine)  # by tokens (rows x width)
    zero_steps: int = field(default=0, init=False)

    def rates(self, curves) -> list[float]:
        return batch_goodput(curves, self.draft.at, self.verify.at)

    # what a GoodputPolicy inherits from (`GoodputPolicy.inherit_costs`): every new request starts
    # from the costs this decoder measured, not from a guess
    @property
    def draft_cost(self) -> float | None:
        return self.draft.at(1) if self.draft.known else None

    @property
    def verify_costs(self) -> dict:
        return dict(self.verify.points)

    rows = 1

    def choose(self, curves, k_max: int, allow_zero: bool = True) -> int:
        """curves: per row, expected tokens for k = 0..k_max (see batch_goodput)."""
        if not self.verify.known or (k_max > 0 and not self.draft.known):
            k = min(self.initial_k, k_max)
        else:
            rates = self.rates(curves)
            k = 1 if k_max >= 1 else 0
            for kk in range(2, k_max + 1):
                if rates[kk] > rates[k] * (1 + 1e-9):
                    k = kk
            zero_wins = allow_zero and rates[0] > rates[k] * (1 + 1e-9) and self.zero_steps < self.probe_every
            if k_max == 0 or zero_wins:
                k = 0
        self.zero_steps = self.zero_steps + 1 if k == 0 else 0
        return k

    def observe(self, rows: int, width: int, draft_forwards: int, draft_s: float, verify_s: float) -> None:
        """One step's measurements: `draft_forwards` draft forwards over `rows` rows took draft_s in all;
        the verify forward over rows x width tokens took verify_s."""
        if draft_forwards > 0:
            self.draft.observe(rows, draft_s / draft_forwards)
        self.verify.observe(rows * width, verify_s)


@dataclass(frozen=True)
class PolicyContext:
    """What a factory may know when it builds a policy."""

    has_draft: bool = True
    has_acceptance_head: bool = False


@runtime_checkable
class DraftLengthPolicy(Protocol):
    name: str

    def plan(self) -> DraftPlan: ...

    def observe(self, feedback: StepFeedback) -> None: ...


def expected_tokens(a: float, k: int) -> float:
    """Expected tokens per verify step with k drafts of i.i.d. acceptance a (bonus included):
    (1 - a^(k+1)) / (1 - a)."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def analytical_speedup(a: float, k: int, c: float, v: float = 1.0) -> float:
    """Leviathan et al.'s speedup over target-only decoding: E(a, k) / (k * c + v).

    c: draft forward cost / target forward cost; v: verify forward cost / target decode-step cost."""
    return expected_tokens(a, k) / (k * c + v)


def best_draft_length(a: float, draft_cost: float, verify_cost: float, k_max: int, k_min: int = 1) -> int:
    """argmax over k in [k_min, k_max] of E(a, k) / (k * draft_cost + verify_cost) (smallest k on ties)."""
    best_k, best = k_min, -1.0
    for k in range(k_min, k_max + 1):
        rate = expected_tokens(a, k) / (k * draft_cost + verify_cost)
        if rate > best * (1 + 1e-9):
            best_k, best = k, rate
    return best_k


@dataclass
class StaticPolicy:
    k: int
    name: str = "static"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DsparkError(f"draft length K must be >= 1, got {self.k}")

    def plan(self) -> DraftPlan:
        return DraftPlan(self.k, take_extra=False)  # exactly K: what a user measuring K asks for

    def observe(self, feedback: StepFeedback) -> None:
        pass


@dataclass
class ConfidencePolicy:
    threshold: float
    k_max: int = DEFAULT_CONFIDENCE_KMAX
    name: str = "confidence"

    def __post_init__(self) -> None:
        _check_threshold("confidence", self.threshold)
        _check_kmax(self.k_max)

    def plan(self) -> DraftPlan:
        return DraftPlan(self.k_max, min_confidence=self.threshold)

    def observe(self, feedback: StepFeedback) -> None:
        pass


@dataclass
class GoodputPolicy:
    """Choose K per step to maximise expected tokens per second for THIS request.

    Model (Leviathan et al., refined with what the request has measured):
    - acceptance: per draft position j, the conditional acceptance a_j = P(accept j | accepted < j),
      estimated from this request's own counts and shrunk towards the request's pooled per-token
      rate (itself shrunk towards `prior_acceptance`); E(K) = 1 + sum_{k<=K} prod_{j<k} a_j. With
      a constant a this is (1 - a^(K+1)) / (1 - a).
    - cost: K * c_draft + c_verify(B * (K + 1)), c_draft the running mean seconds per draft forward
      and c_verify(n) a line fitted to the running mean verify seconds at each size n (tokens in
      the forward: batch rows x width) seen so far (before two sizes are seen, the slope is
      `verify_slope_prior` x the cost of one token); B = the rows of the last step's batch.
    - K = 0 (target only: 1 token per c_verify(B)) competes when `allow_zero`; after `probe_every`
      steps at K = 0 one step drafts the best K >= 1, so acceptance and costs keep being measured.
    """

    k_max: int = DEFAULT_GOODPUT_KMAX
    min_confidence: float = 0.0
    prior_acceptance: float = 0.6
    prior_weight: float = 4.0
    initial_k: int = 4
    cost_momentum: float = 0.8
    verify_slope_prior: float = 0.1
    allow_zero: bool = True
    probe_every: int = 16
    name: str = "goodput"
    rows: int = field(default=1, init=False)
    zero_steps: int = field(default=0, init=False)
    accepted: int = field(default=0, init=False)
    rejections: int = field(default=0, init=False)
    draft_cost: float | None = field(default=None, init=False)
    verify_costs: dict = field(default_factory=dict, init=False)  # tokens (rows x (K + 1)) -> mean seconds
    position_trials: list = field(default_factory=list, init=False)
    position_accepts: list = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        _check_kmax(self.k_max)

    @property
    def acceptance(self) -> float:
        """Pooled per-token acceptance: each verified draft up to and including the first rejection is
        a Bernoulli trial (the drafts after a rejection were never judged)."""
        return ((self.accepted + self.prior_acceptance * self.prior_weight)
                / (self.accepted + self.rejections + self.prior_weight))

    def position_acceptance(self, j: int) -> float:
        pooled = self.acceptance
        if j >= len(self.position_trials):
            return pooled
        w = self.prior_weight
        return (self.position_accepts[j] + pooled * w) / (self.position_trials[j] + w)

    @property
    def verify_cost(self) -> float | None:
        return self.verify_cost_at(2) if self.verify_costs else None

    def verify_cost_at(self, width: int) -> float:
        """Seconds of a verify forward over `width` tokens in all (rows x K + 1): the CostLine through
        this request's measured sizes."""
        return CostLine(slope_prior=self.verify_slope_prior, points=self.verify_costs).at(width)

    def expected_tokens(self, k: int) -> float:
        total, reach = 1.0, 1.0
        for j in range(k):
            reach *= self.position_acceptance(j)
            total += reach
        return total

    batchable: bool = field(default=True, init=False)

    def expected_curve(self, k_max: int) -> list[float]:
        """E(0..k_max) for this request; flat beyond its own k_max (its cap)."""
        out, total, reach = [1.0], 1.0, 1.0
        for j in range(k_max):
            if j < self.k_max:
                reach *= self.position_acceptance(j)
                total += reach
            out.append(total)
        return out

    def batch_plan(self, k: int) -> DraftPlan:
        return DraftPlan(k, min_confidence=self.min_confidence)

    def inherit_costs(self, other: "GoodputPolicy | BatchPlanner") -> None:
        """Start from another request's measured forward costs (a row joining a running batch: the
        costs are the batch's, and without them the first step would draft `initial_k` for the whole
        batch), or from a decoder's BatchPlanner (costs measured by earlier batches). Acceptance
        stays this request's own."""
        if other.draft_cost is not None and self.draft_cost is None and not self.verify_costs:
            self.draft_cost = other.draft_cost
            self.verify_costs = dict(other.verify_costs)
            self.rows = other.rows

    def rates(self) -> list[float]:
        """Expected tokens per second for K = 0..k_max (needs measured costs)."""
        b = self.rows
        out = [1.0 / self.verify_cost_at(b)]
        e, reach = 1.0, 1.0
        for k in range(1, self.k_max + 1):
            reach *= self.position_acceptance(k - 1)
            e += reach
            out.append(e / (k * self.draft_cost + self.verify_cost_at(b * (k + 1))))
        return out

    def choose_k(self) -> int:
        """The K to draft next (0: a plain target step)."""
        if self.draft_cost is None or not self.verify_costs:
            return min(self.initial_k, self.k_max)
        rates = self.rates()
        best_k = 1
        for k in range(2, self.k_max + 1):
            if rates[k] > rates[best_k] * (1 + 1e-9):
                best_k = k
        if self.allow_zero and rates[0] > rates[best_k] * (1 + 1e-9):
            if self.zero_steps < self.probe_every:
                return 0
        return best_k

    def plan(self) -> DraftPlan:
        k = self.choose_k()
        self.zero_steps = self.zero_steps + 1 if k == 0 else 0
        return DraftPlan(k, min_confidence=self.min_confidence)

    def observe(self, feedback: StepFeedback) -> None:
        d, a = feedback.drafted, feedback.accepted
        self.accepted += a
        self.rejections += int(a < d)
        judged = min(d, a + 1)
        while len(self.position_trials) < judged:
            self.position_trials.append(0)
            self.position_accepts.append(0)
        for j in range(judged):
            self.position_trials[j] += 1
            self.position_accepts[j] += int(j < a)
        m = self.cost_momentum
        if feedback.draft_forwards > 0:
            per = feedback.draft_s / feedback.draft_forwards
            self.draft_cost = per if self.draft_cost is None else m * self.draft_cost + (1 - m) * per
        self.rows = max(feedback.batch_rows, 1)
        if feedback.verify_s > 0 and feedback.verify_width > 0:
            w, v = feedback.verify_width * self.rows, feedback.verify_s
            old = self.verify_costs.get(w)
            self.verify_costs[w] = v if old is None else m * old + (1 - m) * v


@dataclass
class LearnedPolicy:
    """Stop drafting where the acceptance head's predicted cumulative acceptance drops below `threshold`;
    a goodput policy (with a higher cap) bounds the step."""

    threshold: float = DEFAULT_LEARNED_THRESHOLD
    k_max: int = 16
    fixed_cap: int | None = None  # programmatic use: a fixed cap instead of the goodput one
    name: str = "learned"
    cap: GoodputPolicy = field(init=False)

    def __post_init__(self) -> None:
        _check_threshold("learned", self.threshold)
        _check_kmax(self.k_max)
        if self.fixed_cap is not None:
            _check_kmax(self.fixed_cap)
        self.cap = GoodputPolicy(k_max=self.k_max, initial_k=8)

    def plan(self) -> DraftPlan:
        k = self.fixed_cap if self.fixed_cap is not None else self.cap.choose_k()
        return DraftPlan(k, min_acceptance=self.threshold)

    @property
    def batchable(self) -> bool:
        return self.fixed_cap is None

    def expected_curve(self, k_max: int) -> list[float]:
        return self.cap.expected_curve(k_max)

    def batch_plan(self, k: int) -> DraftPlan:
        return DraftPlan(k, min_acceptance=self.threshold)

    def observe(self, feedback: StepFeedback) -> None:
        self.cap.observe(feedback)

    def inherit_costs(self, other) -> None:
        self.cap.inherit_costs(getattr(other, "cap", other))


@dataclass(frozen=True)
class PolicyFactory:
    """A parsed `--draft-length` value: call it with a PolicyContext to get one policy per request."""

    spec: str
    kind: str
    args: tuple = ()

    def check(self, ctx: PolicyContext) -> None:
        """Raise DsparkError if this policy cannot run in `ctx` (e.g. `learned` without a head)."""
        if self.kind == "learned" and ctx.has_draft and not ctx.has_acceptance_head:
            raise DsparkError("draft length 'learned' needs an acceptance head in the draft folder "
                              "(acceptance_head.json + acceptance_head.safetensors, written by distillation); "
                              "use auto, goodput, confidence:T or K instead")

    def resolved_kind(self, ctx: PolicyContext) -> str:
        """The policy `auto` stands for in `ctx` (other kinds name themselves)."""
        if self.kind != "auto":
            return self.kind
        return "learned" if ctx.has_acceptance_head else "goodput+confidence"

    def __call__(self, ctx: PolicyContext = PolicyContext()) -> DraftLengthPolicy:
        self.check(ctx)
        if self.kind == "static":
            return StaticPolicy(*self.args)
        if self.kind == "confidence":
            return ConfidencePolicy(*self.args)
        if self.kind == "goodput":
            return GoodputPolicy(*self.args)
        if self.kind == "learned":
            return LearnedPolicy(*self.args)
        # auto
        if ctx.has_acceptance_head:
            pol = LearnedPolicy()
            pol.name = "auto(learned)"
            return pol
        return GoodputPolicy(min_confidence=AUTO_CONFIDENCE, name="auto(goodput)")


def _check_threshold(kind: str, t: float) -> None:
    if not (0.0 < t < 1.0) or math.isnan(t):
        raise DsparkError(f"{kind} threshold must be in (0, 1), got {t}")


def _check_kmax(k: int) -> None:
    if k < 1:
        raise DsparkError(f"draft length K must be >= 1, got {k}")


def _int(text: str, spec: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text.strip()):
        raise DsparkError(f"draft length {spec!r}: {text!r} is not an integer; valid forms: {VALID_FORMS}")
    k = int(text)
    if k < 1:
        raise DsparkError(f"draft length K must be >= 1, got {k} (in {spec!r})")
    return k


def _float(text: str, spec: str, kind: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise DsparkError(f"draft length {spec!r}: {text!r} is not a number; valid forms: {VALID_FORMS}") from None
    _check_threshold(kind, t)
    return t


def _parse_static(spec: str, args: list[str]) -> tuple:
    if len(args) != 1:
        raise DsparkError(f"draft length {spec!r}: static needs one value, static:K; valid forms: {VALID_FORMS}")
    return (_int(args[0], spec),)


def _parse_confidence(spec: str, args: list[str]) -> tuple:
    if len(args) not in (1, 2):
        raise DsparkError(f"draft length {spec!r}: use confidence:T or confidence:T:KMAX; valid forms: {VALID_FORMS}")
    t = _float(args[0], spec, "confidence")
    return (t, _int(args[1], spec)) if len(args) == 2 else (t,)


def _parse_goodput(spec: str, args: list[str]) -> tuple:
    if len(args) > 1:
        raise DsparkError(f"draft length {spec!r}: use goodput or goodput:KMAX; valid forms: {VALID_FORMS}")
    return (_int(args[0], spec),) if args else ()


def _parse_learned(spec: str, args: list[str]) -> tuple:
    if len(args) > 1:
        raise DsparkError(f"draft length {spec!r}: use learned or learned:T; valid forms: {VALID_FORMS}")
    return (_float(args[0], spec, "learned"),) if args else ()


def _parse_auto(spec: str, args: list[str]) -> tuple:
    if args:
        raise DsparkError(f"draft length {spec!r}: auto takes no value; valid forms: {VALID_FORMS}")
    return ()


POLICY_PARSERS: dict[str, Callable[[str, list[str]], tuple]] = {
    "auto": _parse_auto,
    "static": _parse_static,
    "confidence": _parse_confidence,
    "goodput": _parse_goodput,
    "learned": _parse_learned,
}


@dataclass(frozen=True)
class CustomPolicyFactory:
    """Wraps a user callable PolicyContext -> DraftLengthPolicy (a plug-in policy)."""

    make: Callable[[PolicyContext], DraftLengthPolicy]
    spec: str = "custom"
    kind: str = "custom"

    def check(self, ctx: PolicyContext) -> None:
        pass

    def resolved_kind(self, ctx: PolicyContext) -> str:
        return self.kind

    def __call__(self, ctx: PolicyContext = PolicyContext()) -> DraftLengthPolicy:
        pol = self.make(ctx)
        if not isinstance(pol, DraftLengthPolicy):
            raise DsparkError(f"custom draft-length factory returned {type(pol).__name__}, not a DraftLengthPolicy "
                              "(needs name, plan(), observe())")
        return pol


def parse_draft_length(spec) -> PolicyFactory | CustomPolicyFactory:
    """Parse a draft-length form (see the module docstring) into a PolicyFactory. A PolicyFactory is
    returned as is; any other callable (PolicyContext -> DraftLengthPolicy) is wrapped as a plug-in.

    Raises DsparkError naming the bad value and listing the valid forms."""
    if isinstance(spec, (PolicyFactory, CustomPolicyFactory)):
        return spec
    if callable(spec) and not isinstance(spec, (str, int)):
        return CustomPolicyFactory(spec)
    if isinstance(spec, bool):
        raise DsparkError(f"bad draft length {spec!r}; valid forms: {VALID_FORMS}")
    if isinstance(spec, int):
        return PolicyFactory(str(spec), "static", (_int(str(spec), str(spec)),))
    if not isinstance(spec, str):
        raise DsparkError(f"bad draft length {spec!r}; valid forms: {VALID_FORMS}")
    text = spec.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return PolicyFactory(text, "static", (_int(text, spec),))
    kind, *args = text.split(":")
    parser = POLICY_PARSERS.get(kind.strip().lower())
    if parser is None:
        raise DsparkError(f"unknown draft length {spec!r}; valid forms: {VALID_FORMS}")
    kind = kind.strip().lower()
    return PolicyFactory(text, kind, parser(spec, [a.strip() for a in args]))
