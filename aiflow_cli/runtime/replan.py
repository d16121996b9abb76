"""Re-planning when the link changes: the device measures its link, re-solves, and switches every tier to a
new plan between requests, without dropping a session in flight.

Device side (:class:`Replanner`, used by ``Pipeline(replan=True)``): every message the device sends to the next
tier feeds a :class:`~aiflow_cli.runtime.linkwatch.LinkWatch`; after each request, :meth:`Replanner.after`
asks the :class:`~aiflow_cli.runtime.linkwatch.ReplanPolicy` whether the measured link is far from the one the
plan was solved for, re-solves the plan's problem (the same profiles, limits and objective, the device's link
replaced by the measured one: ``Problem.with_link``, the exact DP of aiflow_cli/plan/solver.py) and, when the new
plan is predicted better than the current one on the measured link by the margin, sends a
:class:`~aiflow_cli.runtime.protocol.Replan` down the chain and switches its own node once every tier answered.

Server side (:class:`PlanRouter`, the handler of ``aiflow serve``): a tier holds one :class:`TierNode` per plan
it serves (the current and the previous one: :data:`KEEP_PLANS`), each with its own stages (loaded from the
same model cache) and sessions; requests are routed by the plan hash they carry, so a session opened under the
old plan finishes under it, and one whose plan was dropped is refused with the one-line plan mismatch error,
never answered under another plan. Before any switch the router hands every request straight to the node (no
extra decoding on the decode path).

Not re-planned: links behind the edge (the device times its own link only; the edge-cloud link keeps the
plan's assumption), the downlink (it keeps its ratio to the uplink), and the fixed per-message costs
(``Overheads``: the plan file does not record them). A re-plan's fidelity is not re-measured end to end: its
``fidelity.status`` says ``not measured``; per-cut floors and the composed bound still hold.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from aiflow_cli.errors import InputError, PeerRejected, PlanError
from aiflow_cli.links import LinkProfile
from aiflow_cli.plan.cost import Placement, evaluate
from aiflow_cli.plan.problem import Limits, Problem, build_problem
from aiflow_cli.plan.schema import Plan
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.linkwatch import LinkWatch, ReplanPolicy
from aiflow_cli.runtime.protocol import HelloReply, Replan
from aiflow_cli.transport import Message, PeerInfo

#: Plans a server tier keeps loaded: the current one and the one before (its sessions finish under it).
KEEP_PLANS = 2


# -- the plan's problem ----------------------------------------------------------------------------------------
def problem_for(plan: Plan) -> Problem:
    """The problem ``plan`` was solved for, rebuilt from what it records: its profiles (by path), speeds,
    links, limits, objective, tokens, input size and speculation. :class:`InputError` when a profile path is
    missing (give the problem explicitly: ``Pipeline(replan=ReplanConfig(problem=...))``)."""
    from aiflow_cli.profile import load_profile

    sf = plan.solved_for
    paths = {t: ref.path or "" for t, ref in sf.profiles.items()}
    missing = [t for t, p in paths.items() if not p]
    if missing:
        raise InputError(
            f"replan: the plan does not record the {missing[0]} profile's path (solve it from profile files), so "
            f"it cannot be re-solved",
            param="replan",
        )
    loaded: dict[str, Any] = {}
    profiles = {t: loaded.setdefault(p, load_profile(p)) for t, p in paths.items()}
    limits = Limits(
        memory_bytes=dict(sf.memory_bytes),
        min_fidelity=sf.min_fidelity,
        skip=frozenset(sf.skip),
        require=frozenset(sf.require),
        codecs=tuple(sf.codecs) if sf.codecs is not None else None,
    )
    return build_problem(
        profiles,
        dict(sf.links),
        objective=sf.objective,
        tokens=sf.tokens,
        limits=limits,
        speeds={t: ref.speed for t, ref in sf.profiles.items()},
        input_bytes=sf.input_bytes,
        speculate=sf.speculate or None,
    )


def placement_of(plan: Plan, problem: Problem) -> Placement:
    """``plan``'s stage ranges and codecs as a :class:`Placement` of ``problem`` (to price it on another link)."""
    names = [t.name for t in plan.tiers]
    if names != problem.tiers or plan.n_stages != problem.n_stages:
        raise PlanError(
            f"replan: the plan ({' -> '.join(names)}, {plan.n_stages} stages) is not of this problem "
            f"({' -> '.join(problem.tiers)}, {problem.n_stages} stages)"
        )
    bounds = [t.start for t in plan.tiers]  # an empty tier's range is empty where the next one starts
    codecs = {c.after_stage + 1: problem.codecs.index(c.codec) for c in plan.cuts}
    return Placement((*bounds, problem.n_stages), codecs)


# -- the device side -------------------------------------------------------------------------------------------
@dataclass
class ReplanConfig:
    """``Pipeline(replan=...)``: the hysteresis (:class:`ReplanPolicy`), the problem to re-solve (default:
    rebuilt from the plan, :func:`problem_for`) and the measurement window (messages)."""

    policy: ReplanPolicy = field(default_factory=ReplanPolicy)
    problem: Optional[Problem] = None
    window: int = 32
    skip_requests: int = 1
    """Requests at the start that are not measured: the first transfers of a new pipeline include the
    connection's start-up (handshake, congestion window growth) and under-report the link."""


class Replanner:
    """The device's re-planning state for one pipeline (see the module docstring). Thread-safe."""

    def __init__(self, plan: Plan, config: ReplanConfig):
        self.policy = config.policy.check()
        self.problem = config.problem or problem_for(plan)
        if not self.problem.links:
            raise InputError("replan: the plan has one tier, there is no link to watch", param="replan")
        self.placement = placement_of(plan, self.problem)
        self.plan = plan
        self.assumed = self.problem.links[0]  # the device's link as the plan assumed it
        self.solved_link: LinkProfile = self.assumed  # the link the current plan was last solved for
        self.watch = LinkWatch(config.window)
        self.skip_requests = config.skip_requests
        self.switched_at = float("-inf")
        self.events: list[dict[str, Any]] = []
        self.requests = 0
        self.solves = 0
        self._lock = threading.Lock()

    def observe(self, bytes_up: int, bytes_down: int, wire_ms: float) -> None:
        """One message of the device over its link (the node's hook)."""
        with self._lock:
            if self.requests >= self.skip_requests:
                self.watch.observe(bytes_up, bytes_down, wire_ms, time.monotonic())

    def propose(self, client: Any = None) -> Optional[tuple[Plan, dict[str, Any]]]:
        """A better plan for the measured link and the event describing it, or None (see the module
        docstring). ``client``: the device's transport client, for QUIC's path statistics."""
        with self._lock:
            self.requests += 1
            if client is not None:
                try:
                    self.watch.observe_path(client.path_info())
                except Exception:  # path statistics are a report, never a reason to fail a request
                    pass
            now = time.monotonic()
            est = self.watch.estimate()
            if est is None or est.uplink_mbps is None or not self.policy.ready(self.watch, now, self.switched_at):
                return None
            measured = est.apply(self.assumed)
            if not self.policy.link_moved(measured, self.solved_link):
                return None
            problem = self.problem.with_link(0, measured)
            self.solved_link = measured
            self.solves += 1
            current = evaluate(problem, self.placement)
            try:
                from aiflow_cli.plan.solver import solve_problem

                t0 = time.perf_counter()
                placement, ev = solve_problem(problem)
                solve_ms = (time.perf_counter() - t0) * 1e3
            except PlanError:
                return None
            if placement.signature() == self.placement.signature() or not self.policy.better(
                ev.total_ms, current.total_ms
            ):
                return None
            from aiflow_cli.plan.explain import placement_summary
            from aiflow_cli.plan.schema import plan_from_solution

            sources = {t: ref.path for t, ref in self.plan.solved_for.profiles.items() if ref.path}
            plan = plan_from_solution(problem, placement, ev, solve_ms=solve_ms, sources=sources)
            event = {
                "after_request": self.requests,
                "old": placement_summary(problem, self.placement),
                "new": placement_summary(problem, placement),
                "assumed_link": _link_json(self.problem.links[0]),
                "measured_link": _link_json(measured),
                "estimate": est.to_json(),
                "predicted_old_ms": round(current.total_ms, 3),
                "predicted_new_ms": round(ev.total_ms, 3),
            }
            return plan, event

    def switched(self, plan: Plan, event: dict[str, Any]) -> None:
        """Records that every tier switched to ``plan``."""
        with self._lock:
            self.plan = plan
            self.placement = placement_of(plan, self.problem)
            self.switched_at = time.monotonic()
            self.events.append(event)

    def to_json(self) -> dict[str, Any]:
        est = self.watch.estimate()
        return {
            "switches": list(self.events),
            "requests": self.requests,
            "solves": self.solves,
            "estimate": est.to_json() if est else None,
            "assumed_link": _link_json(self.assumed),
        }


def _link_json(link: LinkProfile) -> dict[str, Any]:
    return {"rtt_ms": round(link.rtt_ms, 3), "uplink_mbps": round(link.uplink_mbps, 4)}


def send_replan(client: Any, old_hash: str, plan: Plan, sender: str, timeout_s: float) -> tuple:
    """Proposes ``plan`` to the tier behind ``client`` (which forwards it down the chain); returns the chain's
    :class:`TierInfo` for the new plan, or raises what a tier refused with."""
    msg = Replan(old_hash, sender, _plan_text(plan), protocol.plan_hash(plan), timeout_s * 1e3)
    reply = client.request(protocol.encode(msg), timeout_s=timeout_s)
    return protocol.expect_reply(reply, HelloReply).chain


def _plan_text(plan: Plan) -> str:
    return plan.model_dump_json()


# -- the server side -------------------------------------------------------------------------------------------
class PlanRouter:
    """The transport handler of a server tier that can switch plans (see the module docstring). ``node``: the
    tier's node for its starting plan (each new plan's node is ``node.like(plan)``); ``next_client``: its
    connection to the next tier (None for the last)."""

    def __init__(self, node: Any, next_client: Any = None):
        self.next_client = next_client
        self.nodes: OrderedDict[str, Any] = OrderedDict({node.plan_hash: node})
        self._lock = threading.Lock()
        self._switch_lock = threading.Lock()  # one switch at a time

    @property
    def current(self) -> Any:
        return next(reversed(self.nodes.values()))

    def handle(self, env: Message, peer: PeerInfo) -> Message:
        """Never raises (failures become error replies, as :meth:`TierNode.handle`)."""
        if env.kind == protocol.REPLAN:
            return self._replan(env)
        nodes = self.nodes
        if len(nodes) == 1:
            return next(iter(nodes.values())).handle(env, peer)
        node = self.current
        try:  # route by the plan hash the request carries; a malformed one is answered by the current node
            node = nodes.get(getattr(protocol.decode(env), "plan_hash", ""), node)
        except Exception:
            pass
        return node.handle(env, peer)

    def _replan(self, env: Message) -> Message:
        cur = self.current
        try:
            msg = protocol.decode(env)
            assert isinstance(msg, Replan)
            plan = msg.new_plan()
            mine = cur.plan
            if plan.model_hash != mine.model_hash:
                raise PeerRejected(
                    f"replan refused by {cur.tier}: the new plan is of model {plan.model} (hash "
                    f"{plan.model_hash[:12]}), this tier runs {mine.model} (hash {mine.model_hash[:12]})"
                )
            if [t.name for t in plan.tiers] != [t.name for t in mine.tiers]:
                raise PeerRejected(
                    f"replan refused by {cur.tier}: the new plan's tiers ({' -> '.join(t.name for t in plan.tiers)}) "
                    f"are not this chain's ({' -> '.join(t.name for t in mine.tiers)})"
                )
            deadline = time.monotonic() + max(0.0, msg.deadline_ms) / 1e3
            with self._switch_lock:
                node = self.nodes.get(msg.new_hash)
                if node is None:
                    node = cur.like(plan)
                behind: tuple = ()
                if self.next_client is not None:
                    budget = max(0.0, deadline - time.monotonic()) * 0.9
                    behind = send_replan(self.next_client, msg.plan_hash, plan, cur.tier, budget)
                with self._lock:
                    nodes = OrderedDict(self.nodes)
                    nodes.pop(msg.new_hash, None)
                    nodes[msg.new_hash] = node
                    while len(nodes) > KEEP_PLANS:
                        nodes.popitem(last=False)  # its sessions are refused from now on (plan mismatch)
                    self.nodes = nodes
            return protocol.encode(HelloReply((node.info(),) + tuple(behind)))
        except Exception as e:
            return protocol.error_reply(cur.tier, e)


def after_request(pipeline: Any) -> dict[str, Any]:
    """The device's step between requests: propose a plan for the measured link, switch every tier to it when
    they all accept, swap the pipeline's node. Returns what the run reports (``RunResult.replan``): the
    estimate, and the switch when one happened. A refused switch keeps the current plan (reported, not
    raised: the request itself succeeded)."""
    rp: Replanner = pipeline.replanner
    old = pipeline.node
    proposal = rp.propose(pipeline._client)
    out: dict[str, Any] = {"estimate": (e.to_json() if (e := rp.watch.estimate()) else None), "switch": None}
    if proposal is None:
        return out
    plan, event = proposal
    t0 = time.perf_counter()
    try:
        chain = send_replan(pipeline._client, old.plan_hash, plan, "device", pipeline.timeout_s)
        node = old.like(plan, exit_head=pipeline.speculate is not None)
        if pipeline.speculate is not None and plan.stages_for("device").stop > 0:  # drafts from the new last block
            from aiflow_cli.runtime.drafters import make_drafter

            node.drafter = make_drafter(pipeline._draft, node.model, plan.stages_for("device").stop)
    except Exception as e:  # the tiers keep serving the current plan; so does the device
        out["refused"] = f"{type(e).__name__}: {e}"
        return out
    node.on_link = rp.observe
    event["switch_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    event["tiers"] = [{"tier": t.tier, "stages": list(t.stages), "load_ms": t.load_ms} for t in chain]
    pipeline.node, pipeline.plan = node, plan
    if pipeline.speculate is not None and not node.is_driver:
        pipeline.speculate = None  # the new device holds no decode stage: nothing to draft with
    rp.switched(plan, event)
    out["switch"] = event
    return out
