"""The training engine: one resumable fine-tuning run, or a chain of sequential stages.

Randomness is derived from (seed, epoch) at the start of every epoch — the batch sampler,
the augmentation generator and torch's global RNG — so a run resumed from the checkpoint of
epoch e replays epoch e+1 exactly as an uninterrupted run would.

Speed: a background thread reads the next batches from the image cache (into pinned memory on
a GPU) while the current one trains; augmentation runs on the training device; a step never
waits for the GPU (loss values stay on the device until the epoch ends); bf16 autocast, fused
AdamW, channels-last ResNets and optional ``torch.compile`` on GPUs. Under ``torchrun`` each
process trains its share of every epoch's batches in DistributedDataParallel (engine/distributed.py);
rank 0 alone validates and writes files.
"""
from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import handclip
from handclip.config import Config, config_from_dict, dump_config, load_config, read_yaml, stage_config
from handclip.data.datasets import BatchLoader, ImageDataset
from handclip.data.samplers import PKSampler, RandomBatchSampler
from handclip.data.subjects import merge_records, subject_record
from handclip.data.transforms import TrainTransform
from handclip.engine import distributed
from handclip.engine.checkpoint import (FROZEN_TEXT_PREFIX, checkpoint_architecture, load_checkpoint, load_weights,
                                       save_checkpoint)
from handclip.engine.encoder import Encoder, autocast, resolve_device
from handclip.engine.features import extract_features
from handclip.engine.schedule import build_optimizer, build_scheduler
from handclip.data.training import TrainingData, identity_key, load_training_data
from handclip.errors import UserError
from handclip.fileio import atomic_write_json, atomic_write_text
from handclip.losses.combined import ReIDLoss
from handclip.metrics import evaluate_ranking, pairwise_distance
from handclip.models.reid import build_reid_model

RUN_FILE = "run.json"  # where the data came from, so --resume needs only the folder
RANK_SEED_STRIDE = 1_000_000_007  # separates the processes' augmentation seeds (epochs never reach it)
VAL_COLUMNS = ("val_rank1", "val_mAP", "val_acc")


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

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


def run_training(config_path=None, overrides=None, data_root=None, splits=None, out=None, resume=None,
                 init_from=None, quiet=False) -> Path:
    """The ``handclip train`` entry point (also under torchrun); returns the run folder."""
    try:
        if resume is not None:
            return _resume(Path(resume), overrides or {}, quiet)
        return _start(config_path, overrides, data_root, splits, out, init_from, quiet)
    finally:
        distributed.teardown()


def _start(config_path, overrides, data_root, splits, out, init_from, quiet) -> Path:
    if data_root is None or splits is None or out is None:
        raise UserError("train needs --data, --splits and --out (or --resume RUN)")
    config = load_config(config_path, overrides)
    distributed.setup(resolve_device(config.train.device))
    out = Path(out)
    if RunPaths(out).history.exists() or RunPaths(out).last.exists():
        raise UserError(f"{out}: a run already exists there; continue it with --resume {out} or choose another --out")
    distributed.barrier()  # every process has looked before rank 0 writes there
    invocation = {"data_root": str(Path(data_root).resolve()), "splits": str(Path(splits).resolve()),
                  "init_from": str(Path(init_from).resolve()) if init_from else None}
    if config.stages:
        return _run_stages(config, invocation, out, quiet)
    Trainer(config, out, invocation, quiet=quiet).fit()
    return out


def _resume(run: Path, overrides: dict, quiet: bool) -> Path:
    paths = RunPaths(run)
    if not paths.config.exists() or not (run / RUN_FILE).exists():
        raise UserError(f"{run}: not a handclip run folder (no config.yaml / {RUN_FILE})")
    unexpected = set(overrides) - {"train.epochs", "train.device"}
    if unexpected:
        raise UserError(f"--resume keeps the run's config; '{sorted(unexpected)[0]}' cannot change "
                        f"(start a new run with --init-from {paths.best} instead)")
    mapping = read_yaml(paths.config)
    for key, value in overrides.items():
        section, name = key.split(".")
        mapping[section][name] = value
    config = config_from_dict(mapping)
    distributed.setup(resolve_device(config.train.device))
    invocation = json.loads((run / RUN_FILE).read_text())
    if config.stages:
        return _run_stages(config, invocation, run, quiet)
    Trainer(config, run, invocation, quiet=quiet).fit()
    return run


def _run_stages(config: Config, invocation: dict, out: Path, quiet: bool) -> Path:
    """Sequential fine-tuning: stage i starts from stage i-1's best checkpoint."""
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(config))
        atomic_write_json(out / RUN_FILE, invocation)
    init_from = invocation.get("init_from")
    stages = [stage_config(config, index) for index in range(len(config.stages))]
    # No stage trains on a subject that any stage tests: stage 1's dorsal_r (ids <= 1050) would
    # otherwise train on dorsal_l's test subjects 1038-1050.
    run_aspects = list(dict.fromkeys(aspect for stage in stages for aspect in stage.data.aspects))
    summary = []
    for index, stage in enumerate(stages):
        stage_dir = out / f"stage_{index + 1}"
        stage_invocation = dict(invocation, init_from=init_from)
        trainer = Trainer(stage, stage_dir, stage_invocation, quiet=quiet, held_out_aspects=run_aspects)
        trainer.fit()
        init_from = str(RunPaths(stage_dir).best)
        summary.append({"stage": index + 1, "aspects": trainer.config.data.aspects, "run": stage_dir.name,
                        **trainer.best_metrics})
    if distributed.is_main():
        atomic_write_json(out / "stages.json", summary)
    return out


@dataclass
class Trainer:
    config: Config
    out: Path
    invocation: dict
    quiet: bool = False
    best_metrics: dict = field(default_factory=dict)
    held_out_aspects: list[str] = field(default_factory=list)  # test subjects of these never train

    def __post_init__(self):
        self.paths = RunPaths(Path(self.out))
        self.device = distributed.local_device(resolve_device(self.config.train.device))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"train.device '{self.config.train.device}': no CUDA GPU is available here")
        self.main = distributed.is_main()
        self.quiet = self.quiet or not self.main  # one progress display: rank 0's
        self.data: TrainingData = load_training_data(self.invocation["data_root"], self.invocation["splits"],
                                                     self.config.data.aspects, self.config.data.identity,
                                                     self.held_out_aspects)

    # ---- set-up -------------------------------------------------------------------------------
    def _build(self):
        self._build_model()
        self._build_data()

    def _build_model(self):
        cfg = self.config
        torch.manual_seed(cfg.train.seed)
        self.uses_prompts = cfg.prompt.stage1_epochs > 0 or cfg.loss.i2t > 0
        self.model = build_reid_model(cfg.model, num_classes=len(self.data.class_names),
                                      keep_text=self.uses_prompts).to(self.device)
        # The config saved with the run says what "auto" became, so a rebuild needs no weights.
        self.config = cfg = replace(cfg, model=replace(cfg.model, quick_gelu=self.model.backbone.quick_gelu))
        self.trained_subjects = subject_record(self.data.samples)
        if self.invocation.get("init_from"):
            earlier = _init_weights(self.model, Path(self.invocation["init_from"]))
            self.trained_subjects = merge_records(self.trained_subjects, earlier)
        self.loss_fn = ReIDLoss(cfg.loss, len(self.data.class_names), self.model.feature_dims).to(self.device)
        groups = self.model.param_groups(cfg.optim)
        loss_params = [p for p in self.loss_fn.non_center_parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": cfg.optim.lr * cfg.optim.head_lr_mult, "name": "loss"})
        self.optimizer = build_optimizer(groups, cfg.optim, fused=self.device.type == "cuda")
        centers = list(self.loss_fn.center_parameters())
        self.center_optimizer = torch.optim.SGD(centers, lr=cfg.loss.center_lr) if centers else None
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.epochs)
        self.augment = TrainTransform(self.model.image_size, cfg.data.augment, self.model.mean, self.model.std)
        self.encoder = Encoder(self.model, device=self.device, amp=cfg.train.amp)
        self.text_features = None  # CLIP-ReID: learned identity text features, (classes, E)
        self.channels_last = self.device.type == "cuda" and self.model.backbone.kind == "rn"
        self.forward = self._training_forward()

    def _training_forward(self):
        """The model as a training step calls it: in DistributedDataParallel under torchrun, compiled
        with train.compile; ResNets channels-last on a GPU (tensor-core convolutions)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: find the fastest kernels once
            torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls outside autocast
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        forward = distributed.wrap_model(self.model, self.device)
        return torch.compile(forward) if self.config.train.compile else forward

    def _build_data(self):
        cfg = self.config
        self.dataset = ImageDataset(self.data.samples, None, size=train_cache_size(cfg, self.model.image_size),
                                    cache=cfg.data.cache, progress=not self.quiet)
        self.eval_dataset = None  # built at the first validation when it differs from self.dataset
        self.labels = torch.tensor(self.data.labels)
        self.sampler = self._make_sampler()
        self.loader = BatchLoader(self.dataset, self.sampler, cfg.data.num_workers,
                                  pin_memory=self.device.type == "cuda")

    def _make_sampler(self):
        cfg = self.config.data
        ranks = {"rank": distributed.rank(), "world_size": distributed.world_size()}
        if cfg.sampler == "pk":
            groups = [s.aspect for s in self.data.train] if cfg.aspect_balanced else None
            return PKSampler(self.data.labels, cfg.batch_size, cfg.k, seed=self.config.train.seed, group_of=groups,
                             **ranks)
        return RandomBatchSampler(len(self.data.train), cfg.batch_size, seed=self.config.train.seed,
                                  drop_last=len(self.data.train) >= cfg.batch_size * ranks["world_size"], **ranks)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        self._build()
        start_epoch = self._restore()
        if self.main:
            self._write_run_files()
        if self.uses_prompts and self.text_features is None:
            self.text_features = self._learn_prompts()
        epochs = self.config.train.epochs
        bar = tqdm(range(start_epoch, epochs), desc=f"train {self.paths.root.name}", disable=self.quiet,
                   initial=start_epoch, total=epochs, unit="epoch")
        for epoch in bar:
            row = self._train_epoch(epoch)
            if self.main:
                if (epoch + 1) % self.config.train.eval_every == 0 or epoch + 1 == epochs:
                    row.update(self._validate())
                self._end_epoch(epoch, row)
            distributed.barrier()  # the other processes wait while rank 0 validates and writes
            bar.set_postfix(loss=f"{row['loss']:.3f}", mAP=row.get("val_mAP", ""))
        if self.main:
            if not self.paths.best.exists() and self.paths.last.exists():
                # no validation ever ran (e.g. no val images): the last weights are the best we have
                self._save_checkpoint(self.paths.best, epoch=epochs - 1)
            self._plot()
        distributed.barrier()  # a next stage starts from best.pt
        return self.best_metrics

    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        self.sampler.set_epoch(epoch)
        torch.manual_seed(self.config.train.seed * 100_003 + epoch)
        generator = self._augment_generator(epoch)
        totals: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        started = time.perf_counter()
        for indices, images in tqdm(self.loader, desc=f"epoch {epoch + 1}", total=len(self.sampler),
                                    disable=self.quiet, leave=False, unit="batch"):
            terms, logits, labels = self._train_batch(indices, images, generator)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.double() * len(indices)
            if logits is not None:
                correct += (logits.argmax(1) == labels).sum()
            seen += len(indices)
        names = sorted(totals)
        seen = torch.tensor(float(seen), dtype=torch.float64, device=self.device)
        # The epoch's one wait for the device, with every process's sums at once.
        *sums, correct, seen = distributed.sum_over_processes(
            torch.stack([*(totals[name] for name in names), correct, seen])).tolist()
        elapsed = time.perf_counter() - started
        totals = dict(zip(names, sums))
        self.scheduler.step()
        row = {"epoch": epoch + 1}
        row.update({f"loss_{name}": totals[name] / max(seen, 1) for name in names if name != "total"})
        row["loss"] = totals.get("total", 0.0) / max(seen, 1)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["train_acc"] = correct / max(seen, 1)
        row["img_per_s"] = seen / elapsed if elapsed > 0 else 0.0
        return row

    def _augment_generator(self, epoch: int) -> torch.Generator:
        """The epoch's augmentation stream; each process draws its own (rank 0's is a single process's)."""
        seed = self.config.train.seed * 1_000_003 + epoch + RANK_SEED_STRIDE * distributed.rank()
        return torch.Generator(device=self.device).manual_seed(seed)

    def _train_batch(self, indices, images: torch.Tensor, generator: torch.Generator):
        """Augment the uint8 ``images`` of dataset items ``indices`` on the device and take one step;
        returns ``_step``'s terms and logits, and the labels on the device."""
        images = self.augment(images.to(self.device, non_blocking=True), generator=generator)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = self.labels[torch.as_tensor(indices)]
        if self.device.type == "cuda":
            labels = labels.pin_memory()  # a copy from pageable memory could wait for the GPU
        labels = labels.to(self.device, non_blocking=True)
        terms, logits = self._step(images, labels)
        return terms, logits, labels

    def _step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimiser step. Returns the loss terms (``total`` included) and the first branch's
        logits as detached device tensors: reading them here would make the CPU wait for the GPU."""
        try:
            with autocast(self.device, self.config.train.amp):
                outputs = self.forward(images, labels)
                total, terms = self.loss_fn(outputs, labels, self._text_logits(outputs))
            self.optimizer.zero_grad(set_to_none=True)
            if self.center_optimizer is not None:
                self.center_optimizer.zero_grad(set_to_none=True)
            total.backward()
            distributed.average_gradients(self.loss_fn.parameters())  # DDP averages the model's
            if self.config.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad)
            self.optimizer.step()
            if self.center_optimizer is not None:
                self.center_optimizer.step()
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"GPU out of memory at batch size {self.config.data.batch_size}; "
                            f"try --batch-size {max(self.config.data.batch_size // 2, 1)}") from None
        values = {name: value.detach() for name, value in terms.items()}
        values["total"] = total.detach()
        logits = outputs["logits"][0].detach() if outputs.get("logits") else None
        return values, logits

    def _learn_prompts(self) -> torch.Tensor:
        """CLIP-ReID stage 1: identity text tokens learned with both encoders frozen."""
        from handclip.engine.prompts import learn_identity_texts

        texts = learn_identity_texts(self.model, self.dataset, self.labels, self.config, self.device,
                                     quiet=self.quiet).to(self.device)
        return distributed.broadcast_from_main(texts)  # GPU arithmetic may differ in the last bits

    def _text_logits(self, outputs: dict) -> torch.Tensor | None:
        if self.text_features is None or self.config.loss.i2t <= 0:
            return None
        from handclip.engine.prompts import image_to_text_logits

        return image_to_text_logits(outputs["global"], self.text_features, self.config.prompt.similarity)

    def _validate(self) -> dict:
        """Val images as queries against the train images (same identities) as gallery, and the
        first branch's classification accuracy on the val images (CLIP-HandID's val metric)."""
        if not self.data.val:
            return {}
        self.model.eval()  # BatchNorm with its learned statistics; the next epoch sets train() again
        dataset = self._eval_dataset()
        query = extract_features(self.encoder, dataset, list(self.data.val_indices),
                                 self.config.train.eval_batch_size)
        gallery = extract_features(self.encoder, dataset, list(self.data.train_indices),
                                   self.config.train.eval_batch_size)
        mode = self.data.identity_mode
        result = evaluate_ranking(pairwise_distance(query, gallery),
                                  [identity_key(s, mode) for s in self.data.val],
                                  [identity_key(s, mode) for s in self.data.train])
        metrics = {"val_rank1": result["rank1"], "val_mAP": result["mAP"]}
        if self.model.num_classes:
            metrics["val_acc"] = self._val_accuracy()
        return metrics

    @torch.no_grad()
    def _val_accuracy(self) -> float:
        """Share of the val images (of train classes) whose first-branch logits rank their class first."""
        classes = {name: i for i, name in enumerate(self.data.class_names)}
        labels = [classes.get(identity_key(s, self.data.identity_mode), -1) for s in self.data.val]
        indices = [i for i, label in zip(self.data.val_indices, labels) if label >= 0]
        known = torch.tensor([label for label in labels if label >= 0])
        predicted = []
        size = self.config.train.eval_batch_size
        for start in range(0, len(indices), size):
            images = self.dataset.batch(indices[start:start + size]).to(self.device)
            with autocast(self.device, self.config.train.amp):
                predicted.append(self.model(self.encoder.transform(images))["logits"][0].argmax(1).cpu())
        return float((torch.cat(predicted) == known).float().mean()) if indices else 0.0

    def _eval_dataset(self) -> ImageDataset:
        """Train and val images stored at the model's input size, the pixels ``evaluate`` and
        ``Encoder.encode`` see (the training cache is larger, for the random crops)."""
        if self.dataset.size == self.model.image_size:
            return self.dataset
        if self.eval_dataset is None:
            self.eval_dataset = ImageDataset(self.data.samples, None, size=self.model.image_size,
                                             cache=self.config.data.cache, progress=not self.quiet)
        return self.eval_dataset

    # ---- files --------------------------------------------------------------------------------
    def _end_epoch(self, epoch: int, row: dict) -> None:
        """History first, then checkpoints: a kill in between leaves last.pt one epoch behind, so
        resume replays this epoch and cuts the history back to last.pt's epoch first — every
        epoch appears exactly once."""
        improved = self._improves(epoch, row)
        if improved:
            self.best_metrics = {"epoch": epoch + 1, **{k: row[k] for k in VAL_COLUMNS if k in row}}
        self._append_history(row)
        if improved:
            self._save_checkpoint(self.paths.best, epoch=epoch, metrics=row)
        self._save_checkpoint(self.paths.last, epoch=epoch, metrics=row, training_state=self._training_state(epoch))

    def _save_checkpoint(self, path: Path, **fields) -> None:
        save_checkpoint(path, model=self.model, config=self.config, class_names=self.data.class_names,
                        trained_subjects=self.trained_subjects, **fields)

    def _improves(self, epoch: int, row: dict) -> bool:
        """Whether this epoch's weights become best.pt (``train.best_metric``; ties go to the later epoch)."""
        metric = self.config.train.best_metric
        if metric == "last":
            return epoch + 1 == self.config.train.epochs
        return metric in row and row[metric] >= self.best_metrics.get(metric, -1.0)

    def _training_state(self, epoch: int) -> dict:
        state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict(),
                 "best_metrics": dict(self.best_metrics)}
        if self.text_features is not None:
            state["text_features"] = self.text_features.cpu()
        if self.center_optimizer is not None:
            state["center_optimizer"] = self.center_optimizer.state_dict()
        return state

    def _restore(self) -> int:
        """Continue from last.pt when the run folder has one; returns the first epoch to train."""
        if not self.paths.last.exists():
            if self.main:
                _truncate_history(self.paths.history, 0)
            return 0
        payload = load_checkpoint(self.paths.last, map_location=self.device)
        state = payload.get("training_state")
        if state is None:
            raise UserError(f"{self.paths.last}: holds no training state, cannot resume")
        load_weights(self.model, payload["model"], self.paths.last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_fn.load_state_dict(state["loss"])
        if self.center_optimizer is not None and "center_optimizer" in state:
            self.center_optimizer.load_state_dict(state["center_optimizer"])
        self.best_metrics = dict(state.get("best_metrics", {}))
        if "text_features" in state:
            self.text_features = state["text_features"].to(self.device)
        if self.main:
            _truncate_history(self.paths.history, state["epoch"] + 1)
        return state["epoch"] + 1

    def _write_run_files(self) -> None:
        root = self.paths.root
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.paths.config, dump_config(self.config))
        atomic_write_json(root / RUN_FILE, self.invocation)
        atomic_write_json(root / "env.json", environment(self.device))
        atomic_write_json(root / "classes.json", self.data.class_names)

    def _append_history(self, row: dict) -> None:
        """Rewrite history.csv whole (atomically) with the new row: never a half-written line."""
        _write_history(self.paths.history, _read_history(self.paths.history) + [row])

    def _plot(self) -> None:
        from handclip.report.plots import plot_history

        if self.paths.history.exists():
            plot_history(self.paths.history, self.paths.plots)


def train_cache_size(config: Config, image_size: int) -> int:
    """The stored side of training images: ``data.cache_size``, else ``data.augment.resize`` (the
    random crop then reads the stored pixels), else a little above the model's input."""
    return config.data.cache_size or config.data.augment.resize or round(image_size * 8 / 7)


def _history_columns(rows: list[dict]) -> list[str]:
    fixed_head, fixed_tail = ["epoch"], ["loss", "lr", "train_acc", *VAL_COLUMNS, "img_per_s"]
    terms = sorted({k for row in rows for k in row if k.startswith("loss_")})
    return fixed_head + terms + fixed_tail


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _truncate_history(path: Path, epochs_done: int) -> None:
    if not path.exists():
        return
    _write_history(path, [r for r in _read_history(path) if int(r["epoch"]) <= epochs_done])


def _write_history(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_history_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _init_weights(model: torch.nn.Module, path: Path) -> dict:
    """--init-from: take every weight whose name and shape fit (the backbone must fit whole);
    new heads (another class map, another head) start fresh. Returns the subjects the checkpoint
    was trained on ({} with a warning for a checkpoint of an older handclip, which has no record)."""
    payload = load_checkpoint(path)
    earlier = checkpoint_architecture(payload)["quick_gelu"]
    if earlier != model.backbone.quick_gelu:
        raise UserError(f"{path}: its backbone was trained with model.quick_gelu {str(earlier).lower()}, this "
                        f"config builds {str(model.backbone.quick_gelu).lower()}; set model.quick_gelu="
                        f"{str(earlier).lower()}")
    own = model.state_dict()
    fitting = {k: v for k, v in payload["model"].items() if k in own and own[k].shape == v.shape}
    backbone_keys = [k for k in own if k.startswith("backbone.") and not k.startswith(FROZEN_TEXT_PREFIX)]
    missing = [k for k in backbone_keys if k not in fitting]
    if missing:
        raise UserError(f"{path}: its backbone does not fit model.arch '{payload['config']['model']['arch']}' → "
                        f"this config (first mismatch '{missing[0]}')")
    model.load_state_dict(fitting, strict=False)
    if payload.get("trained_subjects") is None:
        if distributed.is_main():
            print(f"handclip: warning: {path}: no record of the subjects it was trained on (a checkpoint of an older "
                  f"handclip); this run's checkpoints record only its own", file=sys.stderr)
        return {}
    return payload["trained_subjects"]


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
