"""Prompts and incremental detokenization with stop strings (no model needed, except the last test)."""

from __future__ import annotations

import pytest

from dspark.serve.text import TextStream, chat_prompt, plain_chat_text

E_ACUTE = "é".encode()
PIECES = {1: b"he", 2: b"llo", 3: b" wor", 4: b"ld", 5: E_ACUTE[:1], 6: E_ACUTE[1:], 7: b"\n", 8: b"lo"}
EOS = 99


class ByteTokenizer:
    """A byte-level tokenizer in miniature: ids are byte pieces, decode replaces broken UTF-8."""

    chat_template = None
    all_special_ids = [EOS]

    def decode(self, ids, skip_special_tokens=False):
        data = b"".join(b"<eos>" if i == EOS and not skip_special_tokens else PIECES.get(i, b"") for i in ids)
        return data.decode("utf-8", errors="replace")

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) for c in text]}


def _run(stream: TextStream, steps) -> tuple[list[str], str]:
    deltas = [stream.push(s) for s in steps]
    deltas.append(stream.finish())
    return deltas, "".join(deltas)


def test_deltas_concatenate_to_the_text_and_hold_back_split_characters():
    s = TextStream(ByteTokenizer())
    deltas, joined = _run(s, [[1], [2, 5], [6], [3, 4], [EOS]])
    assert deltas[1] == "llo"  # the first byte of "é" is held back, not sent as U+FFFD
    assert deltas[2] == "é"
    assert joined == s.text == "helloé world" and not s.stopped


def test_stop_string_across_pushes_is_cut_and_never_sent():
    s = TextStream(ByteTokenizer(), stop=["lo w"])
    deltas, joined = _run(s, [[1], [2], [3], [4]])
    assert deltas[:2] == ["he", "l"]  # "lo" could start the stop string: held back
    assert joined == s.text == "hel" and s.stopped
    assert s.push([1]) == ""  # nothing after a stop


def test_earliest_of_several_stops_wins_and_held_back_text_is_released():
    s = TextStream(ByteTokenizer(), stop=["world", "llo"])
    _, joined = _run(s, [[1, 2, 3, 4]])
    assert joined == "he" and s.stopped
    s = TextStream(ByteTokenizer(), stop=["lo!"])
    deltas, joined = _run(s, [[1], [8]])
    assert deltas == ["he", "", "lo"]  # "lo" released at the end: the stop never completed
    assert joined == "helo" and not s.stopped


def test_stop_at_the_very_start():
    s = TextStream(ByteTokenizer(), stop=["he"])
    _, joined = _run(s, [[1, 2]])
    assert joined == "" and s.stopped


def test_chat_prompt_template_and_fallback():
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert plain_chat_text(msgs) == "system: be brief\nuser: hi\nassistant:"
    assert chat_prompt(tok, msgs) == [0] + [ord(c) for c in plain_chat_text(msgs)]

    class Templated(ByteTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    ids = chat_prompt(Templated(), msgs)
    assert ids == [ord(c) for c in "<system>be brief<user>hi<assistant>"]  # no extra BOS: the template owns it


def test_real_tokenizer_streams_the_same_text():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "dspark" / "models" / "builtin" / "tiny-code-draft-s"
    if not folder.is_dir():
        pytest.skip("built-in tokenizer not built yet")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    text = "def grüße(n):\n    return [x ** 2 for x in range(n)]  # naïve — ok ✓\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = TextStream(tok, stop=["# na"])
    joined = "".join(s.push([i]) for i in ids) + s.finish()
    assert joined == text[:text.index("# na")] and s.stopped
    s = TextStream(tok)
    assert "".join(s.push([i]) for i in ids) + s.finish() == tok.decode(ids, skip_special_tokens=True)


def test_non_incremental_stream_decodes_once_to_the_same_text():
    calls = []

    class Counting(ByteTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    steps = [[1], [2, 5], [6], [3, 4], [EOS]]
    lazy = TextStream(Counting(), incremental=False)
    deltas, joined = _run(lazy, steps)
    assert deltas[:-1] == [""] * len(steps) and calls == [7]  # one decode of all 7 ids, at the end
    assert joined == lazy.text == _run(TextStream(ByteTokenizer()), steps)[1] == "helloé world"
    with pytest.raises(Exception, match="stop strings"):
        TextStream(ByteTokenizer(), stop=["x"], incremental=False)
