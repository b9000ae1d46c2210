"""A training run's folder: where each file lives, the files written when a run starts
(config.yaml, run.json, env.json, classes.json), history.csv, the best/last checkpoints, and
resuming from last.pt. Only rank 0 writes here."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import handclip
from handclip.config import Config, dump_config, read_yaml
from handclip.engine import distributed
from handclip.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from handclip.errors import UserError
from handclip.fileio import atomic_write_json, atomic_write_text
from handclip.history import append_history, truncate_history

RUN_FILE = "run.json"  # where the data came from, so --resume needs only the folder


@dataclass
class RunFolder:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunFolder":
        """The run a ``RUN/checkpoints/*.pt`` belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def invocation(self) -> Path:
        return self.root / RUN_FILE

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def is_run(self) -> bool:
        """Whether a run was started here (what --resume needs)."""
        return self.config.exists() and self.invocation.exists()

    def has_progress(self) -> bool:
        """Whether an epoch was recorded here (a new run must not overwrite it)."""
        return self.history.exists() or self.last.exists()

    def read_run(self) -> tuple[dict, dict]:
        """The saved config (as a mapping, for overrides) and invocation of a started run."""
        if not self.is_run():
            raise UserError(f"{self.root}: not a handclip run folder (no config.yaml / {RUN_FILE})")
        return read_yaml(self.config), json.loads(self.invocation.read_text())

    def write_start(self, config: Config, invocation: dict, class_names: list[str] | None = None,
                    device: torch.device | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, dump_config(config))
        atomic_write_json(self.invocation, invocation)
        if device is not None:
            atomic_write_json(self.root / "env.json", environment(device))
        if class_names is not None:
            atomic_write_json(self.root / "classes.json", class_names)

    def append_history(self, row: dict) -> None:
        append_history(self.history, row)

    def save(self, path: Path, state, **fields) -> None:
        """A checkpoint of ``state``'s model (best.pt or last.pt)."""
        save_checkpoint(path, model=state.model, config=state.config, class_names=state.data.class_names,
                        trained_subjects=state.trained_subjects, **fields)

    def resume(self, state) -> int:
        """Load last.pt's weights and training state into ``state`` when there is one and cut the
        history back to its epoch (a kill between history and checkpoint replays that epoch);
        returns the first epoch to train."""
        if not self.last.exists():
            if distributed.is_main():
                truncate_history(self.history, 0)
            return 0
        payload = load_checkpoint(self.last, map_location=state.device)
        saved = payload.get("training_state")
        if saved is None:
            raise UserError(f"{self.last}: holds no training state, cannot resume")
        load_weights(state.model, payload["model"], self.last)
        state.load_training_state(saved)
        if distributed.is_main():
            truncate_history(self.history, saved["epoch"] + 1)
        return saved["epoch"] + 1


def environment(device: torch.device) -> dict:
    """What produced a run: versions, commit, device."""
    import open_clip

    env = {
        "handclip": handclip.__version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "device": str(device),
        "processes": distributed.world_size(),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None
