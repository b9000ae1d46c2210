"""``handclip train``: one run, a resumed run, or a chain of sequential stages, each a
``Trainer`` over a freshly built ``TrainingState`` writing into its ``RunFolder``."""
from __future__ import annotations

from pathlib import Path

from handclip.config import Config, apply_overrides, config_from_dict, load_config, stage_config
from handclip.engine import distributed
from handclip.engine.encoder import resolve_device
from handclip.engine.run import RunFolder
from handclip.engine.trainer import Trainer
from handclip.errors import UserError
from handclip.fileio import atomic_write_json

RESUMABLE_KEYS = {"train.epochs", "train.device"}  # what --resume may change


def run_training(config_path=None, overrides=None, data_root=None, splits=None, out=None, resume=None,
                 init_from=None, quiet=False) -> Path:
    """The ``handclip train`` entry point (also under torchrun); returns the run folder."""
    try:
        if resume is not None:
            return _resume(RunFolder(resume), overrides or {}, quiet)
        return _start(config_path, overrides, data_root, splits, out, init_from, quiet)
    finally:
        distributed.teardown()


def _start(config_path, overrides, data_root, splits, out, init_from, quiet) -> Path:
    if data_root is None or splits is None or out is None:
        raise UserError("train needs --data, --splits and --out (or --resume RUN)")
    config = load_config(config_path, overrides)
    distributed.setup(resolve_device(config.train.device))
    run = RunFolder(out)
    if run.has_progress():
        raise UserError(f"{out}: a run already exists there; continue it with --resume {out} or choose another --out")
    distributed.barrier()  # every process has looked before rank 0 writes there
    invocation = {"data_root": str(Path(data_root).resolve()), "splits": str(Path(splits).resolve()),
                  "init_from": str(Path(init_from).resolve()) if init_from else None}
    return _train(config, invocation, run, quiet)


def _resume(run: RunFolder, overrides: dict, quiet: bool) -> Path:
    mapping, invocation = run.read_run()
    unexpected = set(overrides) - RESUMABLE_KEYS
    if unexpected:
        raise UserError(f"--resume keeps the run's config; '{sorted(unexpected)[0]}' cannot change "
                        f"(start a new run with --init-from {run.best} instead)")
    config = config_from_dict(apply_overrides(mapping, overrides))
    distributed.setup(resolve_device(config.train.device))
    return _train(config, invocation, run, quiet)


def _train(config: Config, invocation: dict, run: RunFolder, quiet: bool) -> Path:
    if config.stages:
        return _run_stages(config, invocation, run, quiet)
    Trainer.for_run(config, run, invocation, quiet=quiet).fit()
    return run.root


def _run_stages(config: Config, invocation: dict, run: RunFolder, quiet: bool) -> Path:
    """Sequential fine-tuning: stage i starts from stage i-1's best checkpoint."""
    if distributed.is_main():
        run.write_start(config, invocation)
    init_from = invocation.get("init_from")
    stages = [stage_config(config, index) for index in range(len(config.stages))]
    # No stage trains on a subject that any stage tests: stage 1's dorsal_r (ids <= 1050) would
    # otherwise train on dorsal_l's test subjects 1038-1050.
    run_aspects = list(dict.fromkeys(aspect for stage in stages for aspect in stage.data.aspects))
    summary = []
    for index, stage in enumerate(stages):
        stage_run = RunFolder(run.root / f"stage_{index + 1}")
        trainer = Trainer.for_run(stage, stage_run, dict(invocation, init_from=init_from), quiet=quiet,
                                  held_out_aspects=run_aspects)
        best = trainer.fit()
        init_from = str(stage_run.best)
        summary.append({"stage": index + 1, "aspects": trainer.state.config.data.aspects, "run": stage_run.root.name,
                        **best})
    if distributed.is_main():
        atomic_write_json(run.root / "stages.json", summary)
    return run.root
