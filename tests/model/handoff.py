"""An explicit-state model of relocd's migration handoff, checked breadth-first.

Why: the fault matrix (docs/faults.md) kills and cuts at nine fixed points
of real runs; this model tries every interleaving of crashes, lost messages
and timeouts around the handoff, within stated bounds, against the rule the
daemon exists to keep -- the domain runs on exactly one host, never two,
never none, never from a stale snapshot, and nothing half-moved is left
behind -- or, where a power loss takes the target's copy after it may have
run, the migration left in doubt for the operator (see ``left_for_operator``).

What is modelled (docs/faults.md, "The handoff model", says what is not):

* two daemons, source and target, each with a durable journal (its phase,
  and for the source whether the entry is closed: both kept across a crash)
  and volatile memory (``mode``: what the daemon is doing; lost on a crash);
* one domain copy per host, as the hypervisor shows it: ``absent``,
  ``partial`` (target only: half received), ``paused`` or ``running``, and
  its name (normal, ``--incoming``, ``--migratedaway``).  A copy outlives its
  daemon's crash; with ``Bounds.power_loss`` a crash may take it too;
* which copy holds the latest state: the target's copy is a snapshot of the
  source's paused one, so it is stale once the source's copy has run again
  (``State.src_ran``); the source's is stale once the target's has run
  (``State.tgt_ran``);
* a lossy, reordering link: the set of messages in flight (RESERVE..COMMIT
  is one COMMIT message); any message may be lost, the link may be cut
  (every message in flight lost); a message to a daemon that is down is lost;
* timeouts, which may fire whenever a daemon waits (a slow link looks the
  same as a dead one);
* local failures: the target's hypervisor may fail to resume its copy; the
  source's rename to ``--migratedaway`` or its GO_SENT journal write may fail;
* recovery: a crashed daemon restarts and decides from its journal and the
  hypervisor, never from what it had in memory.

``Protocol()`` is the handoff as relocd intends it; the other flags are
broken variants the checker must catch (``VARIANTS``).  Run
``python -m tests.model.handoff [VARIANT]`` to see a search and its trace.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

# A domain copy, as its host's hypervisor shows it.
ABSENT, PARTIAL, PAUSED, RUNNING = "absent", "partial", "paused", "running"
NORMAL, INCOMING, AWAY = "normal", "--incoming", "--migratedaway"
COMPLETE = (PAUSED, RUNNING)

# Journal phases (durable).  A source entry is also open or closed
# (``Host.closed``, the journal's ``finished``): ABORTED and open is "rolled
# back (or rolling back) here, the target not yet confirmed to hold no copy".
STREAMING, STOPPED, PREPARED, GO_SENT, DONE = "STREAMING", "STOPPED", "PREPARED", "GO_SENT", "DONE"
ABORTED = "ABORTED"
# The target's: RESUMING when GO is taken (before the rename), STARTING right
# before the resume call (from there the copy may have run), RESUMED after it.
RECEIVING, RESUMING, STARTING, RESUMED = "RECEIVING", "RESUMING", "STARTING", "RESUMED"
TARGET_FINAL = (RESUMED, ABORTED)

DOWN = "down"  # the mode of a crashed daemon

# Messages in flight are strings "NAME>s" (to the source) or "NAME>t" (to the target).
OUTCOMES = ("PREPARED", "RECEIVING", "RESUMED", "ABORTED", "UNKNOWN")

# The ownership record's states (docs/cluster.md): owned by the source; offered
# to this migration; taken by the target; taken and released by the source;
# the source's again with this migration fenced (a fence, or a give-back).
REC_SRC, REC_OFFERED, REC_TAKEN, REC_RELEASED, REC_FENCED = "owned(S)", "offered(S,M)", "taken(T,M)", "released(T,M)", "fenced(S,M)"


class Host(NamedTuple):
    """One side: its daemon (journal + memory) and its copy of the domain."""

    up: bool
    phase: str  # journal: survives a crash
    mode: str  # memory: what the daemon is doing; DOWN while crashed
    dom: str  # the copy: ABSENT, PARTIAL, PAUSED, RUNNING (survives a daemon crash)
    name: str  # NORMAL, INCOMING, AWAY
    #: journal: the entry is finished (source only; the target's RESUMED and ABORTED are final)
    closed: bool = False

    def show(self) -> str:
        copy = "-" if self.dom == ABSENT else self.dom + ("" if self.name == NORMAL else self.name)
        return f"{self.phase}{' (closed)' if self.closed else ''}/{self.mode} copy={copy}"


class State(NamedTuple):
    src: Host
    tgt: Host
    net: frozenset[str]
    crashes: int
    power_losses: int
    losses: int
    resume_failures: int
    #: the source's rename to --migratedaway or its GO_SENT journal write failed
    local_failures: int
    #: a power loss (or a fault after one) destroyed the domain itself (see
    #: _loses_domain): from then on a run may end with no copy
    lost: bool
    #: the source's copy ran again after its pause: the target's snapshot is stale
    src_ran: bool = False
    #: the target's copy ran: the source's paused copy is stale
    tgt_ran: bool = False
    #: a power loss took the target's copy while its journal said STARTING: the
    #: copy may have run, nobody can tell, and the migration may be left in
    #: doubt for the operator (left_for_operator); the only such allowance
    in_doubt: bool = False
    #: the cluster store's ownership record (Protocol.store; "" without a store):
    #: REC_SRC, REC_OFFERED, REC_TAKEN, REC_RELEASED, REC_FENCED (docs/cluster.md).
    #: It survives every crash and power loss.
    rec: str = ""
    #: store operations that failed: unreachable (not applied) or slow (applied, answer lost)
    store_faults: int = 0

    def show(self) -> str:
        net = " ".join(sorted(self.net)) or "-"
        ran = "".join(f" [{who} ran]" for who, r in (("source", self.src_ran), ("target", self.tgt_ran)) if r)
        flags = (" [domain lost]" if self.lost else "") + (" [in doubt: copy lost at STARTING]" if self.in_doubt else "")
        store = f" | store {self.rec}" if self.rec else ""
        return f"S {self.src.show()} | T {self.tgt.show()} | net {net}{store}{ran}{flags}"


INITIAL = State(
    src=Host(True, STREAMING, "streaming", RUNNING, NORMAL),
    tgt=Host(True, RECEIVING, "receiving", PARTIAL, INCOMING),
    net=frozenset(),
    crashes=0,
    power_losses=0,
    losses=0,
    resume_failures=0,
    local_failures=0,
    lost=False,
)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Which handoff the model runs: all False is relocd's intended protocol.

    (a)-(c) are the broken handoffs issue 11 asks the checker to catch;
    (a) and (d)-(g) are also what relocd's committed code did at 81cf964
    (target.py, source.py, server/recovery.py), read by hand; (h) and (i)
    together are what they did until f92650c; (j) and (k) what they did
    until 7f4e5cd.  (l) is no code's: it shows that the checker allows a
    migration left for the operator only where it must.  (m) is what
    ``target.py`` still does at 7f4e5cd (a divergence: see docs/faults.md,
    "The handoff model").
    """

    #: (a) target journals RESUMED after the resume, no RESUMING intent, and its
    #: recovery takes PREPARED-with-a-renamed-copy for aborted (target.py, recovery.py at 81cf964)
    no_resuming_intent: bool = False
    #: (b) source takes a QUERY with no answer, or a GO_SENT entry it has no
    #: memory of after a restart, for ABORTED
    silence_is_aborted: bool = False
    #: (c) source resumes its own copy when RESUMED does not come after GO
    resume_on_timeout_after_go: bool = False
    #: (d) a source restarted at GO_SENT whose copy is gone closes the migration
    #: without asking the target (recovery.py at 81cf964)
    give_up_without_copy: bool = False
    #: (e) a rollback journals the migration finished at once; telling the
    #: target to drop its prepared copy lives only in memory (source.py's
    #: _abort_before_go, recovery.py at 81cf964)
    drop_in_memory: bool = False
    #: (f) telling the target to drop its copy ends once ABORT is sent, without
    #: a confirming OUTCOME (drop_prepared_copy at 81cf964)
    drop_unconfirmed: bool = False
    #: (g) the source stops asking after a deadline (at 81cf964: recovery_s, 30 s
    #: on the live path; ROLLBACK_RETRY_S, 1 h, for a drop); no clocks here, so
    #: giving up may happen at any time
    retries_give_up: bool = False
    #: (h) a rollback renames back and resumes the source's copy, then journals
    #: ABORTED (source.py's _abort_before_go and recovery.py before f92650c)
    resume_before_journal: bool = False
    #: (i) a source restarted at STOPPED or PREPARED whose copy is gone takes
    #: the domain for lost and tells the target to drop its copy
    drop_when_copy_gone: bool = False
    #: (j) the target journals nothing between RESUMING and RESUMED (no
    #: STARTING before the resume call), and a target restarted at RESUMING
    #: whose copy is gone journals ABORTED, so QUERY answers ABORTED: the
    #: source resumes its own copy, though the target's may have run
    #: (target.py's finish_resume and recovery.py's _recover_target until 7f4e5cd)
    no_starting_intent: bool = False
    #: (k) a rename to --migratedaway or a GO_SENT journal write that fails at
    #: the start of the handoff ends the migration there: the copy stays
    #: paused, the entry open at PREPARED, the target's copy waits for GO
    #: (source.py's _handoff until 7f4e5cd)
    handoff_failure_stalls: bool = False
    #: (l) a target restarted at RESUMING whose copy is gone leaves the entry
    #: open for the operator too, as at STARTING (needlessly: the copy never ran)
    resuming_gone_in_doubt: bool = False
    #: (m) a failed resume destroys the target's copy, then journals ABORTED
    #: and answers, two steps a crash may come between (target.py's
    #: finish_resume at 7f4e5cd); the intended model takes the two as one
    destroy_before_aborted: bool = False
    #: the cluster store arbitrates (issue 15, docs/cluster.md): the source
    #: offers before GO, the target claims before the resume, a source that
    #: lost its link after GO settles by the record (fence or release)
    store: bool = False
    #: (n) with a store: the source resumes its copy after GO when the record
    #: is still offered, without fencing it first
    store_resume_unfenced: bool = False
    #: (o) with a store: the target resumes on GO without claiming
    store_no_claim: bool = False
    #: (p) with a store: a target whose resume failed gives the domain back
    #: even after the source released it
    store_giveback_released: bool = False


VARIANTS: dict[str, Protocol] = {
    "intended": Protocol(),
    "a": Protocol(no_resuming_intent=True),
    "b": Protocol(silence_is_aborted=True),
    "c": Protocol(resume_on_timeout_after_go=True),
    "d": Protocol(give_up_without_copy=True),
    "e": Protocol(drop_in_memory=True),
    "f": Protocol(drop_unconfirmed=True),
    "g": Protocol(retries_give_up=True),
    "h": Protocol(resume_before_journal=True),
    "i": Protocol(drop_when_copy_gone=True),
    "j": Protocol(no_starting_intent=True),
    "k": Protocol(handoff_failure_stalls=True),
    "l": Protocol(resuming_gone_in_doubt=True),
    "m": Protocol(destroy_before_aborted=True),
    "store": Protocol(store=True),
    "n": Protocol(store=True, store_resume_unfenced=True),
    "o": Protocol(store=True, store_no_claim=True),
    "p": Protocol(store=True, store_giveback_released=True),
}


@dataclasses.dataclass(frozen=True)
class Bounds:
    """How much adversity one trace may see, and how deep the search goes."""

    max_crashes: int = 2  # daemon crashes (either side), power losses included
    max_losses: int = 2  # lost messages; a link cut counts as one
    max_resume_failures: int = 1  # the target's hypervisor fails to resume its copy after GO
    #: the source's rename to --migratedaway, or its GO_SENT journal write, fails
    max_local_failures: int = 1
    #: a crash may also be a host power loss that destroys that host's copy (at most one)
    power_loss: bool = False
    max_depth: int = 40  # steps from the initial state; the bounds above are exhausted by step 32
    #: with a store: its operations that fail, unreachable (nothing applied) or slow (applied, the answer lost)
    max_store_faults: int = 1


# -- helpers ----------------------------------------------------------------------


def _send(s: State, *msgs: str) -> frozenset[str]:
    """Add messages to the link; one to a daemon that is down is lost with its connection."""
    net = set(s.net)
    for m in msgs:
        to = s.src if m.endswith(">s") else s.tgt
        if to.up:
            net.add(m)
    return frozenset(net)


def _without(s: State, msg: str) -> frozenset[str]:
    return s.net - {msg}


def _fresh(s: State, side: str) -> bool:
    """Does ``side`` hold a complete copy with the latest state (one that may rightly run)?"""
    if side == "src":
        return s.src.dom in COMPLETE and not s.tgt_ran
    return s.tgt.dom in COMPLETE and not s.src_ran


Step = tuple[str, State]


# -- the source daemon ----------------------------------------------------------------
#
# A rollback is a mode "rollback:THEN", worked through one step at a time (so
# that a crash may cut it short anywhere): journal ABORTED (the entry stays
# open), rename the copy back, resume it; then THEN: "close" the entry (the
# target holds no copy: before COMMIT, or after GO when it said so), or
# "drop": ask the target until it confirms it holds no copy, and close then.
# A step that has nothing to do (no copy, not renamed, already running) is
# skipped.  Variant (h) journals ABORTED last.


def _start_rollback(s: State, then: str, why: str) -> Step:
    return f"source: {why}: roll back ({then})", s._replace(src=s.src._replace(mode="rollback:" + then))


def _rollback_step(s: State, p: Protocol) -> Step:
    src = s.src
    then = src.mode.split(":")[1]
    journaled = src.phase == ABORTED or src.closed
    order = ("rename", "resume", "journal") if p.resume_before_journal else ("journal", "rename", "resume")
    for what in order:
        if what == "journal" and not journaled:
            tag = " [variant h]" if p.resume_before_journal else ""
            return f"source: journal ABORTED (entry open){tag}", s._replace(src=src._replace(phase=ABORTED))
        if what == "rename" and src.dom != ABSENT and src.name == AWAY:
            return "source: rename own copy back", s._replace(src=src._replace(name=NORMAL))
        if what == "resume" and src.dom == PAUSED:
            return "source: resume own copy", s._replace(src=src._replace(dom=RUNNING), src_ran=True)
    if then == "close":
        return "source: rolled back, close the entry", s._replace(src=src._replace(mode="done", closed=True))
    if p.drop_in_memory:
        s2 = s._replace(src=src._replace(mode="dropping", closed=True))
        return ("source: rolled back, close the entry, send QUERY (the drop lives in memory) [variant e]",
                s2._replace(net=_send(s2, "QUERY>t")))
    s2 = s._replace(src=src._replace(mode="dropping"))
    return "source: rolled back, send QUERY (until the target holds no copy)", s2._replace(net=_send(s2, "QUERY>t"))


def _source_settles(s: State, p: Protocol) -> Iterator[Step]:
    """The link dropped after GO: the record decides (ownership.decide_settle), one swap."""
    src = s.src
    if s.rec == REC_OFFERED:
        if p.store_resume_unfenced:
            yield _start_rollback(s, "close", "store: still offered, resume without a fence [variant n]")
        else:
            yield _start_rollback(s._replace(rec=REC_FENCED), "close", "store: offered: fence it")
    elif s.rec == REC_FENCED:
        yield _start_rollback(s, "close", "store: fenced for this migration")
    elif s.rec in (REC_TAKEN, REC_RELEASED):
        yield "source: store: taken by the target: release, destroy own copy", s._replace(
            src=src._replace(dom=ABSENT, name=NORMAL, mode="finishing"), rec=REC_RELEASED)


def _store_slow(s: State, b: Bounds) -> Iterator[Step]:
    """Store faults.  Slow: a write applied whose answer is lost, so the writer
    asks again later.  Unreachable: nothing applied; at the offer that fails
    the migration before GO, elsewhere the writer just asks again (the same
    state: not a step of its own).
    """
    if not s.rec or s.store_faults >= b.max_store_faults:
        return
    src, t = s.src, s.tgt
    if src.up and src.mode == "prepared":
        # the offer: unreachable (not applied) or slow (applied): either way no GO, roll back
        yield "FAULT: store unreachable at the offer: roll back (drop)", s._replace(
            src=src._replace(mode="rollback:drop"), store_faults=s.store_faults + 1)
        yield "FAULT: store slow at the offer (applied, answer lost): roll back (drop)", s._replace(
            src=src._replace(mode="rollback:drop"), rec=REC_OFFERED, store_faults=s.store_faults + 1)
    if src.up and src.mode == "settling":
        after = {REC_OFFERED: REC_FENCED, REC_TAKEN: REC_RELEASED}
        if s.rec in after:
            yield "FAULT: store slow at the source's swap (applied, answer lost)", s._replace(
                rec=after[s.rec], store_faults=s.store_faults + 1)
    if t.up and t.mode.endswith(":claim") and s.rec == REC_OFFERED:
        yield "FAULT: store slow at the claim (applied, answer lost)", s._replace(
            rec=REC_TAKEN, store_faults=s.store_faults + 1)
    if t.up and t.mode.endswith(":giveback") and s.rec == REC_TAKEN:
        yield "FAULT: store slow at the give-back (applied, answer lost)", s._replace(
            rec=REC_FENCED, store_faults=s.store_faults + 1)


def _close_lost(s: State, why: str) -> Step:
    """No copy here and none (that may run) there: the domain went with a host; close the entry."""
    return f"source: {why}, own copy gone: domain lost, close the entry", s._replace(
        src=s.src._replace(mode="done", closed=True))


def _source_steps(s: State, p: Protocol) -> Iterator[Step]:
    src = s.src
    if not src.up:
        yield _source_recovery(s, p)
        return
    m = src.mode
    # internal steps
    if m == "streaming":
        yield "source: precopy done, journal STOPPED", s._replace(src=src._replace(phase=STOPPED, mode="stopping"))
    elif m == "stopping":
        s2 = s._replace(src=src._replace(dom=PAUSED, mode="wait_prepared"))
        yield "source: pause own copy, send last pages..COMMIT", s2._replace(net=_send(s2, "COMMIT>t"))
    elif m == "prepared" and p.store:
        yield "source: offer the domain to this migration in the store", s._replace(
            src=src._replace(mode="offered"), rec=REC_OFFERED)
    elif m in ("prepared", "offered"):
        yield "source: rename own copy --migratedaway", s._replace(src=src._replace(name=AWAY, mode="renamed"))
    elif m == "renamed":
        yield "source: journal GO_SENT", s._replace(src=src._replace(phase=GO_SENT, mode="go_journaled"))
    elif m == "go_journaled":
        s2 = s._replace(src=src._replace(mode="wait_resumed"))
        yield "source: send GO", s2._replace(net=_send(s2, "GO>t"))
    elif m == "finishing":
        s2 = s._replace(src=src._replace(phase=DONE, mode="done", closed=True))
        yield "source: send DONE, journal DONE", s2._replace(net=_send(s2, "DONE>t"))
    elif m.startswith("rollback:"):
        yield _rollback_step(s, p)
    elif m == "settling":
        yield from _source_settles(s, p)
    # timeouts
    if m == "wait_prepared":
        yield _start_rollback(s, "drop", "no PREPARED (timeout)")
    elif m == "wait_resumed":
        if p.store and src.dom != ABSENT:  # no copy of ours: nothing to fence for; ask the target (below)
            yield "source: no RESUMED (timeout): keep copy paused, settle by the store", s._replace(
                src=src._replace(mode="settling"))
        elif p.resume_on_timeout_after_go:
            yield _start_rollback(s, "close", "no RESUMED (timeout) [variant c]")
        else:
            s2 = s._replace(src=src._replace(mode="querying"))
            yield "source: no RESUMED (timeout): keep copy paused, send QUERY", s2._replace(net=_send(s2, "QUERY>t"))
    elif m == "querying":
        if p.silence_is_aborted:
            yield _start_rollback(s, "close", "QUERY unanswered, taken for ABORTED [variant b]")
        else:
            yield "source: QUERY unanswered (timeout): send QUERY again", s._replace(net=_send(s, "QUERY>t"))
    elif m == "dropping":
        yield "source: no OUTCOME (timeout): send QUERY again", s._replace(net=_send(s, "QUERY>t"))
    if p.retries_give_up and m in ("querying", "dropping"):
        new_src = src._replace(mode="gave_up", closed=src.closed or m == "dropping")
        yield f"source: retry deadline passed, stop asking ({m}) [variant g]", s._replace(src=new_src)
    # messages
    for msg in s.net:
        if msg.endswith(">s"):
            yield _source_receives(s, p, msg[:-2])


def _source_receives(s: State, p: Protocol, msg: str) -> Step:
    src = s.src
    m = src.mode
    s1 = s._replace(net=_without(s, msg + ">s"))
    if msg == "PREPARED" and m == "wait_prepared":
        s2 = s1._replace(src=src._replace(mode="prepared"))
        return "source: PREPARED received (nothing journaled: STOPPED reads the same)", s2
    if msg == "ABORT" and m in ("streaming", "stopping"):
        # not committed: the target cannot hold a complete copy, close at once (_abort_before_go)
        return _start_rollback(s1, "close", "target sent ABORT before COMMIT")
    if msg == "ABORT" and m == "wait_prepared":
        return _start_rollback(s1, "drop", "target sent ABORT after COMMIT")
    if msg == "RESUMED(ok)" and m in ("wait_resumed", "querying", "settling"):
        return "source: RESUMED(ok): destroy own copy", s1._replace(
            src=src._replace(dom=ABSENT, name=NORMAL, mode="finishing"))
    if msg == "RESUMED(failed)" and m in ("wait_resumed", "querying", "settling"):
        if src.dom == ABSENT:
            return _close_lost(s1, "RESUMED(failed)")
        return _start_rollback(s1, "close", "RESUMED(failed): target dropped its copy")
    if msg.startswith("OUTCOME(") and m in ("querying", "dropping"):
        state = msg[len("OUTCOME(") : -1]
        if m == "querying":
            if state == "PREPARED":
                s2 = s1._replace(src=src._replace(mode="wait_resumed"))
                if p.store:  # its copy is the only one left (ours is gone): offer it, then GO
                    s2 = s2._replace(rec=REC_OFFERED if s.rec in (REC_SRC, REC_OFFERED) else s.rec)
                return "source: OUTCOME(PREPARED): send GO", s2._replace(net=_send(s2, "GO>t"))
            if state == "RESUMED":
                s2 = s1._replace(src=src._replace(dom=ABSENT, name=NORMAL, mode="finishing"))
                return "source: OUTCOME(RESUMED): destroy own copy", s2
            if state in ("ABORTED", "UNKNOWN"):
                if src.dom == ABSENT:
                    return _close_lost(s1, f"OUTCOME({state})")
                return _start_rollback(s1, "close", f"OUTCOME({state}): target holds no copy")
            return f"source: OUTCOME({state}): not settled, ask again later", s1
        # dropping
        if state == "PREPARED":
            if p.drop_unconfirmed:
                s2 = s1._replace(src=src._replace(mode="done", closed=True))
                return "source: OUTCOME(PREPARED): send ABORT, done [variant f]", s2._replace(net=_send(s2, "ABORT>t"))
            return "source: OUTCOME(PREPARED): send ABORT", s1._replace(net=_send(s1, "ABORT>t"))
        if state in ("ABORTED", "UNKNOWN"):
            return f"source: OUTCOME({state}): target holds no copy, close the entry", s1._replace(
                src=src._replace(mode="done", closed=True))
        return f"source: OUTCOME({state}): not settled, ask again later", s1
    return f"source: ignores {msg}", s1


def _source_recovery(s: State, p: Protocol) -> Step:
    """A restarted source: its journal and its copy, nothing else (recovery.py's _recover_source)."""
    src = s.src._replace(up=True)
    s = s._replace(src=src)
    ph = src.phase
    gone = src.dom == ABSENT
    if src.closed:
        return f"source: restart at {ph} (closed): nothing to do", s._replace(src=src._replace(mode="done"))
    if ph == DONE:
        return "source: restart at DONE: close the entry", s._replace(src=src._replace(mode="done", closed=True))
    if ph == GO_SENT:
        if p.silence_is_aborted:
            return _start_rollback(s, "close", "restart at GO_SENT, no migration in memory, taken for ABORTED [variant b]")
        if p.give_up_without_copy and gone:
            return "source: restart at GO_SENT, own copy gone: close it, ask nobody [variant d]", s._replace(
                src=src._replace(phase=DONE, mode="done", closed=True))
        if p.store and not gone:
            return "source: restart at GO_SENT, keep copy paused, settle by the store", s._replace(
                src=src._replace(mode="settling"))
        s2 = s._replace(src=src._replace(mode="querying"))
        what = "own copy gone: ask the target" if gone else "keep copy paused"
        return f"source: restart at GO_SENT, {what}, send QUERY", s2._replace(net=_send(s2, "QUERY>t"))
    if gone and ph in (STOPPED, PREPARED):
        if p.drop_when_copy_gone:
            return _start_rollback(s, "drop", f"restart at {ph}, own copy gone: taken for lost [variant i]")
        # Never ran after its pause (a rollback journals ABORTED first): a
        # prepared copy on the target is the latest state; ask, and send it GO.
        s2 = s._replace(src=src._replace(mode="querying"))
        return f"source: restart at {ph}, own copy gone: ask the target, send QUERY", s2._replace(
            net=_send(s2, "QUERY>t"))
    # STREAMING, STOPPED, PREPARED with a copy, STREAMING without, or ABORTED and open:
    # ours is the copy that may run; finish the rollback (idempotent), then tell the target.
    return _start_rollback(s, "drop", f"restart at {ph}" + (", own copy gone" if gone else ""))


# -- the target daemon ----------------------------------------------------------------

#: target modes in which the prepared copy waits for the source's word
_IN_DOUBT = ("prepared_journaled", "prepared")
#: acting on GO: "resume:*" on the migration's connection (answers RESUMED when
#: done); "recover:*" when a restarted daemon finishes it (no connection to
#: answer on: the source learns it from a QUERY).  The steps: rename, journal
#: STARTING, resume, journal RESUMED (finish_resume); "failed" is variant (m)'s
#: copy destroyed after a failed resume, ABORTED not yet journaled.
_STEPS = ("go", "renamed", "starting", "running", "failed", "claim", "giveback")
_RESUME_MODES = tuple("resume:" + step for step in _STEPS)
_RECOVER_MODES = tuple("recover:" + step for step in _STEPS)
#: the target's recovery left the entry open at STARTING, its copy gone: the operator settles it
OPERATOR = "operator"


def _journals_starting(p: Protocol) -> bool:
    """Does the target journal STARTING before the resume call (not in (a), nor in (j))?"""
    return not (p.no_starting_intent or p.no_resuming_intent)


def _about_to_resume(t: Host, p: Protocol) -> bool:
    """Is the target's next step the resume call (where the hypervisor may fail it)?"""
    return t.mode.endswith(":starting" if _journals_starting(p) else ":renamed")


def _outcome(s: State, p: Protocol) -> str:
    """The target's answer to QUERY: its journal plus what its hypervisor shows."""
    t = s.tgt
    if p.no_resuming_intent:
        # at 81cf964 (outcome_of): PREPARED only while the copy is in
        # memory's in_doubt table, which a resume leaves only after RESUMED.
        if t.phase == PREPARED:
            return "PREPARED" if t.mode in _IN_DOUBT + _RESUME_MODES else "ABORTED"
        return {RESUMED: "RESUMED", ABORTED: "ABORTED"}.get(t.phase, "RECEIVING")
    if t.phase == PREPARED:
        if t.dom in COMPLETE and t.name == INCOMING:
            return "PREPARED"
        return "RECEIVING" if t.dom != ABSENT else "ABORTED"
    if t.phase in (RESUMING, STARTING):
        return "RECEIVING"  # not settled yet (or, at STARTING with the copy gone, the operator's): ask again
    if t.phase == RESUMED:
        return "RESUMED"
    if t.phase == ABORTED:
        return "ABORTED" if t.dom == ABSENT else "RECEIVING"
    return "RECEIVING"


def _target_steps(s: State, p: Protocol) -> Iterator[Step]:
    t = s.tgt
    if not t.up:
        yield _target_recovery(s, p)
        return
    m = t.mode
    if m == "prepared_journaled":
        s2 = s._replace(tgt=t._replace(mode="prepared"))
        yield "target: send PREPARED", s2._replace(net=_send(s2, "PREPARED>s"))
    elif m in _RESUME_MODES + _RECOVER_MODES:
        how, step = m.split(":")
        if step in ("claim", "giveback"):
            yield _target_swaps(s, p, how, step)
        elif step == "go":
            yield "target: rename copy to its own name", s._replace(tgt=t._replace(name=NORMAL, mode=how + ":renamed"))
        elif step == "renamed" and _journals_starting(p):
            yield "target: journal STARTING (the resume call is next)", s._replace(
                tgt=t._replace(phase=STARTING, mode=how + ":starting"))
        elif step in ("renamed", "starting"):
            tag = " (nothing journaled first) [variant j]" if p.no_starting_intent else ""
            yield f"target: resume copy{tag}", s._replace(
                tgt=t._replace(dom=RUNNING, mode=how + ":running"), tgt_ran=True)
        elif step == "failed":
            s2 = s._replace(tgt=t._replace(phase=ABORTED, mode="done"))
            if how == "resume":
                yield "target: journal ABORTED, send RESUMED(failed) [variant m]", s2._replace(
                    net=_send(s2, "RESUMED(failed)>s"))
            else:
                yield "target: journal ABORTED [variant m]", s2
        else:
            after = "resumed" if how == "resume" else "done"
            yield "target: journal RESUMED", s._replace(tgt=t._replace(phase=RESUMED, mode=after))
    elif m == "resumed":
        s2 = s._replace(tgt=t._replace(mode="done"))
        yield "target: send RESUMED(ok)", s2._replace(net=_send(s2, "RESUMED(ok)>s"))
    if m in _IN_DOUBT and t.phase == PREPARED and s.rec == REC_FENCED:
        yield "target: sweep: the store says fenced: destroy copy, journal ABORTED", s._replace(
            tgt=t._replace(dom=ABSENT, name=NORMAL, phase=ABORTED, mode="done"))
    if m == "receiving":  # the reservation expires when the source goes quiet
        s2 = s._replace(tgt=t._replace(dom=ABSENT, name=NORMAL, phase=ABORTED, mode="done"))
        yield "target: source quiet (timeout): destroy partial copy, journal ABORTED, send ABORT", s2._replace(
            net=_send(s2, "ABORT>s"))
    for msg in s.net:
        if msg.endswith(">t"):
            yield _target_receives(s, p, msg[:-2])


def _target_swaps(s: State, p: Protocol, how: str, step: str) -> Step:
    """The target's store swaps (ownership.decide_claim, decide_give_back), one each."""
    t = s.tgt
    lost = s._replace(tgt=t._replace(dom=ABSENT, name=NORMAL, phase=ABORTED, mode="done"))
    if how == "resume":
        lost = lost._replace(net=_send(lost, "RESUMED(failed)>s"))
    if step == "claim":
        if s.rec == REC_OFFERED:
            return "target: claim in the store", s._replace(tgt=t._replace(mode=how + ":go"), rec=REC_TAKEN)
        if s.rec in (REC_TAKEN, REC_RELEASED):
            nxt = ("running" if t.dom == RUNNING else "go" if t.name == INCOMING
                   else "starting" if t.phase == STARTING else "renamed")
            return "target: store: claimed already (our answer lost)", s._replace(tgt=t._replace(mode=f"{how}:{nxt}"))
        return "target: store: not offered to us (fenced): lost, destroy copy, journal ABORTED", lost
    # giveback
    if s.rec == REC_RELEASED and not p.store_giveback_released:
        return "target: store: the source released its copy: ours is the only one, resume again", s._replace(
            tgt=t._replace(mode=how + ":starting"))
    tag = " [variant p]" if s.rec == REC_RELEASED else ""
    rec = REC_FENCED if s.rec in (REC_TAKEN, REC_RELEASED) else s.rec
    return f"target: give the domain back in the store, destroy copy, journal ABORTED{tag}", lost._replace(rec=rec)


def _target_receives(s: State, p: Protocol, msg: str) -> Step:
    t = s.tgt
    m = t.mode
    s1 = s._replace(net=_without(s, msg + ">t"))
    if msg == "COMMIT" and m == "receiving":
        return "target: COMMIT: copy complete, journal PREPARED", s1._replace(
            tgt=t._replace(dom=PAUSED, phase=PREPARED, mode="prepared_journaled"))
    if msg == "GO" and m in _IN_DOUBT and t.phase == PREPARED:
        if p.no_resuming_intent:
            return "target: GO (nothing journaled) [variant a]", s1._replace(tgt=t._replace(mode="resume:go"))
        first = "claim" if p.store and not p.store_no_claim else "go"
        tag = " [variant o]" if p.store_no_claim else ""
        return f"target: GO: journal RESUMING{tag}", s1._replace(tgt=t._replace(phase=RESUMING, mode="resume:" + first))
    if msg == "GO" and t.phase == RESUMED and m == "done":
        return "target: GO again: already RESUMED, send RESUMED(ok)", s1._replace(net=_send(s1, "RESUMED(ok)>s"))
    if msg == "ABORT" and (m == "receiving" or (m in _IN_DOUBT and t.phase == PREPARED)):
        return "target: ABORT: destroy copy, journal ABORTED", s1._replace(
            tgt=t._replace(dom=ABSENT, name=NORMAL, phase=ABORTED, mode="done"))
    if msg == "QUERY":
        answer = _outcome(s, p)
        return f"target: QUERY: answer OUTCOME({answer})", s1._replace(net=_send(s1, f"OUTCOME({answer})>s"))
    return f"target: ignores {msg}", s1


def _target_recovery(s: State, p: Protocol) -> Step:
    """A restarted target: its journal and its copy, nothing else."""
    t = s.tgt._replace(up=True)
    ph = t.phase
    gone = t._replace(dom=ABSENT, name=NORMAL, phase=ABORTED, mode="done")
    if p.no_resuming_intent:  # at 81cf964 (_recover_target)
        if ph == PREPARED and t.dom != ABSENT and t.name == INCOMING:
            kept = s._replace(tgt=t._replace(mode="prepared"))
            return "target: restart at PREPARED: keep the --incoming copy paused", kept
        if ph == RESUMED:
            return "target: restart at RESUMED: nothing to do", s._replace(tgt=t._replace(mode="done"))
        if t.name == INCOMING:
            t = t._replace(dom=ABSENT, name=NORMAL)
        return f"target: restart at {ph}: taken for aborted, journal ABORTED [variant a]", s._replace(
            tgt=t._replace(phase=ABORTED, mode="done"))
    if ph == RECEIVING:
        return "target: restart at RECEIVING: destroy partial copy, journal ABORTED", s._replace(tgt=gone)
    if ph == PREPARED:
        if t.dom in COMPLETE and t.name == INCOMING:
            kept = s._replace(tgt=t._replace(mode="prepared"))
            return "target: restart at PREPARED: keep the --incoming copy paused", kept
        if t.dom == ABSENT:
            return "target: restart at PREPARED, copy gone: journal ABORTED", s._replace(tgt=gone)
        # a renamed copy at PREPARED: GO was being acted on (no RESUMING in the model's intended run)
    if ph in (PREPARED, RESUMING, STARTING):
        if t.dom == ABSENT:
            if p.store and ph == STARTING:
                # The claim came before STARTING: the domain was this host's, and went with it.
                return "target: restart at STARTING, copy gone: the domain went with this host, journal ABORTED", \
                    s._replace(tgt=gone)
            if ph == STARTING or (ph == RESUMING and p.resuming_gone_in_doubt):
                # The resume may have been called, and the copy run, before the
                # host went dark: the source's paused copy may be older than
                # what ran, and nothing here tells.  Neither side decides alone.
                tag = " [variant l]" if ph == RESUMING else " (it may have run)"
                return f"target: restart at {ph}, copy gone{tag}: keep the entry open for the operator", s._replace(
                    tgt=t._replace(mode=OPERATOR))
            if p.store and ph == RESUMING:
                rec = REC_FENCED if s.rec == REC_TAKEN else s.rec
                return "target: restart at RESUMING, copy gone (it never ran): give back, journal ABORTED", s._replace(
                    tgt=gone, rec=rec)
            # RESUMING: the resume call was not reached (STARTING comes first), the copy never ran
            tag = " (it may have run) [variant j]" if p.no_starting_intent else " (it never ran)"
            return f"target: restart at {ph}, copy gone{tag}: journal ABORTED", s._replace(tgt=gone)
        step = "go" if t.name == INCOMING else "running" if t.dom == RUNNING else "starting" if ph == STARTING else "renamed"
        phase = STARTING if ph == STARTING else RESUMING
        if p.store and not p.store_no_claim:
            step = "claim"  # idempotent: the record says whether it was done, or given back
        return f"target: restart at {ph}: finish the resume", s._replace(
            tgt=t._replace(phase=phase, mode="recover:" + step))
    return f"target: restart at {ph}: nothing to do", s._replace(tgt=t._replace(mode="done"))


# -- faults -----------------------------------------------------------------------------


def _fault_steps(s: State, p: Protocol, b: Bounds) -> Iterator[Step]:
    t = s.tgt
    if t.up and _about_to_resume(t, p) and s.resume_failures < b.max_resume_failures:
        # The copy cannot run (it did not: the resume call failed); destroying
        # it lets the source resume its own.  After a power loss that took the
        # source's copy, that was the last one.
        lost = s.lost or not _fresh(s, "src")
        how = t.mode.split(":")[0]
        if p.store:
            yield "FAULT: hypervisor fails to resume the target's copy: give it back first", s._replace(
                tgt=t._replace(mode=how + ":giveback"), resume_failures=s.resume_failures + 1, lost=lost)
        elif p.destroy_before_aborted:
            s2 = s._replace(tgt=t._replace(dom=ABSENT, name=NORMAL, mode=how + ":failed"),
                            resume_failures=s.resume_failures + 1, lost=lost)
            yield "FAULT: hypervisor fails to resume the target's copy: destroy it (ABORTED next) [variant m]", s2
        else:
            s2 = s._replace(tgt=t._replace(dom=ABSENT, name=NORMAL, phase=ABORTED, mode="done"),
                            resume_failures=s.resume_failures + 1, lost=lost)
            label = "FAULT: hypervisor fails to resume the target's copy: destroy it, journal ABORTED"
            if how == "resume":
                yield label + ", send RESUMED(failed)", s2._replace(net=_send(s2, "RESUMED(failed)>s"))
            else:
                yield label, s2
    src = s.src
    yield from _store_slow(s, b)
    if src.up and src.mode in ("prepared", "renamed") and s.local_failures < b.max_local_failures:
        # GO has not gone out: the source's copy is still the one that runs.
        what = "cannot rename its copy --migratedaway" if src.mode == "prepared" else "cannot journal GO_SENT"
        s2 = s._replace(local_failures=s.local_failures + 1)
        if p.handoff_failure_stalls:
            yield f"FAULT: source {what}: the migration ends there [variant k]", s2._replace(
                src=src._replace(mode="stalled"))
        else:
            yield f"FAULT: source {what}: roll back (drop)", s2._replace(src=src._replace(mode="rollback:drop"))
    if s.losses < b.max_losses:
        for msg in sorted(s.net):
            yield f"FAULT: {msg} lost", s._replace(net=_without(s, msg), losses=s.losses + 1)
        if len(s.net) > 1:
            yield "FAULT: link cut, everything in flight lost", s._replace(net=frozenset(), losses=s.losses + 1)
    if s.crashes < b.max_crashes:
        for side in ("src", "tgt"):
            host: Host = getattr(s, side)
            if not host.up:
                continue
            who = "source" if side == "src" else "target"
            to_me = ">s" if side == "src" else ">t"
            net = frozenset(m for m in s.net if not m.endswith(to_me))
            down = host._replace(up=False, mode=DOWN)
            crashed = s._replace(net=net, crashes=s.crashes + 1)
            yield f"FAULT: {who} daemon crashes", crashed._replace(**{side: down})  # type: ignore[arg-type]
            if b.power_loss and s.power_losses < 1 and host.dom != ABSENT:
                dark = crashed._replace(power_losses=s.power_losses + 1)
                if side == "tgt" and host.phase == STARTING and not s.rec:
                    dark = dark._replace(in_doubt=True)  # may have run: left for the operator
                else:
                    dark = dark._replace(lost=s.lost or _loses_domain(s, side))
                yield f"FAULT: {who} host loses power (its copy too)", dark._replace(
                    **{side: down._replace(dom=ABSENT, name=NORMAL)})  # type: ignore[arg-type]


def _loses_domain(s: State, side: str) -> bool:
    """Does destroying ``side``'s copy lose the domain itself (what the guarantee allows)?

    Yes if the other host holds no complete copy with the latest state
    (before COMMIT is processed, the source's copy is the only one; once a
    copy has run, the other is stale); or if the source had journaled that
    its copy is the one that runs (an open ABORTED: its copy may have run
    since, so the target's must be dropped).  Otherwise the copy left is the
    domain, and must survive: in particular the target's at RESUMING (the
    resume call comes after STARTING: it never ran).  The target's copy at
    STARTING is not asked about here: that loss leaves the migration in
    doubt (State.in_doubt), not lost.
    """
    host: Host = getattr(s, side)
    other = "tgt" if side == "src" else "src"
    if side == "tgt" and s.rec in (REC_TAKEN, REC_RELEASED):
        return True  # with a store the domain moved at the claim: the source lets its copy go
    if side == "src" and s.tgt.mode.endswith(":giveback"):
        return True  # the target's copy failed to resume: the source's was the one that could run
    if side == "src" and s.rec == REC_FENCED:
        return True  # the fence is the store's word that the source's copy is the domain (as an open ABORTED)
    if not _fresh(s, other):
        return True
    return side == "src" and host.phase == ABORTED


# -- properties ---------------------------------------------------------------------------


def safety_violation(s: State) -> str | None:
    """Checked in every state."""
    if s.src.dom == RUNNING and s.tgt.dom == RUNNING:
        return "two copies running"
    if s.tgt.dom == RUNNING and s.src_ran:
        return "a stale copy runs: the target's snapshot is older than the source's copy, which ran after it"
    if s.src.dom == RUNNING and s.tgt_ran:
        return "a stale copy runs: the source's paused copy is older than the target's, which ran"
    if not (s.lost or s.in_doubt) and not (_fresh(s, "src") or _fresh(s, "tgt")):
        return "no copy left that holds the latest state (domain lost)"
    return None


def left_for_operator(s: State) -> bool:
    """The one end besides settling that the checks allow: in doubt, for the operator.

    Only after a power loss took the target's copy while its journal said
    STARTING (``State.in_doubt``: it may have run, nobody can tell): the
    target up, its entry open at STARTING with no copy (QUERY answers
    RECEIVING), and the source up, its entry open at GO_SENT, its copy
    paused as --migratedaway, asking.  No copy runs; ``relocd settle`` on
    either host ends it (not modelled).
    """
    src, t = s.src, s.tgt
    return (s.in_doubt
            and t.up and t.mode == OPERATOR and t.phase == STARTING and t.dom == ABSENT
            and src.up and src.mode == "querying" and src.phase == GO_SENT and not src.closed
            and src.dom == PAUSED and src.name == AWAY)


def quiescent_violation(s: State) -> str | None:
    """Checked where no protocol step is left (both daemons up, link empty, recovery done)."""
    copies = [h for h in (s.src, s.tgt) if h.dom != ABSENT]
    leftovers = [h.dom + ("" if h.name == NORMAL else h.name) for h in copies if h.dom != RUNNING or h.name != NORMAL]
    if leftovers:
        return "settled with a copy left behind: " + ", ".join(leftovers)
    if not s.lost and len(copies) != 1:
        return f"settled with {len(copies)} running copies"
    if not s.src.closed or s.tgt.phase not in TARGET_FINAL:
        return f"settled with unfinished journals: source {s.src.phase} (open), target {s.tgt.phase}"
    return None


def protocol_steps(s: State, p: Protocol) -> list[Step]:
    return [*_source_steps(s, p), *_target_steps(s, p)]


# -- the search ---------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    protocol: Protocol
    bounds: Bounds
    states: int
    transitions: int
    depth: int  # deepest level reached
    exhausted: bool  # every state within the bounds was explored
    seconds: float
    violation: str | None = None
    trace: list[tuple[str, State]] = dataclasses.field(default_factory=list)
    #: settled states by how the move ended (see settled_as)
    settled: dict[str, int] = dataclasses.field(default_factory=dict)
    #: states left in doubt for the operator (left_for_operator)
    in_doubt: int = 0

    def summary(self) -> str:
        scope = "all states within the bounds" if self.exhausted else f"stopped at depth {self.depth}"
        verdict = f"VIOLATION: {self.violation} ({len(self.trace) - 1} steps)" if self.violation else "no violation"
        ends = ", ".join(f"{n} {k}" for k, n in sorted(self.settled.items())) or "none"
        return (f"{self.states} states, {self.transitions} transitions, depth {self.depth} "
                f"({scope}), settled: {ends}, left for the operator: {self.in_doubt}; "
                f"{self.seconds:.1f} s: {verdict}")

    def format_trace(self) -> str:
        lines = [f"counterexample: {self.violation}"]
        for i, (label, state) in enumerate(self.trace):
            lines.append(f"{i:3}. {label}")
            lines.append(f"       {state.show()}")
        return "\n".join(lines)


def settled_as(s: State) -> str:
    """How a settled state ended the move, for the summary."""
    if s.tgt.dom == RUNNING:
        return "moved"
    if s.src.dom == RUNNING:
        return "rolled back"
    return "lost with a host"


def initial(protocol: Protocol) -> State:
    return INITIAL._replace(rec=REC_SRC) if protocol.store else INITIAL


def check(protocol: Protocol = Protocol(), bounds: Bounds = Bounds(), *, settle: bool = True) -> Result:
    """Breadth-first over every state within ``bounds``; the first violation (a shortest trace) ends it.

    Safety (safety_violation) is checked in every state.  With ``settle``,
    also every state with no protocol step left (quiescent_violation), and,
    once the search has exhausted the bounds, that from every reachable state
    the daemons can still, without a further fault, settle or reach a state
    left for the operator (left_for_operator, which allows that only after
    the target lost its copy at STARTING); else it is a livelock.
    """
    paused_gc = gc.isenabled()
    gc.disable()  # the search builds no cycles; the collector would only rescan its states (10 to 15% of the time)
    try:
        return _check(protocol, bounds, settle)
    finally:
        if paused_gc:
            gc.enable()


def _check(protocol: Protocol, bounds: Bounds, settle: bool) -> Result:
    t0 = time.monotonic()
    start = initial(protocol)
    ids: dict[State, int] = {start: 0}
    states: list[State] = [start]
    parent: list[tuple[int, str]] = [(-1, "initial: precopy under way, target holds a partial --incoming copy")]
    # protocol successors, by id (for the liveness pass)
    edges: list[list[int]] = []
    depth_of = [0]
    queue: deque[int] = deque([0])
    transitions = 0
    settled: dict[str, int] = {}
    operator: set[int] = set()  # states left for the operator
    deepest = 0
    exhausted = True

    def finish(violation: str | None, at: int | None) -> Result:
        trace: list[tuple[str, State]] = []
        i = at if at is not None else -1
        while i >= 0:
            pi, label = parent[i]
            trace.append((label, states[i]))
            i = pi
        trace.reverse()
        return Result(protocol, bounds, len(states), transitions, deepest, exhausted,
                      time.monotonic() - t0, violation, trace, settled, len(operator))

    bad = safety_violation(start)
    if bad:
        return finish(bad, 0)
    while queue:
        i = queue.popleft()
        s = states[i]
        d = depth_of[i]
        deepest = max(deepest, d)
        while len(edges) <= i:
            edges.append([])
        if d >= bounds.max_depth:
            exhausted = False
            continue
        steps = protocol_steps(s, protocol)
        if not steps:
            bad = quiescent_violation(s) if settle else None
            if bad:
                return finish(bad, i)
            end = settled_as(s)
            settled[end] = settled.get(end, 0) + 1
        elif left_for_operator(s):
            operator.add(i)
        succ: list[int] = []
        faults = _fault_steps(s, protocol, bounds)
        for is_fault, (label, s2) in [(False, st) for st in steps] + [(True, st) for st in faults]:
            transitions += 1
            j = ids.get(s2)
            if j is None:
                j = len(states)
                ids[s2] = j
                states.append(s2)
                parent.append((i, label))
                depth_of.append(d + 1)
                bad = safety_violation(s2)
                if bad:
                    deepest = max(deepest, d + 1)
                    return finish(bad, j)
                queue.append(j)
            if not is_fault:
                succ.append(j)
        edges[i] = succ
    if settle and exhausted:
        stuck = _cannot_settle(edges, operator)
        if stuck is not None:
            return finish("cannot settle any more without a further fault (livelock)", stuck)
    return finish(None, None)


def _cannot_settle(edges: list[list[int]], operator: set[int]) -> int | None:
    """The first state (lowest id: nearest the start) from which no protocol-only path ends.

    An end is a settled state (its quiescence was checked) or one left for
    the operator (``operator``: left_for_operator held there).
    """
    preds: list[list[int]] = [[] for _ in edges]
    for i, succ in enumerate(edges):
        for j in succ:
            preds[j].append(i)
    good = [not succ or i in operator for i, succ in enumerate(edges)]
    queue = deque(i for i, g in enumerate(good) if g)
    while queue:
        j = queue.popleft()
        for i in preds[j]:
            if not good[i]:
                good[i] = True
                queue.append(i)
    for i, g in enumerate(good):
        if not g:
            return i
    return None


def main(argv: list[str]) -> int:
    names = argv or list(VARIANTS)
    for name in names:
        for power in (False, True):
            r = check(VARIANTS[name], Bounds(power_loss=power))
            print(f"{name:8} power_loss={power!s:5}  {r.summary()}")
            if r.violation:
                print(r.format_trace())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
