"""`capline repro`'s stage times, read from DVC's output as it arrives."""

from __future__ import annotations

from pipeline.stage_times import format_minutes, summary, watch

DVC_OUTPUT = """Running stage 'sample':
> python -m stages.sample
sample: 1,000 images
Generating lock file 'dvc.lock'
Updating lock file 'dvc.lock'
Stage 'prepare_text' didn't change, skipping
Running stage 'vocab':
> python -m stages.vocab
Updating lock file 'dvc.lock'
Running stage 'train@captioner':
> python -m stages.train captioner --best
ERROR: failed to reproduce 'train@captioner'""".splitlines()


def clock_of(times: list[float]):
    """A clock giving one reading per call, in order."""
    readings = iter(times)
    return lambda: next(readings)


def test_each_stage_is_timed_from_its_start_to_its_lock_and_skips_and_failures_are_marked():
    # one reading per line, then one for the unfinished stage at the end
    clock = clock_of([0.0, 0.5, 1.0, 3.0, 3.5, 4.0, 10.0, 10.5, 12.0, 20.0, 20.5, 30.0, 31.0])
    echoed = []
    times = watch(DVC_OUTPUT, clock=clock, echo=echoed.append)
    assert echoed == DVC_OUTPUT
    assert [(t.stage, t.seconds, t.ran, t.finished) for t in times] == [
        ("sample", 3.0, True, True), ("prepare_text", 0.0, False, True), ("vocab", 2.0, True, True),
        ("train@captioner", 11.0, True, False)]


def test_the_summary_is_one_line_per_stage_and_a_total():
    times = watch(DVC_OUTPUT, clock=clock_of([0.0, 0.5, 1.0, 3.0, 3.5, 4.0, 10.0, 10.5, 12.0, 20.0, 20.5, 30.0,
                                              31.0]))
    lines = summary(times, 1121.4).splitlines()
    assert lines[0].split() == ["stage", "wall", "time"]
    assert lines[1].split() == ["sample", "3.0s"] and lines[2].split() == ["prepare_text", "skipped"]
    assert lines[4].split() == ["train@captioner", "11.0s", "(did", "not", "finish)"]
    assert lines[-1].split() == ["total", "1121.4s", "(18", "min", "41", "s,", "3", "of", "4", "stages", "ran)"]
    assert format_minutes(59.6) == "1 min 0 s"


def test_a_stage_whose_lock_entry_did_not_change_is_timed_to_the_next_stage():
    """A fresh clone's data stages rerun to the same lock entries: DVC prints no lock update between them."""
    lines = ["Running stage 'sample':", "sample: done", "Running stage 'vocab':", "vocab: done",
             "Stage 'features' didn't change, skipping", "Running stage 'report':", "Updating lock file 'dvc.lock'"]
    times = watch(lines, clock=clock_of([0.0, 1.0, 4.0, 5.0, 9.0, 9.5, 12.0]))
    assert [(t.stage, t.seconds, t.ran, t.finished) for t in times] == [
        ("sample", 4.0, True, True), ("vocab", 5.0, True, True), ("features", 0.0, False, True),
        ("report", 2.5, True, True)]
