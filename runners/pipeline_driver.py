"""Generation through a chain of pipeline stages: the entry's side of a split model.

The entry holds the tokenizer and the sampler; the stages (``runners.torch_stage``,
here or on peers) hold the layers. A generation is the prompt once, then one
round per generated token: a round sends the new positions through every
stage in order, each stage's output the next one's input, and the last stage
answers the greedy token or the last position's logits. The entry samples
from those with the very code ``runners.torch_generate`` uses (transformers'
logits processors, a ``torch.Generator`` seeded per generation), and cuts the
text with the same ``StopScanner``, so text through the chain equals the
single model's for the same request.

Stages are callables ``StageCall -> ndarray``: how a call travels (in this
process, over libp2p) is the caller's business. The driver keeps, for each
stage, the inputs it sent it (token ids to the first, float32 hidden states,
2.3 KB per position, to the others), which is what recovery needs:

- a stage that answers ``SessionEvicted`` (or, from a peer, NOT_EXECUTED) has
  lost its cache: the driver sends it the whole history from position 0 and it
  rebuilds; the other stages keep theirs.
- a stage that fails otherwise (its peer died, the stream broke) is replaced
  by the caller's ``replace(index, error)``, another holder of the same
  layers, and the new one is rebuilt the same way.

Either way the round goes on from the stage that failed; under greedy decoding
the output is unchanged. Recoveries per generation are bounded
(``max_recoveries``): past it, or when ``replace`` has none to offer, the
generation fails with ``PipelineFailed``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from protocols import ErrorCode, RemoteError, SwarmError
from protocols.errors import ConfigError

from .errors import BadInput, RunnerError
from .generation import FINISH_LENGTH, FINISH_STOP, Completion, Request, StopScanner
from .token_stream import Emit
from .torch_generate import Decoder, encode, end_ids, logits_processors
from .torch_stage import SessionEvicted, StageCall

Stage = Callable[[StageCall], Awaitable[np.ndarray[Any, Any]]]
Replace = Callable[[int, BaseException], Awaitable[Stage]]


class PipelineFailed(RunnerError):
    """A stage failed and could not be rebuilt or replaced within the bounds."""


@dataclass(frozen=True, slots=True)
class DriverConfig:
    context_length: int = 8192
    max_recoveries: int = 8  # rebuilds and replacements in one generation

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ConfigError("context_length must be at least 2")
        if not 0 <= self.max_recoveries <= 1000:
            raise ConfigError("max_recoveries must be from 0 to 1000")


@dataclass(frozen=True, slots=True)
class Recovery:
    """One rebuild or replacement, for the answer's meta and the benchmark."""

    stage: int
    kind: str  # "rebuild" (the stage lost its cache) or "replace" (the stage failed)
    positions: int  # how many positions were replayed
    seconds: float  # from the failure to the rebuilt stage's answer


@dataclass(slots=True)
class Trace:
    """What one generation did: rounds and their times, and its recoveries."""

    session: str = ""
    round_s: list[float] = field(default_factory=list)  # per round, the prompt's first
    recoveries: list[Recovery] = field(default_factory=list)


class Tokens:
    """The entry's tokenizer and the ids that end a turn. ``open`` blocks (a few s)."""

    def __init__(self, tokenizer: Any, ends: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.end_ids = ends

    @classmethod
    def open(cls) -> Tokens:
        from transformers import AutoTokenizer

        from . import convert_smollm2 as recipe
        from .gguf_index import read_index
        from .torch_stage import llama_config

        source = recipe.gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        eos = llama_config(read_index(source)).eos_token_id
        return cls(tokenizer, end_ids(tokenizer, eos))


class Chain:
    """Stages covering every layer, in order; ``replace`` finds a stand-in for one."""

    def __init__(
        self,
        stages: Sequence[Stage],
        replace: Replace | None = None,
        config: DriverConfig | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a chain needs at least one stage")
        self.stages = list(stages)  # a replacement stays for later generations
        self.replace = replace
        self.config = config or DriverConfig()

    async def generate(
        self, tokens: Tokens, request: Request, emit: Emit, trace: Trace | None = None
    ) -> Completion:
        """Generate ``request`` through the chain, passing text to ``emit`` as it comes
        (it returns False when the reader is gone)."""
        import torch

        trace = trace if trace is not None else Trace()
        ids = await trio.to_thread.run_sync(encode, tokens.tokenizer, request)
        prompt_tokens = len(ids)
        room = self.config.context_length - prompt_tokens
        if room < 1:
            raise BadInput(
                f"the prompt has {prompt_tokens} tokens; the chain's context holds "
                f"{self.config.context_length}, and at least one must be left to generate"
            )
        sampling = request.sampling
        budget = min(sampling.max_new_tokens, room)
        processors = logits_processors(request)
        # The last stage's answer: the argmax alone when nothing changes the logits first.
        want = "token" if sampling.greedy and not len(processors) else "logits"
        generator = torch.Generator()
        generator.manual_seed(secrets.randbits(63) if sampling.seed is None else sampling.seed)
        trace.session = secrets.token_hex(16)
        run = _Run(self, trace, want)
        scanner = StopScanner(sampling.stop)
        decoder = Decoder(tokens.tokenizer)
        shown: list[str] = []
        generated, finish = 0, FINISH_LENGTH
        sequence = torch.tensor([ids], dtype=torch.long)
        step = np.array([ids], dtype=np.int64)
        start = 0
        for _ in range(budget):
            out = await run.round(step, start)
            start += step.shape[1]
            # Small work on the trio thread: an argmax or a sample over 49,152 logits.
            if want == "token":
                token_id = int(out.reshape(-1)[0])
            else:
                with torch.inference_mode():
                    scores = processors(sequence, torch.from_numpy(np.array(out, np.float32)))
                    if sampling.greedy:
                        token_id = int(scores.argmax(dim=-1).item())
                    else:
                        probs = torch.softmax(scores, dim=-1)
                        token_id = int(torch.multinomial(probs, 1, generator=generator).item())
            generated += 1
            if token_id in tokens.end_ids:
                finish = FINISH_STOP
                break
            sequence = torch.cat([sequence, torch.tensor([[token_id]])], dim=-1)
            step = np.array([[token_id]], dtype=np.int64)
            text = scanner.feed(decoder.add(token_id))
            if text:
                shown.append(text)
                if not emit(text):
                    break
            if scanner.stopped:
                finish = FINISH_STOP
                break
        tail = scanner.feed(decoder.flush()) + scanner.flush()
        if tail:
            shown.append(tail)
            emit(tail)
        return Completion("".join(shown), prompt_tokens, generated, finish)


class _Run:
    """One generation's rounds: the inputs each stage was sent, and its recoveries."""

    def __init__(self, chain: Chain, trace: Trace, want: str) -> None:
        self.chain = chain
        self.trace = trace
        self.want = want
        self.sent: list[list[np.ndarray[Any, Any]]] = [[] for _ in chain.stages]

    async def round(self, data: np.ndarray[Any, Any], start: int) -> np.ndarray[Any, Any]:
        began = time.perf_counter()
        last = len(self.chain.stages) - 1
        x = data
        for i in range(last + 1):
            want = self.want if i == last else "hidden"
            self.sent[i].append(x)
            x = await self._call(i, StageCall(self.trace.session, start, x, want))
        self.trace.round_s.append(time.perf_counter() - began)
        return x

    async def _call(self, i: int, call: StageCall) -> np.ndarray[Any, Any]:
        chain = self.chain
        n = call.data.shape[1]
        try:
            return await chain.stages[i](call)
        except SwarmError as exc:
            failure: SwarmError = exc
        failed_at = time.perf_counter()
        while True:
            if _fault_of_request(failure):
                raise failure
            if len(self.trace.recoveries) >= chain.config.max_recoveries:
                raise PipelineFailed(
                    f"stage {i} failed after {len(self.trace.recoveries)} recoveries: {failure}"
                ) from failure
            kind = "rebuild" if _lost_cache(failure) else "replace"
            if kind == "replace":
                if chain.replace is None:
                    raise PipelineFailed(f"stage {i} failed, none to replace it") from failure
                try:
                    chain.stages[i] = await chain.replace(i, failure)
                except SwarmError as exc:
                    raise PipelineFailed(f"stage {i} failed, none to replace it: {exc}") from exc
            history = np.concatenate(self.sent[i], axis=1)
            replay = StageCall(call.session, 0, history, call.want)
            try:
                out = await chain.stages[i](replay)
            except SwarmError as exc:
                self.trace.recoveries.append(Recovery(i, kind, history.shape[1], 0.0))
                failure = exc
                continue
            seconds = time.perf_counter() - failed_at
            self.trace.recoveries.append(Recovery(i, kind, history.shape[1], seconds))
            # A hidden answer covers every replayed position; the round needs its own.
            return out[:, -n:] if call.want == "hidden" else out


def _lost_cache(error: SwarmError) -> bool:
    if isinstance(error, SessionEvicted):
        return True
    return isinstance(error, RemoteError) and error.code is ErrorCode.NOT_EXECUTED


def _fault_of_request(error: SwarmError) -> bool:
    """The request itself is wrong: no other stage would do better."""
    return error.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.CANCELLED)


def runner_stage(runner: Any) -> Stage:
    """A stage callable over a ``TorchStageRunner`` (or any runner of the same
    inputs and outputs): the request a peer would send it, without the network."""
    from protocols import Tensor

    first = any(spec.name == "tokens" for spec in runner.info.inputs)

    async def call(c: StageCall) -> np.ndarray[Any, Any]:
        inputs = {"tokens" if first else "hidden": Tensor.from_numpy(c.data)}
        params = {"session": c.session, "start": c.start, "want": c.want}
        outputs = await runner.infer(inputs, params)
        value = outputs.get(c.want)
        if not isinstance(value, Tensor):
            raise RunnerError(f"the stage answered no {c.want!r} tensor")
        return value.numpy()

    return call
