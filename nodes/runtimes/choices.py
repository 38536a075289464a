"""How the text of one generated choice becomes what the client gets: plain content, forced
tool calls, or content with the calls recognised in it; streamed as TextDelta replies while it
is generated, and summed up as a :class:`~events.messages.Choice` at its end.

Engine-agnostic: an engine feeds :meth:`ChoiceWriter.on_text` with the text it may send (and
the logprobs of its tokens) and calls :meth:`ChoiceWriter.finish` with the whole text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events.messages import Choice, TextDelta, TokenLogprob, ToolCall, ToolCallDelta

from .tool_calls import AutoSplitter, CallFormat, CallScanner, parse_calls

OnDelta = Callable[[Any], None]  # str (plain text of choice 0) or a TextDelta


class ChoiceWriter:
    """``mode``: "text" (no tools), "forced" (the output is calls in ``form``, under a grammar
    that may also allow a JSON answer instead), or "auto" (free text that may hold calls).
    ``on_delta``: None when the answer is not streamed."""

    def __init__(
        self,
        index: int,
        mode: str,
        *,
        on_delta: OnDelta | None,
        form: CallFormat | None = None,
        names: set[str] | None = None,
        parallel: bool = True,
    ) -> None:
        self.index = index
        self.mode = mode
        self.on_delta = on_delta
        self.names = names or set()
        self.parallel = parallel
        self.scanner = CallScanner(form) if mode == "forced" and form is not None else None
        self.splitter = AutoSplitter() if mode == "auto" else None
        self.streamed_calls = False

    # ------------------------------------------------------------ while generating

    def on_text(self, text: str, logprobs: list[TokenLogprob] | None) -> None:
        if self.scanner is not None:
            calls = self.scanner.feed(text)
            if calls:
                self.streamed_calls = True
            if calls or logprobs:
                self._send("", logprobs, calls or None)
            return
        if self.splitter is not None:
            text = self.splitter.feed(text)
        if text or logprobs:
            self._send(text, logprobs, None)

    def _send(self, text: str, logprobs: list[TokenLogprob] | None, calls: list[ToolCallDelta] | None) -> None:
        assert self.on_delta is not None
        if self.index == 0 and logprobs is None and calls is None:
            self.on_delta(text)  # the plain path: only text
        else:
            self.on_delta(TextDelta(text=text, index=self.index, logprobs=logprobs, tool_calls=calls))

    # ------------------------------------------------------------ at the end

    def finish(self, text: str, finish_reason: str, logprobs: list[TokenLogprob] | None) -> Choice:
        content, calls = text, []
        if self.scanner is not None:
            if self.on_delta is None:
                self.scanner.feed(text)
            calls = self.scanner.result()
            content = "" if calls else text  # the grammar's other branch: a JSON answer
            if not calls and self.on_delta is not None and text:
                self._send(text, None, None)  # held back while it might have been a call
        elif self.splitter is not None:
            held = self.splitter.held() if self.on_delta is not None else text
            rest, calls = parse_calls(held, self.names)
            if not self.parallel:
                calls = calls[:1]
            if self.on_delta is not None:
                if rest:
                    self._send(rest, None, None)
                self._send_calls(calls)
                content = self.splitter.seen[: self.splitter.sent] + rest
            else:
                content = rest
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return Choice(
            index=self.index, text=content, finish_reason=finish_reason, tool_calls=calls or None, logprobs=logprobs
        )

    def _send_calls(self, calls: list[ToolCall]) -> None:
        for i, call in enumerate(calls):
            self._send("", None, [ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments)])
