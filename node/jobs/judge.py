"""Who was wrong, when answers to one job differ: the strike rule.

Pure: answers in (who gave them, with what precision), a judgement out: the
verdict of the job as a whole, the answers that stand, and one reputation
``Outcome`` per peer. The node itself is never rated, and its own answer is
the ground truth: it is the one run this node has no reason to doubt.

- This node's answer among them: every peer is judged against it alone.
  Agreeing is ``AGREED``, a disagreement is a ``STRUCK``, noise ``UNSURE``.
- Only peers, three or more: a strict majority whose answers all agree pairwise
  stands. Its members agree; a peer outside it that disagrees with every member
  is struck; any other outsider is unsure.
- Two peers, or no majority: a disagreement cannot say who is wrong, so it
  strikes nobody (``DISPUTED`` for those who disagreed). Striking both would let
  one liar take down every honest peer it is compared with; a spot check that
  ends in a dispute asks a third node (``node.jobs.verify``), and a peer that lies
  is found out once a third opinion exists.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from protocols import Value

from .compare import Comparison, Side, Verdict, compare
from .reputation import Outcome


@dataclass(frozen=True, slots=True)
class Answer:
    node: str
    local: bool  # this node's own run
    side: Side
    outputs: Mapping[str, Value]


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict  # AGREE: all agree; DISAGREE: some pair disagrees; else UNSURE
    standing: tuple[str, ...]  # the nodes whose answers stand, in answer order (maybe none)
    outcomes: Mapping[str, Outcome] = field(default_factory=dict)  # per peer, never local
    cosine: float | None = None  # the lowest row cosine of any pair compared
    why: str = ""

    @property
    def against(self) -> tuple[str, ...]:
        """The peers this judgement counts against (struck or disputed)."""
        bad = (Outcome.STRUCK, Outcome.DISPUTED)
        return tuple(p for p, o in self.outcomes.items() if o in bad)


def judge(task: str | None, answers: Sequence[Answer]) -> Judgement:
    """The judgement of ``answers`` (two or more, each from another node)."""
    if len({a.node for a in answers}) != len(answers) or len(answers) < 2:
        raise ValueError("judge needs answers from two or more distinct nodes")
    n = len(answers)
    pair: dict[tuple[int, int], Comparison] = {}
    for i, j in itertools.combinations(range(n), 2):
        a, b = answers[i], answers[j]
        pair[i, j] = pair[j, i] = compare(task, a.outputs, b.outputs, a.side, b.side)
    cosines = [c.cosine for c in pair.values() if c.cosine is not None]
    low = min(cosines) if cosines else None
    local = [i for i, a in enumerate(answers) if a.local]
    if len(local) > 1:
        raise ValueError("one answer at most is this node's own")
    if local:
        return _against_local(answers, pair, local[0], low)
    if all(c.agrees for c in pair.values()):
        outcomes = {a.node: Outcome.AGREED for a in answers}
        return Judgement(Verdict.AGREE, tuple(a.node for a in answers), outcomes, low, "all agree")
    verdict = _overall(pair.values())
    group = _majority(n, pair)
    if group is None:
        outcomes = {
            a.node: Outcome.DISPUTED
            if any(pair[i, j].verdict is Verdict.DISAGREE for j in range(n) if j != i)
            else Outcome.UNSURE
            for i, a in enumerate(answers)
        }
        return Judgement(verdict, (), outcomes, low, "no majority: nobody can be blamed")
    outcomes = {}
    for i, a in enumerate(answers):
        if i in group:
            outcomes[a.node] = Outcome.AGREED
        elif all(pair[i, j].verdict is Verdict.DISAGREE for j in group):
            outcomes[a.node] = Outcome.STRUCK
        else:
            outcomes[a.node] = Outcome.UNSURE
    standing = tuple(answers[i].node for i in sorted(group))
    why = f"{len(group)} of {n} agree"
    return Judgement(verdict, standing, outcomes, low, why)


def _against_local(
    answers: Sequence[Answer],
    pair: Mapping[tuple[int, int], Comparison],
    me: int,
    low: float | None,
) -> Judgement:
    outcomes: dict[str, Outcome] = {}
    standing = [answers[me].node]
    mine = []
    for i, a in enumerate(answers):
        if i == me:
            continue
        c = pair[me, i]
        mine.append(c)
        if c.verdict is Verdict.AGREE:
            outcomes[a.node] = Outcome.AGREED
            standing.append(a.node)
        else:
            outcomes[a.node] = Outcome.STRUCK if c.verdict is Verdict.DISAGREE else Outcome.UNSURE
    ordered = tuple(a.node for a in answers if a.node in standing)
    why = "; ".join(c.why for c in mine if not c.agrees) or "all agree with this node"
    return Judgement(_overall(mine), ordered, outcomes, low, why)


def _overall(comparisons: Iterable[Comparison]) -> Verdict:
    found = {c.verdict for c in comparisons}
    if found == {Verdict.AGREE}:
        return Verdict.AGREE
    return Verdict.DISAGREE if Verdict.DISAGREE in found else Verdict.UNSURE


def _majority(n: int, pair: Mapping[tuple[int, int], Comparison]) -> set[int] | None:
    """The largest group of mutually agreeing answers that is a strict majority."""
    for size in range(n, n // 2, -1):
        for group in itertools.combinations(range(n), size):
            if all(pair[i, j].agrees for i, j in itertools.combinations(group, 2)):
                return set(group)
    return None
