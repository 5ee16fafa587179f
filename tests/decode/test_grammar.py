"""Grammar constraints (dspark.decode.grammar) with real tokenizers and real tiny models.

The generation tests run the reference constrained greedy loop (mask the target's logits with
allowed(), argmax, advance) and check the decoded text against the grammar with independent
code (json + hand-written schema checks, `re.fullmatch`, a hand-written parser for the EBNF).
Grammars whose outputs are bounded (maxLength strings, bounded integers, enums, maxItems, fixed
repetition counts) are used where the test needs the model to finish: termination then does not
depend on how well the tiny models were trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dspark.decode.constraints import TokenConstraint
from dspark.decode.grammar import (
    GrammarCompilerCache,
    GrammarSpec,
    XGrammarConstraint,
    apply_mask,
    constrained_greedy_reference,
    default_compiler_cache,
    grammar_from_options,
    make_constraint,
    unpack_bitmask,
)
from dspark.errors import DsparkError

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
TINY_DRAFT = REPO / "dspark" / "models" / "builtin" / "tiny-code-draft-s"

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K missing")
needs_tiny = pytest.mark.skipif(not TINY_DRAFT.is_dir(), reason="tiny-code-draft-s not built yet")

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "scores", "ok"],
}

# Arithmetic in parentheses: bounded, recursive-free, and checkable by the regex below.
EXPR_EBNF = 'root ::= "(" num op num ")"\nnum ::= [0-9] | [1-9] [0-9]\nop ::= " + " | " * "\n'
EXPR_RE = r"\((0|[1-9][0-9]?) [+*] (0|[1-9][0-9]?)\)"


def validate_person(obj) -> None:
    """A hand-written check of PERSON_SCHEMA (no jsonschema dependency)."""
    assert isinstance(obj, dict)
    assert set(obj) == {"name", "age", "pet", "scores", "ok"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    assert obj["pet"] in ("cat", "dog", "fish")
    assert isinstance(obj["scores"], list) and len(obj["scores"]) <= 3
    assert all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 9 for s in obj["scores"])
    assert isinstance(obj["ok"], bool)


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def stories():
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260K missing")
    return _load(STORIES)


@pytest.fixture(scope="module")
def tiny():
    if not TINY_DRAFT.is_dir():
        pytest.skip("tiny-code-draft-s not built yet")
    return _load(TINY_DRAFT)


@pytest.fixture(scope="module", params=["stories", "tiny"])
def real(request):
    """(tokenizer, model, prompt) for each real model: SentencePiece byte-fallback and byte-level BPE."""
    tok, model = request.getfixturevalue(request.param)
    prompt = "Once upon a time" if request.param == "stories" else "def add(a, b):\n"
    return tok, model, prompt


def generate(tok, model, prompt: str, spec: GrammarSpec, max_new_tokens: int):
    c = make_constraint(spec, tok, model.config.vocab_size)
    ids = constrained_greedy_reference(model, tok(prompt)["input_ids"], c, max_new_tokens)
    return c, ids


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Generation with real models


def test_json_schema_output_parses_and_validates(real):
    tok, model, prompt = real
    c, ids = generate(tok, model, prompt, GrammarSpec.from_json_schema(PERSON_SCHEMA), 160)
    assert c.is_finished(), text_of(tok, ids)
    assert ids[-1] == tok.eos_token_id
    validate_person(json.loads(text_of(tok, ids)))


def test_regex_output_matches(real):
    tok, model, prompt = real
    c, ids = generate(tok, model, prompt, GrammarSpec.from_regex(r"[0-9]{3}-[a-z]+"), 24)
    # `[a-z]+` never forces an end, so the tiny models run to the budget; every prefix past
    # "ddd-x" is a full match, which is what the grammar guarantees here.
    assert re.fullmatch(r"[0-9]{3}-[a-z]+", text_of(tok, ids))
    assert c.is_complete()
    assert c.allowed()[tok.eos_token_id]


def test_bounded_regex_ends_with_the_stop_token(real):
    tok, model, prompt = real
    c, ids = generate(tok, model, prompt, GrammarSpec.from_regex(r"[0-9]{3}-[a-z]{2,4}"), 40)
    assert c.is_finished() and ids[-1] == tok.eos_token_id
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text_of(tok, ids))
    # once finished, only the stop token is allowed (a finished row never gets an all -inf mask)
    assert c.allowed().nonzero().flatten().tolist() == [tok.eos_token_id]
    with pytest.raises(ValueError, match="after the grammar finished"):
        c.advance(tok.eos_token_id)


def test_ebnf_output_matches(real):
    tok, model, prompt = real
    c, ids = generate(tok, model, prompt, GrammarSpec.from_ebnf(EXPR_EBNF), 40)
    assert c.is_finished()
    assert re.fullmatch(EXPR_RE, text_of(tok, ids)), text_of(tok, ids)


@needs_tiny
def test_json_object_output_parses_as_an_object(tiny):
    tok, model = tiny
    c, ids = generate(tok, model, "config = ", GrammarSpec.json_object(), 120)
    assert c.is_finished(), text_of(tok, ids)
    assert isinstance(json.loads(text_of(tok, ids)), dict)


@needs_stories
def test_constraint_changes_the_output(stories):
    """The mask is doing the work: the model's own first choice is not JSON, the masked one is "{"."""
    tok, model = stories
    prompt_ids = tok("Once upon a time")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    c = make_constraint(GrammarSpec.from_json_schema(PERSON_SCHEMA), tok, model.config.vocab_size)
    assert not c.allowed()[int(logits.argmax())]
    first = int(apply_mask(logits, c.allowed()).argmax())
    assert text_of(tok, [first]) == "{"


# ---------------------------------------------------------------------------------------------
# Masks: known strings, special tokens, padded vocabularies


def byte_tokens(tok, text: str) -> list[int]:
    """stories260K's byte-fallback tokens spelling `text` one byte per token."""
    vocab = tok.get_vocab()
    return [vocab[f"<0x{b:02X}>"] for b in text.encode("utf-8")]


@needs_stories
@pytest.mark.parametrize(
    "text, ok",
    [
        ('{"a": [1, 2.5, {"b": null}], "c": "x\\ty", "d": true}', True),
        ("{}", True),
        ("[1, 2]", False),  # an array is JSON but not a JSON object
        ('{"a" : 1}', False),  # any_whitespace=False pins the separators
    ],
)
def test_json_object_accepts_objects_token_by_token(stories, text, ok):
    tok, model = stories
    c = make_constraint(GrammarSpec.json_object(), tok, model.config.vocab_size)
    path = byte_tokens(tok, text)
    for i, t in enumerate(path):
        allowed = bool(c.allowed()[t])
        if not allowed:
            assert not ok, f"byte {i} of {text!r} refused"
            with pytest.raises(ValueError, match="not allowed"):
                c.advance(t)
            return
        assert not c.allowed()[tok.eos_token_id], "stop allowed inside an unfinished object"
        c.advance(t)
    assert ok, f"{text!r} was accepted"
    assert c.is_complete() and not c.is_finished()
    assert c.allowed()[tok.eos_token_id]
    c.advance(tok.eos_token_id)
    assert c.is_finished()


@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_special_tokens_are_never_allowed_but_stop_is(which, request):
    tok, model = request.getfixturevalue(which)
    c = make_constraint(GrammarSpec.from_regex(r"[^\n]*"), tok, model.config.vocab_size)
    mask = c.allowed()
    specials = set(tok.all_special_ids) - {tok.eos_token_id}
    assert specials and not any(mask[i] for i in specials)
    assert mask[tok.eos_token_id]  # the empty string already matches
    assert mask.sum() > len(tok) // 2  # free text: most ordinary tokens


@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_padded_vocab_masks_have_the_model_size(which, request):
    tok, model = request.getfixturevalue(which)
    padded = len(tok) + 37  # not a multiple of 32: exercises the last bitmask word
    c = make_constraint(GrammarSpec.from_regex(r"[^\n]*"), tok, padded)
    mask = c.allowed()
    assert mask.shape == (padded,) and mask.dtype == torch.bool
    assert not mask[len(tok):].any()
    assert mask[: len(tok)].any()


@needs_stories
def test_padded_logits_never_win(stories):
    """A model whose lm_head is padded and whose padded logits are huge still emits grammar tokens."""
    tok, model = stories
    pad = 40

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, **kwargs):
            out = self.inner(ids, **kwargs)
            huge = torch.full((*out.logits.shape[:-1], pad), 1e9)
            out.logits = torch.cat([out.logits, huge], dim=-1)
            return out

    vocab = model.config.vocab_size + pad
    c = make_constraint(GrammarSpec.from_regex(r"[0-9]{3}-[a-z]{2,4}"), tok, vocab)
    ids = constrained_greedy_reference(Padded(), tok("Once upon a time")["input_ids"], c, 40)
    assert max(ids) < len(tok) and c.is_finished()
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text_of(tok, ids))


@needs_stories
def test_explicit_stop_token_ids(stories):
    """stories260K ends stories with BOS (1): a request can stop on it instead of eos."""
    tok, model = stories
    c = make_constraint(GrammarSpec.from_regex("[0-9]"), tok, model.config.vocab_size, stop_token_ids=[1])
    assert c.stop_token_ids == (1,)
    c.advance(byte_tokens(tok, "7")[0])
    assert c.allowed().nonzero().flatten().tolist() == [1]
    c.advance(1)
    assert c.is_finished()


# ---------------------------------------------------------------------------------------------
# Rollback


def greedy_path(tok, model, spec: GrammarSpec, n: int) -> list[int]:
    c = make_constraint(spec, tok, model.config.vocab_size)
    return constrained_greedy_reference(model, tok("Once upon a time")["input_ids"], c, n)


def fresh_masks(tok, vocab: int, spec: GrammarSpec, path: list[int]) -> list[torch.Tensor]:
    """masks[i] = allowed() after consuming path[:i], each from a constraint that never rolled back."""
    out = []
    for i in range(len(path) + 1):
        c = make_constraint(spec, tok, vocab, mask_history=0)
        for t in path[:i]:
            c.advance(t)
        out.append(c.allowed().clone())
    return out


@needs_stories
@pytest.mark.parametrize("mask_history", [0, 2, 32])
def test_rollback_restores_the_exact_masks(stories, mask_history):
    tok, model = stories
    vocab = model.config.vocab_size
    spec = GrammarSpec.from_json_schema(PERSON_SCHEMA)
    path = greedy_path(tok, model, spec, 12)
    expected = fresh_masks(tok, vocab, spec, path)
    assert not all(torch.equal(expected[0], m) for m in expected[1:])  # masks really change

    c = make_constraint(spec, tok, vocab, mask_history=mask_history)
    for t in path[:3]:
        c.advance(t)
    for k in (1, 4, 9):  # advance k drafted tokens, then reject all of them
        before = c.allowed().clone()
        for t in path[3 : 3 + k]:
            c.allowed()
            c.advance(t)
        assert c.num_advanced == 3 + k
        c.rollback(k)
        assert c.num_advanced == 3
        assert torch.equal(c.allowed(), before)
        assert torch.equal(c.allowed(), expected[3])
    # partial rejection: keep 2 of 5, then the masks along the path match a fresh constraint
    for t in path[3:8]:
        c.advance(t)
    c.rollback(3)
    assert torch.equal(c.allowed(), expected[5])
    for i, t in enumerate(path[5:], start=5):
        assert torch.equal(c.allowed(), expected[i])
        c.advance(t)


@needs_stories
def test_rollback_then_a_different_token(stories):
    """After a rejection the decoder advances the recovered token: state must follow the new path."""
    tok, model = stories
    vocab = model.config.vocab_size
    spec = GrammarSpec.from_ebnf(EXPR_EBNF)
    c = make_constraint(spec, tok, vocab)
    open_paren, d1, d2 = byte_tokens(tok, "(12")
    c.advance(open_paren)
    c.advance(d1)
    c.advance(d2)  # "(12": next must be " "
    c.rollback(1)  # "(1": digits or " " allowed
    other = byte_tokens(tok, " ")[0]
    c.advance(other)  # "(1 "
    ref = make_constraint(spec, tok, vocab, mask_history=0)
    for t in byte_tokens(tok, "(1 "):
        ref.advance(t)
    assert torch.equal(c.allowed(), ref.allowed())
    assert c.allowed()[byte_tokens(tok, "+")[0]] and not c.allowed()[d1]


@needs_stories
def test_rollback_over_the_stop_token(stories):
    tok, model = stories
    c = make_constraint(GrammarSpec.from_regex("[0-9]"), tok, model.config.vocab_size)
    c.advance(byte_tokens(tok, "4")[0])
    c.advance(tok.eos_token_id)
    assert c.is_finished()
    c.rollback(1)
    assert not c.is_finished() and c.is_complete()
    assert c.allowed().nonzero().flatten().tolist() == [tok.eos_token_id]
    c.rollback(1)
    assert not c.is_complete() and c.allowed()[byte_tokens(tok, "9")[0]]


@needs_stories
def test_rollback_and_advance_misuse(stories):
    tok, model = stories
    c = make_constraint(GrammarSpec.from_regex("[0-9]+"), tok, model.config.vocab_size)
    with pytest.raises(ValueError, match="cannot roll back 1 tokens: 0 were advanced"):
        c.rollback(1)
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(byte_tokens(tok, "x")[0])
    assert c.num_advanced == 0  # a refused token leaves the state alone
    with pytest.raises(ValueError, match="outside the vocabulary"):
        c.advance(model.config.vocab_size)
    c.rollback(0)


# ---------------------------------------------------------------------------------------------
# Pure pieces and the cache


def test_unpack_bitmask_matches_the_bit_definition():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (5,), dtype=torch.int32, generator=gen)
    words[0] = -1  # all bits set, including the sign bit
    words[1] = 0
    for vocab in (160, 150, 129):
        got = unpack_bitmask(words, vocab)
        want = [(int(words[t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)]
        assert got.tolist() == want
    # the torch path (non-CPU / big-endian hosts) agrees with the numpy path
    shifts = torch.arange(32, dtype=torch.int32)
    torch_path = ((words.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:150].bool()
    assert torch.equal(torch_path, unpack_bitmask(words, 150))


def test_apply_mask():
    logits = torch.tensor([[1.0, 5.0, 3.0], [2.0, 0.0, 9.0]])
    allowed = torch.tensor([True, False, True])
    out = apply_mask(logits, allowed)
    assert out.argmax(-1).tolist() == [2, 2]
    assert torch.isinf(out[:, 1]).all() and logits[0, 1] == 5.0
    with pytest.raises(ValueError, match="columns"):
        apply_mask(logits, torch.ones(4, dtype=torch.bool))


@needs_stories
def test_compiler_is_built_once_per_tokenizer_and_vocab(stories):
    tok, model = stories
    cache = GrammarCompilerCache(max_threads=1)
    v = model.config.vocab_size
    assert cache.compiler(tok, v) is cache.compiler(tok, v)
    assert cache.compiler(tok, v + 8) is not cache.compiler(tok, v)
    assert cache.compiler(tok, v, stop_token_ids=[1]) is not cache.compiler(tok, v)
    c = cache.make_constraint(GrammarSpec.from_regex("[a-c]"), tok, v)
    assert isinstance(c, XGrammarConstraint) and c.vocab_size == v
    assert isinstance(c, TokenConstraint)  # the decoder's protocol (dspark/decode/constraints.py)
    assert default_compiler_cache() is default_compiler_cache()
    with pytest.raises(DsparkError, match=r"stop token ids \[9999\] are outside the vocabulary"):
        cache.compiler(tok, v, stop_token_ids=[9999])


# ---------------------------------------------------------------------------------------------
# Loading specs and bad input


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and msg
    for n in needles:
        assert n in msg, msg


def test_grammar_from_options_loads_each_kind(tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON_SCHEMA))
    ebnf = tmp_path / "expr.ebnf"
    ebnf.write_text(EXPR_EBNF)
    s = grammar_from_options(json_schema_file=schema)
    assert s.kind == "json_schema" and json.loads(s.source) == PERSON_SCHEMA
    assert grammar_from_options(regex="[0-9]{3}") == GrammarSpec("regex", "[0-9]{3}")
    g = grammar_from_options(grammar_file=str(ebnf))
    assert g.kind == "ebnf" and g.source == EXPR_EBNF
    assert grammar_from_options() is None
    assert GrammarSpec.json_object().kind == "json_object"
    assert GrammarSpec.from_json_schema(json.dumps(PERSON_SCHEMA)).kind == "json_schema"


def test_bad_inputs_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DsparkError) as e:
        grammar_from_options(json_schema_file=missing)
    assert_one_line(e, "nope.json", "No such file")

    not_json = tmp_path / "broken.json"
    not_json.write_text('{"type": ')
    with pytest.raises(DsparkError) as e:
        grammar_from_options(json_schema_file=not_json)
    assert_one_line(e, "broken.json", "not JSON")

    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text('{"type": "object", "properties": {"a": {"type": "strin"}}}')
    with pytest.raises(DsparkError) as e:
        grammar_from_options(json_schema_file=bad_schema)
    assert_one_line(e, "bad.json", "strin")

    array_schema = tmp_path / "list.json"
    array_schema.write_text("[1, 2]")
    with pytest.raises(DsparkError) as e:
        grammar_from_options(json_schema_file=array_schema)
    assert_one_line(e, "list.json", "must be a JSON object")

    with pytest.raises(DsparkError) as e:
        grammar_from_options(regex="[0-9")
    assert_one_line(e, "'[0-9'", "Unclosed")
    with pytest.raises(DsparkError) as e:
        grammar_from_options(regex="")
    assert_one_line(e, "must not be empty")

    bad_ebnf = tmp_path / "bad.ebnf"
    bad_ebnf.write_text('root ::= "a" undefined_rule\n')
    with pytest.raises(DsparkError) as e:
        grammar_from_options(grammar_file=bad_ebnf)
    assert_one_line(e, "bad.ebnf", "undefined_rule")
    no_root = tmp_path / "noroot.ebnf"
    no_root.write_text('start ::= "a"\n')
    with pytest.raises(DsparkError) as e:
        grammar_from_options(grammar_file=no_root)
    assert_one_line(e, "noroot.ebnf", "root")
    with pytest.raises(DsparkError) as e:
        grammar_from_options(grammar_file=tmp_path / "absent.ebnf")
    assert_one_line(e, "absent.ebnf", "No such file")

    with pytest.raises(DsparkError) as e:
        grammar_from_options(regex="a", grammar_file=bad_ebnf)
    assert_one_line(e, "--regex", "--grammar", "at most one")

    with pytest.raises(DsparkError) as e:
        GrammarSpec.from_json_schema({"type": "integer", "minimum": 5, "maximum": 3})
    assert_one_line(e, "invalid JSON schema", "minimum")
    with pytest.raises(DsparkError) as e:
        GrammarSpec("yaml", "x")
    assert_one_line(e, "'yaml'", "json_schema, json_object, regex, ebnf")


def test_remote_refs_are_refused_local_ones_resolved():
    """xgrammar cannot fetch a remote $ref and silently allowed anything in its place."""
    remote = {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}, "required": ["a"]}
    with pytest.raises(DsparkError) as e:
        GrammarSpec.from_json_schema(remote)
    assert_one_line(e, "'https://example.com/a.json'", "only local references")
    nested = {"$defs": {"x": {"anyOf": [{"$ref": "other.json#/x"}, {"type": "null"}]}}, "$ref": "#/$defs/x"}
    with pytest.raises(DsparkError, match="'other.json#/x'"):
        GrammarSpec.from_json_schema(nested)
    # local refs resolve; a "$ref" inside data (const / enum / default) or as a property name is not a reference
    ok = {"$defs": {"n": {"type": "integer"}}, "type": "object",
          "properties": {"n": {"$ref": "#/$defs/n"}, "$ref": {"type": "string"},
                         "c": {"const": {"$ref": "http://x"}}, "d": {"default": {"$ref": "http://y"}}}}
    assert GrammarSpec.from_json_schema(ok).kind == "json_schema"


@needs_tiny
def test_unsatisfiable_constraints_are_refused_up_front(tiny):
    """A grammar that no output can match was accepted and ended at once (reported as a "stop")."""
    tok, model = tiny
    for spec in (GrammarSpec.from_regex(r"[^\s\S]"), GrammarSpec.from_ebnf('root ::= [^\\x00-\\U0010FFFF]')):
        with pytest.raises(DsparkError) as e:
            make_constraint(spec, tok, model.config.vocab_size)
        assert_one_line(e, "can never be satisfied")
    # a grammar that matches only the empty output is satisfiable: the stop token is allowed at once
    c = make_constraint(GrammarSpec.from_regex("(a)?"), tok, model.config.vocab_size)
    assert bool(c.allowed().any())
