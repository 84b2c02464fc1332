"""The soak (bench/soak.py) for three minutes: mixed load across a fleet of hosts (network
namespaces) while a neuron is SIGKILLed and restarted, links are cut (and delayed where the
kernel has netem) and cortex's keys are rotated with SIGHUP. Every request must come back
whole and equal to its answer on a quiet fleet (or, resumed on another neuron, part from it
with new text at a near tie), or be refused clearly; none broken, doubled or hung; cortex counts each once; cortex's and the spared neuron's RSS stay flat after
warm-up. The report is printed whatever the outcome (``pytest -s`` shows it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.soak import _misplaced, soak

SECONDS = 180.0


async def test_a_three_minute_soak_answers_every_request_whole_or_refused_with_flat_memory(
    namespaces: None, demo_dir: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("HELEXA_SOAK_SEED", "1"))
    report = await soak(tmp_path, SECONDS, clients=4, neurons=2, seed=seed)
    print(report.text())
    assert report.ok, report.text()
    # The run did what it is for: load all along, and faults while it ran.
    whole = [a for a in report.answers if a.verdict == "whole"]
    assert len(whole) >= 100, report.text()
    assert {(a.route, a.stream) for a in whole} == {
        (route, stream)
        for route in ("/v1/chat/completions", "/v1/completions")
        for stream in (True, False)
    }
    assert len(report.faults) >= 3, report.text()


QUIET = " Paris.\n\nThe answer is: 2018-01-01, the day the city was founded."


@pytest.mark.parametrize(
    ("text", "misplaced"),
    [
        # Parts with new text (a resumption's near tie): not misplaced.
        (" Paris.\n\n2. The United States has a population of approximately 3", False),
        # Starts again after its text so far: a doubled piece.
        (" Paris.\n\n Paris.\n\nThe answer is: 2018-01-01, the day", True),
        # Skips a piece: a lost one.
        (" Paris.\n\nThe answer the day the city was founded.", True),
        # Stops short: its end is lost.
        (" Paris.\n\nThe answer is", True),
        # Runs on past the end with the beginning again.
        (QUIET + " Paris.\n\nThe answer", True),
    ],
)
def test_an_answer_that_parts_from_the_quiet_one_is_told_new_text_from_a_misplaced_piece(
    text: str, misplaced: bool
) -> None:
    assert _misplaced(text, QUIET) is misplaced
