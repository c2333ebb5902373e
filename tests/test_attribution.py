"""Attribution rules on synthetic stacks for each server type, the per-run analysis on a
synthetic run directory, and (slow) the embedded target sampled under load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cputax.analysis.attribution import attribute_file, attribute_run, category_timeline, summarize
from cputax.records import JsonlWriter, Results
from cputax.results.attribution import ProcessView, Window
from cputax.results.summary import Summary
from cputax.rundir import RunDir
from cputax.sampling.classify import Classifier, Frame, detect_server, short_path
from cputax.sampling.stacks import ThreadId
from cputax.servers import CATEGORIES, SERVERS, Rule, rules_for
from cputax.targets.processes import role_in


def stack(*frames: str) -> tuple[Frame, ...]:
    """Frames as 'path:function', outermost first."""
    return tuple(Frame(f.rsplit(":", 1)[1], f.rsplit(":", 1)[0]) for f in frames)


UVICORN = (
    "uvicorn/server.py:Server.serve",
    "uvicorn/protocols/http/h11_impl.py:RequestResponseCycle.run_asgi",
    "fastapi/applications.py:FastAPI.__call__",
    "starlette/routing.py:Router.__call__",
    "fastapi/routing.py:run_endpoint_function",
)
STREAM = (
    "uvicorn/server.py:Server.serve",
    "starlette/responses.py:StreamingResponse.__call__.<locals>.wrap",
    "starlette/responses.py:StreamingResponse.stream_response",
)
THREAD = (
    "threading.py:Thread._bootstrap",
    "threading.py:Thread._bootstrap_inner",
    "threading.py:Thread.run",
)
V = "vllm/"
CORE = (
    "vllm/v1/engine/core.py:run_engine_core",
    "vllm/v1/engine/core.py:EngineCoreProc.run_busy_loop",
)

VLLM_CASES = [
    (
        "chat_template",
        (
            *UVICORN,
            f"{V}entrypoints/openai/serving_chat.py:OpenAIServingChat.create_chat_completion",
            f"{V}entrypoints/chat_utils.py:apply_hf_chat_template",
            "jinja2/environment.py:Template.render",
        ),
    ),
    (
        "tokenize",
        (
            *THREAD,
            "concurrent/futures/thread.py:_worker",
            f"{V}utils/async_utils.py:AsyncMicrobatchTokenizer._batch_encode_loop",
            "transformers/tokenization_utils_base.py:PreTrainedTokenizerBase.__call__",
            "transformers/tokenization_utils_fast.py:PreTrainedTokenizerFast._batch_encode_plus",
        ),
    ),
    (
        "http",
        (
            *UVICORN,
            f"{V}entrypoints/openai/api_server.py:create_chat_completion",
            "pydantic/main.py:BaseModel.model_validate",
        ),
    ),
    ("idle", ("<string>:<module>", f"{V}entrypoints/cli/main.py:main", "uvloop/__init__.py:run")),
    (
        "sse",
        (
            *STREAM,
            f"{V}entrypoints/openai/serving_chat.py:OpenAIServingChat.chat_completion_stream_generator",
            "pydantic/main.py:BaseModel.model_dump_json",
        ),
    ),
    (
        "sse",
        (
            *STREAM,
            "uvicorn/protocols/http/h11_impl.py:RequestResponseCycle.send",
            "asyncio/selector_events.py:_SelectorSocketTransport.write",
        ),
    ),
    (
        "detokenize",
        (
            "uvloop/__init__.py:run",
            f"{V}v1/engine/async_llm.py:AsyncLLM.output_handler",
            f"{V}v1/engine/output_processor.py:OutputProcessor.process_outputs",
            f"{V}v1/engine/detokenizer.py:FastIncrementalDetokenizer.decode_next",
        ),
    ),
    (
        "output_process",
        (
            "uvloop/__init__.py:run",
            f"{V}v1/engine/async_llm.py:AsyncLLM.output_handler",
            f"{V}v1/engine/output_processor.py:OutputProcessor.process_outputs",
        ),
    ),
    (
        "ipc",
        (
            "uvloop/__init__.py:run",
            f"{V}v1/engine/core_client.py:AsyncMPClient.process_outputs_socket",
            f"{V}v1/serial_utils.py:MsgpackDecoder.decode",
        ),
    ),
    (
        "preprocess",
        (
            *UVICORN,
            f"{V}v1/engine/async_llm.py:AsyncLLM.add_request",
            f"{V}v1/engine/input_processor.py:InputProcessor.process_inputs",
        ),
    ),
    (
        "schedule",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCore.step",
            f"{V}v1/core/sched/scheduler.py:Scheduler.schedule",
        ),
    ),
    (
        "kv_cache",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCore.step",
            f"{V}v1/core/sched/scheduler.py:Scheduler.schedule",
            f"{V}v1/core/kv_cache_manager.py:KVCacheManager.allocate_slots",
            f"{V}v1/core/block_pool.py:BlockPool.get_new_blocks",
        ),
    ),
    (
        "prefix_hash",
        (
            *THREAD,
            f"{V}v1/engine/core.py:EngineCoreProc.process_input_sockets",
            f"{V}v1/core/kv_cache_utils.py:get_request_block_hasher.<locals>.request_block_hasher",
            f"{V}v1/core/kv_cache_utils.py:hash_block_tokens",
            f"{V}utils/hashing.py:sha256",
        ),
    ),
    (
        "ipc",
        (
            *THREAD,
            f"{V}v1/engine/core.py:EngineCoreProc.process_input_sockets",
            f"{V}v1/serial_utils.py:MsgpackDecoder.decode",
        ),
    ),
    (
        "idle",
        (
            *THREAD,
            f"{V}v1/engine/core.py:EngineCoreProc.process_input_sockets",
            "zmq/sugar/poll.py:Poller.poll",
        ),
    ),
    (
        "worker_wait",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCore.step_with_batch_queue",
            "concurrent/futures/_base.py:Future.result",
            "threading.py:Condition.wait",
        ),
    ),
    (
        "idle",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCoreProc._process_input_queue",
            "queue.py:Queue.get",
            "threading.py:Condition.wait",
        ),
    ),
    # 0.10-0.19: the engine reads its workers' answer inside collective_rpc
    (
        "worker_wait",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCore.step",
            f"{V}v1/executor/multiproc_executor.py:MultiprocExecutor.collective_rpc",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.dequeue",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.acquire_read",
        ),
    ),
    # 0.32, seen live: through FutureWrapper and get_response, spinning in sched_yield
    (
        "worker_wait",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCore.step",
            f"{V}v1/executor/multiproc_executor.py:MultiprocExecutor.sample_tokens",
            f"{V}v1/executor/multiproc_executor.py:MultiprocExecutor.collective_rpc",
            f"{V}v1/executor/multiproc_executor.py:FutureWrapper.result",
            f"{V}v1/executor/multiproc_executor.py:MultiprocExecutor.collective_rpc.<locals>.get_response",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.dequeue",
            "contextlib.py:_GeneratorContextManager.__enter__",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.acquire_read",
            f"{V}distributed/device_communicators/shm_broadcast.py:SpinCondition.wait",
            f"{V}distributed/utils.py:sched_yield",
        ),
    ),
    # sending the step to the workers is IPC, not a wait
    (
        "ipc",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCore.step",
            f"{V}v1/executor/multiproc_executor.py:MultiprocExecutor.execute_model",
            f"{V}v1/executor/multiproc_executor.py:MultiprocExecutor.collective_rpc",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.enqueue",
            f"{V}distributed/device_communicators/shm_broadcast.py:SpinCondition.notify",
            "zmq/sugar/socket.py:Socket.send",
        ),
    ),
    # a worker spinning for the next step, then (after a second without one) polling: idle
    (
        "step_wait",
        (
            f"{V}v1/executor/multiproc_executor.py:WorkerProc.worker_main",
            f"{V}v1/executor/multiproc_executor.py:WorkerProc.worker_busy_loop",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.dequeue",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.acquire_read",
            f"{V}distributed/device_communicators/shm_broadcast.py:SpinCondition.wait",
            f"{V}distributed/utils.py:sched_yield",
        ),
    ),
    (
        "idle",
        (
            f"{V}v1/executor/multiproc_executor.py:WorkerProc.worker_main",
            f"{V}v1/executor/multiproc_executor.py:WorkerProc.worker_busy_loop",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.dequeue",
            f"{V}distributed/device_communicators/shm_broadcast.py:SpinCondition.wait",
            "zmq/sugar/poll.py:Poller.poll",
        ),
    ),
    # the worker sending its output back
    (
        "ipc",
        (
            f"{V}v1/executor/multiproc_executor.py:WorkerProc.worker_busy_loop",
            f"{V}v1/executor/multiproc_executor.py:WorkerProc.handle_output",
            f"{V}distributed/device_communicators/shm_broadcast.py:MessageQueue.enqueue",
        ),
    ),
    # vLLM's own instrumentation vs answering a scrape of /metrics
    (
        "metrics",
        (
            *UVICORN,
            "prometheus_fastapi_instrumentator/middleware.py:PrometheusInstrumentatorMiddleware.__call__",
        ),
    ),
    (
        "metrics_scrape",
        (
            "anyio/_backends/_asyncio.py:WorkerThread.run",
            "prometheus_fastapi_instrumentator/instrumentation.py:PrometheusFastApiInstrumentator.expose.<locals>.metrics",
            "prometheus_client/exposition.py:generate_latest",
            "prometheus_client/registry.py:CollectorRegistry.collect",
            "prometheus_client/metrics.py:MetricWrapperBase.collect",
        ),
    ),
    (
        "metrics",
        (
            *CORE,
            f"{V}v1/metrics/loggers.py:StatLoggerManager.record",
            "prometheus_client/metrics.py:Gauge.set",
        ),
    ),
    (
        "model_execute",
        (
            *CORE,
            f"{V}v1/engine/core.py:EngineCore.step",
            f"{V}v1/executor/abstract.py:Executor.execute_model",
            f"{V}v1/worker/gpu_model_runner.py:GPUModelRunner.execute_model",
            f"{V}model_executor/models/llama.py:LlamaModel.forward",
            "torch/nn/modules/module.py:Module._call_impl",
        ),
    ),
    (
        "gpu_wait",
        (
            *CORE,
            f"{V}v1/worker/gpu_model_runner.py:GPUModelRunner.execute_model",
            f"{V}v1/worker/gpu_model_runner.py:GPUModelRunner._to_list",
        ),
    ),
    (
        "sample",
        (
            *CORE,
            f"{V}v1/worker/gpu_model_runner.py:GPUModelRunner.sample_tokens",
            f"{V}v1/sample/sampler.py:Sampler.forward",
        ),
    ),
    (
        "kv_connector",
        (
            *CORE,
            f"{V}v1/worker/gpu_model_runner.py:GPUModelRunner.execute_model",
            f"{V}distributed/kv_transfer/kv_connector/v1/lmcache_connector.py:LMCacheConnectorV1.start_load_kv",
        ),
    ),
    (
        "metrics",
        (
            *CORE,
            f"{V}v1/metrics/loggers.py:PrometheusStatLogger.record",
            "prometheus_client/metrics.py:Histogram.observe",
        ),
    ),
    ("schedule", (*CORE, f"{V}v1/engine/core.py:EngineCore.step", "some_lib/unknown.py:helper")),
]

S = "sglang/srt/"
SCHED = (
    "sglang/srt/managers/scheduler.py:run_scheduler_process",
    "sglang/srt/managers/scheduler.py:Scheduler.event_loop_normal",
)
SGLANG_CASES = [
    (
        "schedule",
        (
            *SCHED,
            f"{S}managers/scheduler.py:Scheduler.get_next_batch_to_run",
            f"{S}managers/schedule_policy.py:SchedulePolicy.calc_priority",
        ),
    ),
    (
        "kv_cache",
        (
            *SCHED,
            f"{S}managers/scheduler.py:Scheduler.get_next_batch_to_run",
            f"{S}mem_cache/radix_cache.py:RadixCache.match_prefix",
        ),
    ),
    (
        "model_execute",
        (
            *SCHED,
            f"{S}managers/scheduler.py:Scheduler.run_batch",
            f"{S}managers/tp_worker.py:TpModelWorker.forward_batch_generation",
            f"{S}model_executor/model_runner.py:ModelRunner.forward",
        ),
    ),
    (
        "sample",
        (
            *SCHED,
            f"{S}managers/scheduler.py:Scheduler.run_batch",
            f"{S}layers/sampler.py:Sampler.forward",
        ),
    ),
    (
        "output_process",
        (
            *SCHED,
            f"{S}managers/scheduler.py:Scheduler.process_batch_result",
            f"{S}managers/scheduler_output_processor_mixin.py:SchedulerOutputProcessorMixin.stream_output",
        ),
    ),
    (
        "ipc",
        (
            *SCHED,
            f"{S}managers/scheduler.py:Scheduler.recv_requests",
            "zmq/sugar/socket.py:Socket._deserialize",
        ),
    ),
    (
        "idle",
        (
            f"{S}managers/detokenizer_manager.py:DetokenizerManager.event_loop",
            "zmq/sugar/socket.py:Socket.recv_pyobj",
        ),
    ),
    (
        "detokenize",
        (
            f"{S}managers/detokenizer_manager.py:DetokenizerManager.event_loop",
            f"{S}managers/detokenizer_manager.py:DetokenizerManager.handle_batch_token_id_out",
            "transformers/tokenization_utils_base.py:PreTrainedTokenizerBase.batch_decode",
        ),
    ),
    (
        "tokenize",
        (
            *UVICORN,
            f"{S}managers/tokenizer_manager.py:TokenizerManager.generate_request",
            f"{S}managers/tokenizer_manager.py:TokenizerManager._tokenize_one_request",
            "transformers/tokenization_utils_base.py:PreTrainedTokenizerBase.encode",
        ),
    ),
    (
        "chat_template",
        (
            *UVICORN,
            f"{S}entrypoints/openai/serving_chat.py:OpenAIServingChat._process_messages",
            "transformers/tokenization_utils_base.py:PreTrainedTokenizerBase.apply_chat_template",
            "transformers/utils/chat_template_utils.py:render_jinja_template",
        ),
    ),
    (
        "sse",
        (
            *STREAM,
            f"{S}entrypoints/openai/serving_chat.py:OpenAIServingChat._generate_chat_stream",
            "orjson:dumps",
        ),
    ),
    (
        "preprocess",
        (*UVICORN, f"{S}managers/tokenizer_manager.py:TokenizerManager._create_tokenized_object"),
    ),
    ("http", (*UVICORN, f"{S}entrypoints/http_server.py:openai_v1_chat_completions")),
]

CB = "transformers/generation/continuous_batching/"
SRV = "transformers/cli/serving/"
MAIN = (
    "/venv/bin/transformers:<module>",
    "transformers/cli/serve.py:Serve.__init__",
    "uvicorn/server.py:Server.run",
    "asyncio/base_events.py:BaseEventLoop.run_forever",
    "asyncio/base_events.py:BaseEventLoop._run_once",
)
GEN = (
    *THREAD,
    f"{CB}continuous_api.py:ContinuousBatchingManager._run_generation_loop",
    f"{CB}continuous_api.py:ContinuousBatchingManager._generation_loop_body",
)
TRANSFORMERS_CASES = [  # shapes seen on the embedded target (py-spy 0.4.3, transformers 5.24)
    ("idle", (*MAIN, "selectors.py:EpollSelector.select")),
    (
        "tokenize",
        (
            *MAIN,
            "asyncio/events.py:Handle._run",
            *UVICORN[1:],
            f"{SRV}server.py:build_server.<locals>.chat_completions",
            f"{SRV}chat_completion.py:ChatCompletionHandler.handle_request",
            "transformers/tokenization_utils_base.py:PreTrainedTokenizerBase.apply_chat_template",
            "transformers/tokenization_utils_base.py:PreTrainedTokenizerBase.__call__",
            "transformers/tokenization_utils_tokenizers.py:TokenizersBackend._encode_plus",
        ),
    ),
    (
        "chat_template",
        (
            *MAIN,
            f"{SRV}chat_completion.py:ChatCompletionHandler.handle_request",
            "transformers/tokenization_utils_base.py:PreTrainedTokenizerBase.apply_chat_template",
            "transformers/utils/chat_template_utils.py:render_jinja_template",
            "jinja2/runtime.py:Context.call",
        ),
    ),
    (
        "sse",
        (
            *MAIN,
            "starlette/responses.py:StreamingResponse.stream_response",
            f"{SRV}chat_completion.py:ChatCompletionHandler._streaming.<locals>.sse_gen",
            f"{SRV}chat_completion.py:ChatCompletionHandler._build_chunk_sse",
            "pydantic/main.py:BaseModel.__init__",
            "pydantic/_internal/_model_construction.py:complete_model_class",
        ),
    ),
    (
        "sse",
        (
            *MAIN,
            "starlette/middleware/base.py:_StreamingResponse.__call__",
            "starlette/middleware/errors.py:ServerErrorMiddleware.__call__.<locals>._send",
            "uvicorn/protocols/http/h11_impl.py:RequestResponseCycle.send",
            "asyncio/selector_events.py:_SelectorSocketTransport.write",
        ),
    ),
    (
        "detokenize",
        (
            *MAIN,
            "asyncio/events.py:Handle._run",
            f"{CB}continuous_api.py:OutputRouter.deliver_batch.<locals>._run_batch",
            f"{SRV}utils.py:CBGenerateManager.generate_streaming.<locals>._on_output",
            f"{SRV}utils.py:CBStreamer.put",
        ),
    ),
    (
        "output_process",
        (
            *MAIN,
            "asyncio/events.py:Handle._run",
            f"{CB}continuous_api.py:OutputRouter.deliver_batch.<locals>._run_batch",
            f"{CB}continuous_api.py:ContinuousBatchingManager.register_result_handler.<locals>._auto_cleanup",
            f"{CB}requests.py:GenerationOutput.is_finished",
        ),
    ),
    (
        "preprocess",
        (
            *MAIN,
            f"{SRV}chat_completion.py:ChatCompletionHandler._streaming",
            f"{SRV}utils.py:CBGenerateManager.generate_streaming",
        ),
    ),
    (
        "model_execute",
        (
            *GEN,
            f"{CB}continuous_api.py:ContinuousBatchingManager._generation_step",
            f"{CB}continuous_api.py:ContinuousBatchProcessor._generation_step",
            f"{CB}model_runner.py:ModelRunner.compute_batch",
            "transformers/models/llama/modeling_llama.py:LlamaAttention.forward",
            "transformers/integrations/sdpa_attention.py:sdpa_attention_forward",
        ),
    ),
    (
        "kv_cache",
        (
            *GEN,
            f"{CB}continuous_api.py:ContinuousBatchProcessor._generation_step",
            "transformers/models/llama/modeling_llama.py:LlamaAttention.forward",
            f"{CB}cache.py:PagedAttentionCache.update",
            f"{CB}cache_allocators/full_attention.py:FullAttentionCacheAllocator.update",
        ),
    ),
    (
        "sample",
        (
            *GEN,
            f"{CB}model_runner.py:ModelRunner._forward_process_and_sample",
            f"{CB}model_runner.py:ModelRunner._sample",
        ),
    ),
    (
        "model_execute",
        (
            *GEN,
            f"{CB}continuous_api.py:ContinuousBatchProcessor.prepare_next_batch",
            f"{CB}input_outputs.py:ContinuousBatchingIOs.prepare_batch_tensors",
            f"{CB}utils.py:build_attention_mask",
        ),
    ),
    (
        "schedule",
        (
            *GEN,
            f"{CB}continuous_api.py:ContinuousBatchProcessor.prepare_next_batch",
            f"{CB}scheduler.py:FIFOScheduler.schedule_batch",
        ),
    ),
    ("idle", (*GEN, "threading.py:Event.wait", "threading.py:Condition.wait")),
    (
        "gpu_wait",
        (
            *GEN,
            f"{CB}input_outputs.py:ContinuousBatchingIOs.retrieve_device_outputs",
            "torch/cuda/streams.py:Stream.synchronize",
        ),
    ),
    (
        "idle",
        (
            *THREAD,
            "tqdm/_monitor.py:TMonitor.run",
            "threading.py:Event.wait",
            "threading.py:Condition.wait",
        ),
    ),
]


@pytest.mark.parametrize(
    ("server", "cases"),
    [("vllm", VLLM_CASES), ("sglang", SGLANG_CASES), ("transformers", TRANSFORMERS_CASES)],
)
def test_rules_place_each_stack(server, cases):
    classify = Classifier(rules_for(server)).category
    wrong = [
        (want, classify(stack(*frames)), frames[-1])
        for want, frames in cases
        if classify(stack(*frames)) != want
    ]
    assert not wrong, wrong


def test_a_rule_with_an_unknown_category_is_refused():
    with pytest.raises(ValueError, match="unknown category 'networking'"):
        Rule("networking")


def test_every_category_is_explained():
    from cputax.servers import MEANINGS

    assert list(MEANINGS) == list(CATEGORIES)


def test_leaf_and_within_constraints():
    classify = Classifier(rules_for("vllm")).category
    # a wait that is not the innermost frame is not idle: what runs below it decides
    assert (
        classify(
            stack(
                "selectors.py:EpollSelector.select",
                f"{V}v1/core/sched/scheduler.py:Scheduler.schedule",
            )
        )
        == "schedule"
    )
    # the same Condition.wait is worker_wait inside EngineCore.step, idle elsewhere
    assert classify(stack(*CORE, "threading.py:Condition.wait")) == "idle"
    assert classify(stack("unknown/x.py:f")) == "other"
    assert classify(()) == "other"


def test_editable_checkout_paths_match_by_tail():
    classify = Classifier(rules_for("vllm")).category
    path = "/home/me/src/vllm/vllm/v1/core/sched/scheduler.py"
    assert short_path(path) == path
    assert classify((Frame("Scheduler.schedule", path),)) == "schedule"
    assert (
        short_path("/usr/lib/python3.12/site-packages/vllm/v1/core/block_pool.py")
        == "vllm/v1/core/block_pool.py"
    )
    assert short_path("/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py") == "threading.py"


@pytest.mark.parametrize(
    ("cmd", "server", "role"),
    [
        ("VLLM::EngineCore", "vllm", "engine_core"),
        ("VLLM::EngineCore_DP1", "vllm", "engine_core"),
        ("VLLM::Worker_TP3", "vllm", "worker"),
        ("VLLM::APIServer_2", "vllm", "api_server"),
        ("VLLM::DPCoordinator", "vllm", "dp_coordinator"),
        (
            "/usr/bin/python3 /usr/local/bin/vllm serve meta-llama/Llama-3.1-8B --port 8000",
            "vllm",
            "api_server",
        ),
        ("python -m vllm.entrypoints.openai.api_server --model x", "vllm", "api_server"),
        ("sglang::scheduler_TP0", "sglang", "scheduler"),
        ("sglang::detokenizer", "sglang", "detokenizer"),
        ("python3 -m sglang.launch_server --model-path x", "sglang", "server"),
        (
            "/venv/bin/python3 /venv/bin/transformers serve /models/tiny --continuous-batching",
            "transformers",
            "server",
        ),
    ],
)
def test_process_titles(cmd, server, role):
    assert role_in(cmd, SERVERS[server]) == role
    others = [name for name, table in SERVERS.items() if name != server and role_in(cmd, table)]
    assert not others


def test_summarize_shape_and_other_frames():
    classifier = Classifier(rules_for("transformers"))
    main = ThreadId(7, 7, "MainThread")
    threads = {
        ("server 7", main): {
            stack(*MAIN, "selectors.py:EpollSelector.select"): 75.0,
            stack(*MAIN, "mystery/lib.py:spin"): 25.0,
        }
    }
    result = summarize(threads, classifier)
    row = result.threads[0]
    assert row.process == "server 7" and row.thread == "MainThread" and row.samples == 100
    # uvicorn at the root: the event loop's own work
    assert row.categories == {"http": 0.25, "idle": 0.75}
    assert result.other_top == []
    unknown = {("", ThreadId(None, 1, "t")): {stack("mystery/lib.py:spin"): 3.0}}
    assert summarize(unknown, classifier).other_top == [("spin (mystery/lib.py)", 3)]


def test_detect_server_from_stacks():
    vllm = {stack(*CORE, f"{V}v1/core/sched/scheduler.py:Scheduler.schedule"): 10.0}
    cb = {stack(*GEN, f"{CB}scheduler.py:FIFOScheduler.schedule_batch"): 10.0}
    assert detect_server([vllm]) == "vllm"
    assert detect_server([cb]) == "transformers"
    assert detect_server([{stack("x.py:f"): 1.0}]) is None


def test_attribute_raw_file(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (11): Thread-3 (_run_generation_loop);Thread._bootstrap (threading.py:1002);"
        f"ContinuousBatchingManager._run_generation_loop ({CB}continuous_api.py:1130);"
        f"sdpa_attention_forward (transformers/integrations/sdpa_attention.py:182) 30\n"
        "thread (11): Thread-3 (_run_generation_loop);Thread._bootstrap (threading.py:1002);"
        "Condition.wait (threading.py:331) 10\n"
        "thread (10): MainThread;<module> (transformers:6);"
        "EpollSelector.select (selectors.py:468) 40\n"
    )
    result = attribute_file(raw)
    assert result.server == "transformers"
    rows = {r.thread: r for r in result.threads}
    generation = rows["Thread-3 (_run_generation_loop)"]
    assert generation.categories == {"model_execute": 0.75, "idle": 0.25}
    assert generation.tid == 11
    assert rows["MainThread"].samples == 40
    assert result.categories["idle"] == pytest.approx(50 / 80)
    out = subprocess.run(
        [sys.executable, "-m", "cputax.cli", "attribute", str(raw), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert orjson.loads(out.stdout)["threads"][0]["categories"]
    text = subprocess.run(
        [sys.executable, "-m", "cputax.cli", "attribute", str(raw), "--server", "vllm"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "server: vllm" in text and "| MainThread |" in text


def _event(ph, name, file, ts, tid=1, pid=5):
    return {
        "args": {"filename": file, "line": 0},
        "cat": "py-spy",
        "name": name,
        "ph": ph,
        "pid": pid,
        "tid": tid,
        "ts": ts,
    }


def _synthetic_run(tmp_path: Path, launched: int) -> Path:
    """A run directory with one sampled window: MainThread idle 0-40 ms, tokenizing 40-100 ms."""
    root = ("thread (5): MainThread", "")
    loop = ("Server.run", "/venv/lib/python3.11/site-packages/uvicorn/server.py")
    events = [
        _event("B", *root, 0),
        _event("B", *loop, 0),
        _event("B", "EpollSelector.select", "/usr/lib/python3.11/selectors.py", 0),
        _event("E", "EpollSelector.select", "/usr/lib/python3.11/selectors.py", 40_000),
        _event(
            "B",
            "TokenizersBackend._encode_plus",
            "/venv/lib/python3.11/site-packages/transformers/tokenization_utils_tokenizers.py",
            40_000,
        ),
        _event("E", "TokenizersBackend._encode_plus", "x", 100_000),
        _event("E", *loop, 100_000),
        _event("E", *root, 100_000),
    ]
    folder = tmp_path / "pyspy" / "w"
    folder.mkdir(parents=True)
    (folder / "server-5.chrometrace.json").write_bytes(orjson.dumps(events))
    with JsonlWriter(tmp_path / "pyspy" / "manifest.jsonl") as m:
        m.write(
            {
                "window": "w",
                "pid": 5,
                "role": "server",
                "server": "transformers",
                "rate": 100,
                "files": {"chrometrace": "pyspy/w/server-5.chrometrace.json"},
                "t_launch_ns": launched - 1000,
                "t_launched_ns": launched,
                "t_stop_ns": launched + 100_000_000,
                "status": "ok",
                "message": None,
                "samples": 10,
                "errors": 0,
                "behind_s": 0.0,
                "behind_warnings": 0,
                "cpu_s": 0.01,
            }
        )
    with JsonlWriter(tmp_path / "windows.jsonl") as w:
        w.write(
            {"scenario": "w", "start_ns": launched + 20_000_000, "end_ns": launched + 100_000_000}
        )
    return RunDir(tmp_path)


def test_run_attribution_uses_the_client_window(tmp_path):
    run = _synthetic_run(tmp_path, launched=1_000_000_000)
    result = attribute_run(run)
    window = result.windows[0]
    row = window.threads[0]
    # the window starts 20 ms in: 20 ms idle, 60 ms tokenize
    assert row.categories == {"tokenize": pytest.approx(0.75), "idle": pytest.approx(0.25)}
    assert row.samples == 8 and row.role.startswith("event loop")
    assert window.processes[0].coverage == pytest.approx(1.0) and not window.processes[0].partial
    assert window.columns == ["tokenize", "idle"]
    assert window.headline.category == "tokenize" and window.headline.share == pytest.approx(0.75)


def test_a_window_py_spy_saw_only_part_of_is_partial(tmp_path):
    from cputax.analysis.attribution import FULL_COVERAGE

    launched = 1_000_000_000
    run = _synthetic_run(tmp_path, launched)
    # the trace spans launched .. +100 ms; a window from 50 ms before: 100 of 150 ms seen
    window = {"scenario": "w", "start_ns": launched - 50_000_000, "end_ns": launched + 100_000_000}
    (tmp_path / "windows.jsonl").write_bytes(orjson.dumps(window) + b"\n")
    view = attribute_run(run).windows[0].processes[0]
    assert view.coverage == pytest.approx(2 / 3) and view.coverage < FULL_COVERAGE
    assert view.partial


def test_category_timeline_is_on_the_run_clock(tmp_path):
    launched = 5_000_000_000
    spans = category_timeline(_synthetic_run(tmp_path, launched))
    assert spans == {
        (5, "MainThread"): [
            (launched, launched + 40_000_000, "idle"),
            (launched + 40_000_000, launched + 100_000_000, "tokenize"),
        ]
    }
    assert category_timeline(RunDir(tmp_path / "nothing")) == {}


def test_report_section(tmp_path):
    from cputax.report.profiling import profiling_section

    run = _synthetic_run(tmp_path, launched=1_000_000_000)
    info = {"monitors": {"pyspy": {"config": {"rate": 100}, "pyspy": "py-spy 0.4.3"}}}
    text = profiling_section(Results(info, Summary(), attribute_run(run)))
    assert "## Where the server's CPU time went" in text
    assert (
        "During w, the server 5 thread MainThread (event loop) spent 75% of its time in tokenize."
        in text
    )
    assert "| server 5 | MainThread (event loop" in text
    assert profiling_section(Results({}, Summary())) is None
    problem = profiling_section(
        Results({"monitors": {"pyspy": {"problem": "no ptrace"}}}, Summary())
    )
    assert "No profiles: no ptrace" in problem


def test_overhead_pairs_scenarios_and_the_report_renders_them():
    from cputax.analysis.profiling_findings import ScenarioFigures, sampling_overhead
    from cputax.report.profiling import overhead_text

    def scen(tps, ttft):
        return ScenarioFigures(output_tps=tps, ttft_ms=ttft)

    figures = {
        "a": scen(97.0, 110.0),
        "a-nopyspy": scen(100.0, 100.0),
        "b-nopyspy": scen(100.0, 100.0),
        "b": scen(101.0, 100.0),
    }
    overhead = sampling_overhead(figures, [])
    assert [p.name for p in overhead.pairs] == ["a", "b"]
    assert overhead.tps_mean_pct == pytest.approx(-1.0)
    assert (overhead.tps_min_pct, overhead.tps_max_pct) == (pytest.approx(-3.0), pytest.approx(1.0))
    assert overhead.ttft_mean_pct == pytest.approx(5.0)
    text = overhead_text(overhead)
    assert "| a | 97.0 / 100.0 | -3.0% | 110 / 100 | +10.0% |" in text
    assert "Mean over 2 pairs: throughput -1.0% (pairs from -3.0% to +1.0%), TTFT +5.0%" in text
    assert sampling_overhead({"a": scen(1.0, 20.0)}, []) is None
    window = Window(
        name="a",
        wall_s=10.0,
        processes=[
            ProcessView(process="server 5", pid=5, role="server", status="ok", pyspy_cpu_s=2.0)
        ],
    )
    per_core = sampling_overhead(figures, [window], cpus=8).pairs[0]
    assert per_core.pyspy_core_pct == pytest.approx(20.0)  # 2 s of CPU in 10 s
    assert per_core.pyspy_cores_pct == pytest.approx(20.0 / 8)
    assert "20.0% (2.5% of 8)" in overhead_text(sampling_overhead(figures, [window], cpus=8))
    assert overhead_text(None) is None
