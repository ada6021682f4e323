"""Run a pipeline (rlhf.pipeline) stage by stage: train stages through the coordinator's
`train`, merge stages in this process. A stage whose STAGE_DONE.json digest matches is
skipped; an interrupted one resumes from its last checkpoint."""

from __future__ import annotations

import json
import time

import ray

from actors.coordinator import train
from rlhf.config import RunConfig
from rlhf.models import merge_lora
from rlhf.pipeline import DONE_MARKER, Pipeline, Stage
from rlhf.rundir import complete_checkpoints, resume_conflicts


def stage_config(stage: Stage, upstream_rerun: bool) -> RunConfig:
    """The stage's config as it runs now: resumed from its last checkpoint when it was
    interrupted with the same config, started over (checkpoint.overwrite) when it finished
    earlier, an input stage ran again, or its config changed since it was interrupted."""
    cfg = stage.config
    assert cfg is not None
    # The newest sealed one's config (resume itself verifies its files, once).
    found = complete_checkpoints(stage.out / "checkpoints")
    checkpoint = found[-1] if found else None
    why = ""
    if (stage.out / DONE_MARKER).exists():
        why = "its config or inputs changed since it finished"
    elif upstream_rerun:
        why = "a stage it reads ran again"
    elif checkpoint is not None and (changed := resume_conflicts(checkpoint, cfg)):
        why = f"its config changed since it was interrupted ({', '.join(changed)})"
    if not why:
        return cfg
    print(f"== stage {stage.name}: starting over, {why}", flush=True)
    # Gone before the run starts: an interruption from here on resumes the new run.
    (stage.out / DONE_MARKER).unlink(missing_ok=True)
    return cfg.model_copy(
        update={"checkpoint": cfg.checkpoint.model_copy(update={"overwrite": True})}
    )


def run_stage(stage: Stage, upstream_rerun: bool = False) -> dict:
    stage.out.mkdir(parents=True, exist_ok=True)
    if stage.config is not None:
        try:
            return train(stage_config(stage, upstream_rerun))
        finally:
            # Each stage starts its own groups; a local cluster is not kept between stages.
            if ray.is_initialized():
                ray.shutdown()
    started = time.perf_counter()
    m = stage.merge
    merge_lora(
        m.get("base"),
        m["adapter"],
        stage.out,
        kind=m.get("kind"),
        num_labels=int(m["num_labels"]) if m.get("num_labels") else None,
    )
    summary = {"final_model": str(stage.out), "wall_s": round(time.perf_counter() - started, 1)}
    (stage.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_pipeline(pipeline: Pipeline) -> dict[str, dict]:
    """Run every stage not done yet, in order; returns stage name -> summary."""
    print(pipeline.describe(), flush=True)
    summaries: dict[str, dict] = {}
    rerun: set[str] = set()
    for stage in pipeline.stages:
        if stage.done() and not rerun.intersection(stage.reads):
            print(f"== stage {stage.name}: done earlier ({stage.final}), skipped", flush=True)
            summaries[stage.name] = json.loads((stage.out / "summary.json").read_text())
            continue
        print(f"== stage {stage.name} ({stage.kind}) -> {stage.out}", flush=True)
        summaries[stage.name] = run_stage(stage, bool(rerun.intersection(stage.reads)))
        stage.mark_done()
        rerun.add(stage.name)
    (pipeline.out / "pipeline_summary.json").write_text(json.dumps(summaries, indent=2))
    return summaries
