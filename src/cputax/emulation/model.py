"""The emulated architecture: vLLM's Llama with the forward pass replaced by a modelled
wait. Loaded only inside vLLM, when the plugin registered it.

The real attention layers stay (one tiny layer), so the KV-cache spec, the attention
metadata, the scheduler and the KV-cache manager are vLLM's own; they never run. The
forward reads the batch from vLLM's forward context, computes the step time from the
TimingModel, sleeps until then with the GIL released, and logs the step. The logits are
-inf except one ordinary text token per step, so every request streams exactly
max_tokens tokens of text (sampling at any temperature picks it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaForCausalLM

from cputax.emulation.plugin import EMULATE_ENV
from cputax.emulation.steps import LOG_ENV, StepLog, StepRecord
from cputax.emulation.timing import TimingModel

__all__ = ["EmulatedGpuForCausalLM", "batch_of"]

_PR_SET_TIMERSLACK = 29
TEXT_TOKENS_KEY = "cputax_text_tokens"  # config.json: ids that decode to whole words


def batch_of(attn_metadata: object) -> tuple[list[int], list[int]] | None:
    """(new tokens, context tokens) per scheduled request, from the attention metadata of
    the forward context; None for a run without one (vLLM's dummy warm-up runs)."""
    if isinstance(attn_metadata, list):
        attn_metadata = attn_metadata[0] if attn_metadata else None
    if not attn_metadata:
        return None
    meta = next(iter(attn_metadata.values())) if isinstance(attn_metadata, dict) else attn_metadata
    qsl, seq_lens = getattr(meta, "query_start_loc", None), getattr(meta, "seq_lens", None)
    if qsl is None or seq_lens is None:
        return None
    n = len(seq_lens)
    starts = qsl[: n + 1].tolist()
    contexts = seq_lens.tolist()
    queries = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    keep = [i for i, q in enumerate(queries) if q > 0]
    return [queries[i] for i in keep], [contexts[i] for i in keep]


class EmulatedGpuForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        config = vllm_config.model_config.hf_config
        self.timing = TimingModel.from_env(os.environ[EMULATE_ENV])
        self.text_tokens = list(getattr(config, TEXT_TOKENS_KEY, None) or [config.vocab_size - 1])
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.dtype = vllm_config.model_config.dtype
        self.log = StepLog(os.environ.get(LOG_ENV) if _first_rank() else None)
        self.steps = 0
        self._slack_set = False

    def forward(
        self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs
    ):
        t0 = time.monotonic_ns()
        cpu0 = time.thread_time_ns()
        if not self._slack_set:  # per thread: the forward's thread sleeps, not __init__'s
            _set_timer_slack_ns(1)
            self._slack_set = True
        n = positions.shape[-1]
        out = torch.zeros((n, self.hidden_size), dtype=self.dtype)
        context = get_forward_context() if is_forward_context_available() else None
        batch = batch_of(context.attn_metadata) if context is not None else None
        if batch is None or not batch[0]:
            return out  # a dummy run (warm-up, profiling): no step of the emulated GPU
        queries, contexts = batch
        model_ns = int(self.timing.step_s(queries, contexts) * 1e9)
        deadline = t0 + model_ns
        ready = time.monotonic_ns()  # the forward's own CPU work done
        if deadline > ready:
            time.sleep((deadline - ready) / 1e9)  # releases the GIL; clock_nanosleep
        woke = time.monotonic_ns()
        # The emulated GPU is done at its deadline (or when the CPU work before it ended, if
        # that ran over). When the thread runs again (a core free, the GIL back) is the CPU
        # side's lag: recorded apart, and part of the gap before the next step.
        t1 = max(deadline, ready)
        decode = sum(1 for q, s in zip(queries, contexts, strict=True) if q == 1 and s > 1)
        prefill = sum(q for q, s in zip(queries, contexts, strict=True) if not (q == 1 and s > 1))
        cpu = time.thread_time_ns() - cpu0  # the sleep itself costs a system call, no more
        self.log.write(
            StepRecord(t0, t1, model_ns, prefill, decode, sum(contexts), len(queries), cpu, woke)
        )
        self.steps += 1
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.shape[0]
        logits = torch.full((rows, self.vocab_size), float("-inf"), dtype=torch.float32)
        logits[:, self.text_tokens[self.steps % len(self.text_tokens)]] = 0.0
        return logits

    def load_weights(self, weights):
        # --load-format dummy: nothing to load; every parameter counts as loaded
        return {name for name, _ in self.named_parameters()}


def _first_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # no parallel state yet: a single worker
        return True


def _set_timer_slack_ns(ns: int) -> None:
    """A sleeping thread wakes up to 50 us late by default (timer slack): set it to `ns`."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0)
