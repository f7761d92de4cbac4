"""Routing plans are context-local: two threads running routed forwards at the same moment each see
only their own plan. A barrier holds both threads inside the forward pass after both have activated
their plans, so a plan stored anywhere shared (a module attribute, a global) would be overwritten by
the other thread and the results would differ from the single-thread ones."""

from __future__ import annotations

import threading

import pytest
import torch

from horen_core import HorenConfig
from horen_core.layer import activate

PROMPTS = ["the capital of France is", "Bob plays the instrument piano and the sport"]
TARGETS = ["Rome", "chess"]
TIMEOUT = 20


@pytest.fixture
def editor(tiny_model, make_editor):
    editor = make_editor(*tiny_model, HorenConfig(layer=1, max_steps=20))
    for p, t in zip(PROMPTS, TARGETS):
        editor.edit(p, t)
    return editor


def routed_forward(editor, prompt: str, before_layers=None, in_router=None):
    """One routed forward of ``prompt`` outside the editor's lock, with optional rendezvous points."""
    ids = torch.tensor([editor.encode_prompt(prompt)])
    plan = editor.routing.route_plan(torch.ones_like(ids))
    if in_router is not None:
        router = plan.router

        def waiting_router(queries, x):
            in_router()
            return router(queries, x)

        plan.router = waiting_router
    handle = None
    if before_layers is not None:
        handle = editor.model.get_input_embeddings().register_forward_pre_hook(lambda *_: before_layers())
    try:
        with torch.no_grad(), activate(plan):
            logits = editor.model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return plan.entry_ids, plan.queries, logits


def run_in_threads(fns):
    results, errors = [None] * len(fns), []

    def run(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def test_concurrent_routed_forwards_see_only_their_own_plan(editor):
    single = [routed_forward(editor, p) for p in PROMPTS]
    assert single[0][0] != single[1][0], "the two prompts route to different entries"

    # both threads activate their plans, then wait for each other before the layers (and again inside
    # the routed layer), so both plans are live at the same moment
    start, routed = threading.Barrier(2, timeout=TIMEOUT), threading.Barrier(2, timeout=TIMEOUT)
    hooked = threading.Lock()  # the pre-hook is registered on a shared module: wait only once per thread
    waited: set[int] = set()

    def before_layers():
        with hooked:
            first = threading.get_ident() not in waited
            waited.add(threading.get_ident())
        if first:
            start.wait()

    results = run_in_threads(
        [lambda p=p: routed_forward(editor, p, before_layers=before_layers, in_router=routed.wait) for p in PROMPTS]
    )
    for (entries, queries, logits), (s_entries, s_queries, s_logits) in zip(results, single):
        assert entries == s_entries
        torch.testing.assert_close(queries, s_queries)
        torch.testing.assert_close(logits, s_logits)


def test_concurrent_generate_calls_equal_single_thread(editor):
    prompts = [*PROMPTS, "who wrote", "which river"]
    single = [editor.generate([p], max_new_tokens=4)[0] for p in prompts]
    go = threading.Barrier(len(prompts), timeout=TIMEOUT)

    def call(p):
        go.wait()
        return editor.generate([p], max_new_tokens=4)[0]

    results = run_in_threads([lambda p=p: call(p) for p in prompts])
    for got, want in zip(results, single):
        assert (got.token_ids, got.entry_id, got.edit_id) == (want.token_ids, want.entry_id, want.edit_id)


def test_plan_is_inactive_outside_its_context(editor):
    ids = torch.tensor([editor.encode_prompt(PROMPTS[0])])
    plan = editor.routing.route_plan(torch.ones_like(ids))
    with torch.no_grad():
        with activate(plan):
            edited = editor.model(input_ids=ids).logits
        plain = editor.model(input_ids=ids).logits
    assert plan.entry_ids[0] is not None
    assert not torch.allclose(edited, plain)
    # another thread started while a (fresh) plan is active in this one does not inherit it
    fresh = editor.routing.route_plan(torch.ones_like(ids))
    with activate(fresh):
        other = run_in_threads([lambda: editor.model(input_ids=ids).logits.detach()])[0]
    torch.testing.assert_close(other, plain)
    assert not fresh.done
