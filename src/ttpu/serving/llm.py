"""``ttpu.LLM``: vLLM's offline API over ttpu's serving engine.

    llm = LLM("gemma-3-270m", max_num_seqs=32, max_model_len=2048)
    outputs = llm.generate(["Paris is", "def fib(n):"], SamplingParams(max_tokens=64, temperature=0.8))
    outputs[0].outputs[0].text, outputs[0].outputs[0].token_ids
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

import numpy as np
from tqdm.auto import tqdm

from ttpu.errors import InvalidArgumentError
from ttpu.generation.chat import chat_prompt
from ttpu.serving.engine import EngineConfig, LLMEngine
from ttpu.serving.request import Request, SamplingParams

Prompt = Union[str, dict, Sequence[int]]  # text, {"prompt": text} / {"prompt_token_ids": ids}, or ids


@dataclass
class CompletionOutput:
    """One of a request's ``n`` sequences."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class LLM:
    """A model loaded once and served by a continuous-batching engine. ``model`` is a
    name or path for :meth:`ttpu.AutoModelForTPU.from_pretrained` or a loaded
    :class:`ttpu.TPUModel`; keyword arguments are :class:`EngineConfig` fields
    (``max_num_seqs``, ``max_model_len``, ...) and, when loading by name,
    ``from_pretrained``'s."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        names = {f.name for f in fields(EngineConfig)}
        config = EngineConfig(**{k: v for k, v in kwargs.items() if k in names})
        load_kwargs = {k: v for k, v in kwargs.items() if k not in names}
        if isinstance(model, str):
            from ttpu.auto import AutoModelForTPU

            model = AutoModelForTPU.from_pretrained(model, **load_kwargs)
        elif load_kwargs:
            raise InvalidArgumentError(f"{sorted(load_kwargs)} apply when loading by name, not to a loaded model")
        self.model = model
        self.tokenizer = model.tokenizer
        self.engine = LLMEngine(model, config)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Every prompt's completions, in the prompts' order (one ``sampling_params`` for
        all, or one per prompt)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidArgumentError(f"{len(params)} sampling params for {len(prompts)} prompts")
        batches = []
        for prompt, p in zip(prompts, params):
            text, ids = self._prompt(prompt)
            request_id = str(next(self._ids))
            forks = [self.engine.add_request(f"{request_id}-{i}", ids, fork) for i, fork in enumerate(p.forks())]
            batches.append((request_id, text, ids, forks))
        requests = [r for *_, forks in batches for r in forks]
        with tqdm(total=len(requests), desc="requests", unit="req", disable=not use_tqdm) as bar:
            done = 0
            while self.engine.has_unfinished_requests:
                for request in self.engine.step():
                    self._check_stop_strings(request)
                finished = sum(r.status.finished for r in requests)
                bar.update(finished - done)
                done = finished
        return [
            RequestOutput(request_id, text, ids, [self._completion(i, r) for i, r in enumerate(forks)], True)
            for request_id, text, ids, forks in batches
        ]

    def chat(
        self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """One conversation's reply (the tokenizer's chat template, then generation)."""
        ids = chat_prompt(self.tokenizer, messages)[0].tolist()
        return self.generate({"prompt_token_ids": ids}, sampling_params, use_tqdm)

    def _prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgumentError("this model has no tokenizer: give prompts as {'prompt_token_ids': [...]}")
            return prompt, np.asarray(self.tokenizer(prompt)["input_ids"]).reshape(-1).tolist()
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidArgumentError(
            f"a prompt is a string, token ids, or {{'prompt': ...}} / {{'prompt_token_ids': [...]}} (got {prompt!r})"
        )

    def decode(self, token_ids: Sequence[int], params: SamplingParams, cut_at_stop: bool = True) -> str:
        """The text of generated ``token_ids``, ending before the first stop string found
        (unless ``include_stop_str_in_output`` or not ``cut_at_stop``)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        found = [text.find(s) for s in params.stop if s in text]
        return text[: min(found)] if found and cut_at_stop and not params.include_stop_str_in_output else text

    def _check_stop_strings(self, request: Request) -> None:
        params = request.params
        if params.stop and not request.status.finished:
            text = self.decode(request.output_token_ids, params, cut_at_stop=False)
            if any(s in text for s in params.stop):
                self.engine.stop(request.id)

    def _completion(self, index: int, request: Request) -> CompletionOutput:
        text = self.decode(request.output_token_ids, request.params)
        return CompletionOutput(index, text, list(request.output_token_ids), request.finish_reason)
