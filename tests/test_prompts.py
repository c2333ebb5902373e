"""Prompt building: sized to the target, unique per request, sharing the agent prefix."""

import asyncio

import pytest

from cputax.text.conversation import render_chat
from cputax.workload.profiles import Scenario
from cputax.workload.prompts import ScenarioPrompts, local_counter


def prepared(tok, **kw):
    sc = Scenario(name=kw.pop("name", "s"), **kw)
    prompts = ScenarioPrompts(sc, tok, model="m")
    asyncio.run(prompts.prepare(local_counter(tok)))
    return prompts


@pytest.mark.parametrize("ctx", [600, 3000, 20000])
def test_prompts_hit_the_target_size(tok, ctx):
    p = prepared(tok, concurrency=2, context_tokens=ctx)
    for i in range(3):
        n = tok.count(render_chat(p.messages(i), p.tools))
        assert abs(n - ctx) <= max(3, ctx * 0.005), (i, n)


def test_every_request_is_distinct_but_shares_the_agent_prefix(tok):
    p = prepared(tok, concurrency=4, context_tokens=20000)
    texts = [render_chat(p.messages(i), p.tools) for i in range(4)]
    assert len(set(texts)) == 4
    system = p.messages(0)[0]["content"]
    assert p.tools and all(m[0]["content"] == system for m in map(p.messages, range(4)))
    # the shared part (system + tools) is about the scenario's shared prefix
    shared = tok.count(
        render_chat([{"role": "system", "content": system}], p.tools, add_generation_prompt=False)
    )
    assert abs(shared - p.scenario.shared_prefix) < 0.05 * p.scenario.shared_prefix
    # user parts diverge at their start, so chained prefix hashes differ from there on
    users = [p.messages(i)[-1]["content"] for i in range(4)]
    assert len({u[:40] for u in users}) == 4


def test_subagents_share_their_parents_session_prefix(tok):
    p = prepared(tok, concurrency=6, context_tokens=4000, users=2, subagents_per_user=2)
    assert [p.session_of(i) for i in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    users = [p.messages(i)[-1]["content"] for i in range(6)]
    prefix0 = p._session_prefix(0)
    assert all(u.startswith(prefix0) for u in users[:3])
    assert not users[3].startswith(prefix0)
    assert len(set(users)) == 6
    r = p.record(4, batch=1)
    assert (r.session, r.subagent, r.batch, r.target_prompt_tokens) == ("user1", "sub1", 1, 4000)


def test_payload_is_a_streaming_request_with_usage(tok):
    p = prepared(tok, concurrency=1, context_tokens=800, max_tokens=7)
    body = p.payload(p.messages(0))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 7 and body["model"] == "m" and body["ignore_eos"] is True
    assert body["messages"][-1]["role"] == "user"
    p.api = "completions"
    body = p.payload(p.messages(0))
    assert "messages" not in body and abs(tok.count(body["prompt"]) - 800) <= 4
