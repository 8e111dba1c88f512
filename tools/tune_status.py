"""flashcore-tune status: how far the studies in a storage are, from any host (the storage is all it reads).

A bucket is one study (tuner.study_name). Every run notes its plan's studies in the storage (tuner.register_plan),
so buckets no worker has started yet count too. A study is running while a live process holds a claim on it
(measuring a config, or its final A/B: tune_storage.py), done when its record covers its measurements, and left
otherwise (partly measured if its workers stopped midway: the next worker resumes it). The time left is the
evaluations left times the seconds per evaluation of the finished buckets (their wall time, final A/B included,
over their evaluations), over the workers measuring now.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from flashcore.ops import current_version

from .tune_common import UsageError, _detect_gpu, _storage_url, short_bucket, short_spec
from .tune_storage import OWNER, make_storage, owner_label, redact, running_claims, sqlite_path, this_process


@dataclass
class BucketProgress:
    gpu: str
    op: str
    label: str                       # spec and bucket, short
    current: bool                    # of its spec's current version (older ones are not listed)
    state: str                       # done | running | left
    evaluations: int                 # distinct configs measured
    target: int                      # configs the plan measures (the latest run's plan)
    owners: list[str] = field(default_factory=list)    # live processes holding claims on it
    wall_s: float = 0.0              # of its record (done)
    record_evaluations: int = 0


def bucket_progress(storage, study, me: str) -> BucketProgress:
    from .tuner import PLAN, RECORD, measured
    plan, record = study.user_attrs[PLAN], study.user_attrs.get(RECORD)
    study_id = storage.get_study_id_from_name(study.study_name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    live, _ = running_claims(storage, study_id, trials, me)
    configs = {tuple(sorted(t.params.items())) for t in trials if measured(t)}
    gpu = study.study_name.split("|", 1)[0]
    version = study.study_name.rsplit("|", 2)[1]
    done = record is not None and record["evaluations"] >= len(configs)
    return BucketProgress(
        gpu=gpu, op=plan["op"], label=f"{short_spec(plan['spec'])} {short_bucket(plan['bucket'])}",
        current=current_version(plan["op"], plan["spec"]) == version,
        state="running" if live else "done" if done else "left",
        evaluations=len(configs), target=int(plan["target"]), owners=sorted({t.user_attrs[OWNER] for t in live}),
        wall_s=float(record["wall_s"]) if record else 0.0,
        record_evaluations=int(record["evaluations"]) if record else 0)


def cmd_status(args) -> int:
    gpu = "interpreter" if args.interpret else None if args.gpu in (None, "auto") else args.gpu.lower()
    if args.storage is None and gpu is None:
        gpu = _detect_gpu(False)[0]
        if gpu == "none":
            raise UsageError("no CUDA GPU here to name the default storage: pass --gpu NAME, --interpret or --storage")
    url = _storage_url(args, gpu)
    path = sqlite_path(url)
    if path and not os.path.exists(os.path.expanduser(path)):
        print(f"no studies yet: {path} does not exist")
        return 0
    storage = make_storage(url, args.grace)
    if storage is None:
        raise UsageError("--storage memory keeps nothing to report on")
    from .tuner import PLAN
    me = this_process()
    buckets = [bucket_progress(storage, s, me) for s in storage.get_all_studies()
               if PLAN in s.user_attrs and (gpu is None or s.study_name.split("|", 1)[0] == gpu)]
    print(f"studies in {redact(url)}")
    print_status(buckets)
    return 0


def _seconds_per_eval(buckets: list[BucketProgress]) -> float | None:
    """Wall seconds per measured config over the finished buckets (None: none finished yet)."""
    done = [b for b in buckets if b.state == "done" and b.record_evaluations]
    return sum(b.wall_s for b in done) / sum(b.record_evaluations for b in done) if done else None


def print_status(buckets: list[BucketProgress]) -> None:
    old = [b for b in buckets if not b.current]
    buckets = [b for b in buckets if b.current]
    if not buckets:
        print("no buckets of current versions" + (f" ({len(old)} of older versions)" if old else ""))
        return
    groups: dict[tuple[str, str], list[BucketProgress]] = {}
    for b in buckets:
        groups.setdefault((b.gpu, b.op), []).append(b)
    per_eval_all = _seconds_per_eval(buckets)
    left_s, unknown = 0.0, 0
    for (gpu, op), group in sorted(groups.items()):
        states = Counter(b.state for b in group)
        partly = sum(1 for b in group if b.state == "left" and b.evaluations)
        print(f"{gpu} {op}: {len(group)} buckets: {states['done']} done, {states['running']} running, "
              f"{states['left']} left" + (f" ({partly} partly measured)" if partly else ""))
        for b in group:
            if b.state == "running":
                print(f"  running {b.label}: {b.evaluations}/{b.target} configs measured; "
                      + ", ".join(owner_label(o) for o in b.owners))
        per_eval = _seconds_per_eval(group) or per_eval_all
        evals = sum(max(b.target - b.evaluations, 0) for b in group if b.state != "done")
        if per_eval is None:
            unknown += evals
        else:
            left_s += evals * per_eval
    if old:
        print(f"({len(old)} buckets of older versions not listed)")
    owners = {o for b in buckets for o in b.owners}
    hosts = Counter(owner_label(o).rsplit(":", 1)[0] for o in owners)
    per_host = " (" + ", ".join(f"{h}: {n}" for h, n in sorted(hosts.items())) + ")" if owners else ""
    print(f"measuring now: {len(owners)} worker{'' if len(owners) == 1 else 's'}{per_host}")
    if unknown:
        print(f"time left: unknown until a bucket finishes ({unknown} evaluations left)")
    elif all(b.state == "done" for b in buckets):
        print("time left: none, every bucket is done")
    else:
        workers = max(len(owners), 1)
        print(f"time left: ~{left_s / workers / 60:.1f} min ({left_s / 60:.1f} min of measuring, from the finished "
              f"buckets' seconds per evaluation, over {workers} worker{'s' if workers > 1 else ''})")
