"""runtime/chunk_json.py writes the streamed chunks' JSON byte for byte as pydantic's
``model_dump_json`` of the protocol models (the oracle) would, over many deltas: unicode and
escapes, logprobs of every magnitude, finish and stop reasons, role and usage chunks."""

from __future__ import annotations

import random
import struct

import pytest

from engine.outputs import CompletionOutput, Logprob
from runtime.chunk_json import ChatChunkWriter, JSONText, _float
from runtime.openai_dataplane import chat_logprob_entries, chat_logprobs
from runtime.openai_protocol import (
    ChatCompletionChunk,
    ChatCompletionStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)

PIECES = ["", " the", "Hello", "é", "日本語", "😀", "\n", "\t", '"', "\\", "\x00", "\x01\x1f", "\x7f", "\u2028",
          "</script>", "a\r\nb", "\ufffd", "\b\f", "'", "/", "ü ß", "🙂‍↕️"]
FINISH = [None, None, None, "stop", "length", "abort"]
STOPS = [None, None, 151643, 0, "###", "é\n", "STOP"]


def _random_float(rng: random.Random) -> float:
    kind = rng.random()
    if kind < 0.5:
        return -(10 ** rng.uniform(-12, 4)) * rng.random()
    if kind < 0.6:
        return float(rng.randint(-20000, 0))
    if kind < 0.7:
        return rng.choice([0.0, -0.0, -9999.0, -1e-5, -9.99999e-5, -1e-4, -1e16, -1.5e16, -1e15, 1e-5])
    while True:  # any finite double
        v = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        if v == v and abs(v) != float("inf"):
            return v


def _completion(rng: random.Random, k: int, with_logprobs: bool) -> CompletionOutput:
    ids = [rng.randint(0, 1000) for _ in range(rng.randint(0, 3))]
    lps = None
    if with_logprobs:
        lps = []
        for t in ids:
            entry = {t: Logprob(_random_float(rng), rng.randint(1, 5), rng.choice(PIECES + [None]))}
            for r in range(1, k + 1):
                entry.setdefault(2000 + r, Logprob(_random_float(rng), r, rng.choice(PIECES)))
            lps.append(entry)
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3)))
    return CompletionOutput(rng.randint(0, 3), text, ids, None, lps, rng.choice(FINISH), rng.choice(STOPS))


def _oracle(rid: str, created: int, model: str, choices: list, usage: UsageInfo | None = None) -> str:
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage).model_dump_json()


@pytest.mark.parametrize("seed", range(4))
def test_chat_chunks_equal_pydantic(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1500):
        rid = rng.choice(["chatcmpl-0123456789abcdef", "chatcmpl-é\"x", "r"])
        model = rng.choice(["vlm-bench", "Qwen/Qwen2-VL-2B-Instruct", "mödel \"x\""])
        created = rng.randint(0, 2**33)
        writer = ChatChunkWriter(rid, created, model)
        k = rng.randint(0, 3)
        c = _completion(rng, k, with_logprobs=rng.random() < 0.4)
        got = writer.content(c.index, c.text, chat_logprob_entries(c, k), c.finish_reason, c.stop_reason)
        want = _oracle(rid, created, model, [ChatCompletionStreamChoice(
            index=c.index, delta=DeltaMessage(content=c.text), logprobs=chat_logprobs(c, k),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
        assert got == want
        assert writer.role(c.index) == _oracle(rid, created, model, [ChatCompletionStreamChoice(
            index=c.index, delta=DeltaMessage(role="assistant", content=""))])
        p, n = rng.randint(0, 10**6), rng.randint(0, 10**6)
        assert writer.usage(p, n) == _oracle(rid, created, model, [], UsageInfo(
            prompt_tokens=p, completion_tokens=n, total_tokens=p + n))


def test_floats_equal_pydantic() -> None:
    rng = random.Random(7)
    for _ in range(50_000):
        v = _random_float(rng)
        # '{"token":"","logprob":' + value + ',"bytes":null}'
        assert _float(v) == TopLogprob(token="", logprob=v).model_dump_json()[22:-14], v


def test_non_finite_logprob_falls_back() -> None:
    c = CompletionOutput(0, "a", [1], None, [{1: Logprob(float("inf"), 1, "a")}], None, None)
    assert ChatChunkWriter("r", 1, "m").content(0, "a", chat_logprob_entries(c, 0), None, None) is None


def test_lone_surrogate_raises_as_pydantic_does() -> None:
    with pytest.raises(UnicodeEncodeError):
        ChatChunkWriter("r", 1, "m").content(0, "\ud800", None, None, None)
    with pytest.raises(Exception):
        _oracle("r", 1, "m", [ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="\ud800"))])


def test_json_text_is_its_own_dump() -> None:
    assert JSONText('{"a":1}').model_dump_json() == '{"a":1}'
