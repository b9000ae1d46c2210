"""The training loop: ``Trainer`` steps a ``TrainingState`` (engine/state.py) through its epochs
and records each in its ``RunFolder`` (engine/run.py).

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

import time
from typing import Sequence

import torch

from handclip.config import Config, TrainConfig
from handclip.data.datasets import ImageDataset
from handclip.data.training import identity_key, load_training_data
from handclip.engine import distributed
from handclip.engine.encoder import autocast
from handclip.engine.features import extract_features
from handclip.engine.run import RunFolder
from handclip.engine.state import TrainingState, build_training, training_device
from handclip.errors import UserError
from handclip.history import VAL_COLUMNS
from handclip.metrics import evaluate_ranking, pairwise_distance
from handclip.progress import progress

RANK_SEED_STRIDE = 1_000_000_007  # separates the processes' augmentation seeds (epochs never reach it)


class Trainer:
    def __init__(self, state: TrainingState, run: RunFolder | None, invocation: dict, quiet: bool = False):
        """``run``: where ``fit`` records (None for stepping only, as ``bench`` does)."""
        self.state, self.run, self.invocation = state, run, invocation
        self.main = distributed.is_main()
        self.quiet = quiet or not self.main  # one progress display: rank 0's
        self.eval_dataset = None  # built at the first validation when it differs from state.dataset

    @classmethod
    def for_run(cls, config: Config, run: RunFolder, invocation: dict, quiet: bool = False,
                held_out_aspects: Sequence[str] = ()) -> "Trainer":
        """Read the run's data and build its training state (``held_out_aspects``: test subjects of
        these never train)."""
        device = training_device(config)
        data = load_training_data(invocation["data_root"], invocation["splits"], config.data.aspects,
                                  config.data.identity, held_out_aspects)
        quiet = quiet or not distributed.is_main()
        return cls(build_training(config, data, device, invocation.get("init_from"), quiet), run, invocation, quiet)

    @property
    def config(self) -> Config:
        return self.state.config

    def fit(self) -> dict:
        """Train the remaining epochs; returns the best epoch's metrics."""
        state, epochs = self.state, self.config.train.epochs
        start = self.run.resume(state)
        if self.main:
            self.run.write_start(state.config, self.invocation, state.data.class_names, state.device)
        if state.uses_prompts and state.text_features is None:
            state.text_features = self.learn_prompts()
        bar = progress(range(start, epochs), desc=f"train {self.run.root.name}", enabled=not self.quiet,
                       initial=start, total=epochs, unit="epoch", per_item=True)
        for epoch in bar:
            row = self.train_epoch(epoch)
            if self.main:
                if (epoch + 1) % self.config.train.eval_every == 0 or epoch + 1 == epochs:
                    row.update(self.validate())
                self.record_epoch(epoch, row)
            distributed.barrier()  # the other processes wait while rank 0 validates and writes
            bar.set_postfix(loss=f"{row['loss']:.3f}", mAP=row.get("val_mAP", ""))
        if self.main:
            self.finish()
        distributed.barrier()  # a next stage starts from best.pt
        return state.best_metrics

    # ---- one epoch, one batch, one step -------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """One pass over the sampler's batches; returns the epoch's history row (without validation)."""
        state = self.state
        state.model.train()
        state.sampler.set_epoch(epoch)
        torch.manual_seed(self.config.train.seed * 100_003 + epoch)
        generator = self.augment_generator(epoch)
        totals: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.float64, device=state.device)
        seen = 0
        started = time.perf_counter()
        for indices, images in progress(state.loader, desc=f"epoch {epoch + 1}", total=len(state.sampler),
                                        enabled=not self.quiet, nested=True, unit="batch"):
            terms, logits, labels = self.train_batch(indices, images, generator)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.double() * len(indices)
            if logits is not None:
                correct += (logits.argmax(1) == labels).sum()
            seen += len(indices)
        names = sorted(totals)
        seen = torch.tensor(float(seen), dtype=torch.float64, device=state.device)
        # The epoch's one wait for the device, with every process's sums at once.
        *sums, correct, seen = distributed.sum_over_processes(
            torch.stack([*(totals[name] for name in names), correct, seen])).tolist()
        elapsed = time.perf_counter() - started
        totals = dict(zip(names, sums))
        state.scheduler.step()
        row = {"epoch": epoch + 1}
        row.update({f"loss_{name}": totals[name] / max(seen, 1) for name in names if name != "total"})
        row["loss"] = totals.get("total", 0.0) / max(seen, 1)
        row["lr"] = state.optimizer.param_groups[0]["lr"]
        row["train_acc"] = correct / max(seen, 1)
        row["img_per_s"] = seen / elapsed if elapsed > 0 else 0.0
        return row

    def augment_generator(self, epoch: int) -> torch.Generator:
        """The epoch's augmentation stream; each process draws its own (rank 0's is a single process's)."""
        seed = self.config.train.seed * 1_000_003 + epoch + RANK_SEED_STRIDE * distributed.rank()
        return torch.Generator(device=self.state.device).manual_seed(seed)

    def train_batch(self, indices, images: torch.Tensor, generator: torch.Generator):
        """Augment the uint8 ``images`` of dataset items ``indices`` on the device and take one step;
        returns ``step``'s terms and logits, and the labels on the device."""
        state = self.state
        images = state.augment(images.to(state.device, non_blocking=True), generator=generator)
        if state.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = state.labels[torch.as_tensor(indices)]
        if state.device.type == "cuda":
            labels = labels.pin_memory()  # a copy from pageable memory could wait for the GPU
        labels = labels.to(state.device, non_blocking=True)
        terms, logits = self.step(images, labels)
        return terms, logits, labels

    def step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimiser step on model-ready ``images``. Returns the loss terms (``total`` included)
        and the first branch's logits as detached device tensors: reading them here would make the
        CPU wait for the GPU."""
        state = self.state
        optimizers = [o for o in (state.optimizer, state.center_optimizer) if o is not None]
        if state.cuda_graphs:  # a new iteration: the graphs may reuse the previous step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with autocast(state.device, self.config.train.amp):
                outputs = state.forward(images, labels)
                total, terms = state.loss_fn(outputs, labels, self._text_logits(outputs))
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            total.backward()
            distributed.average_gradients(state.loss_fn.parameters())  # DDP averages the model's
            if self.config.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), self.config.optim.clip_grad)
            for optimizer in optimizers:
                optimizer.step()
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"GPU out of memory at batch size {self.config.data.batch_size}; "
                            f"try --batch-size {max(self.config.data.batch_size // 2, 1)}") from None
        values = {name: value.detach() for name, value in terms.items()}
        values["total"] = total.detach()
        logits = outputs["logits"][0].detach() if outputs.get("logits") else None
        return values, logits

    def learn_prompts(self) -> torch.Tensor:
        """CLIP-ReID stage 1: identity text tokens learned with both encoders frozen."""
        from handclip.engine.prompts import learn_identity_texts

        state = self.state
        texts = learn_identity_texts(state.model, state.dataset, state.labels, self.config, state.device,
                                     quiet=self.quiet).to(state.device)
        return distributed.broadcast_from_main(texts)  # GPU arithmetic may differ in the last bits

    def _text_logits(self, outputs: dict) -> torch.Tensor | None:
        if self.state.text_features is None or self.config.loss.i2t <= 0:
            return None
        from handclip.engine.prompts import image_to_text_logits

        return image_to_text_logits(outputs["global"], self.state.text_features, self.config.prompt.similarity)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> dict:
        """Val images as queries against the train images (same identities) as gallery, and the
        first branch's classification accuracy on the val images (CLIP-HandID's val metric)."""
        state, data = self.state, self.state.data
        if not data.val:
            return {}
        state.model.eval()  # BatchNorm with its learned statistics; the next epoch sets train() again
        dataset = self._eval_dataset()
        batch_size = self.config.train.eval_batch_size
        query = extract_features(state.encoder, dataset, list(data.val_indices), batch_size)
        gallery = extract_features(state.encoder, dataset, list(data.train_indices), batch_size)
        mode = data.identity_mode
        result = evaluate_ranking(pairwise_distance(query, gallery), [identity_key(s, mode) for s in data.val],
                                  [identity_key(s, mode) for s in data.train])
        metrics = {"val_rank1": result["rank1"], "val_mAP": result["mAP"]}
        if state.model.num_classes:
            metrics["val_acc"] = self._val_accuracy()
        return metrics

    @torch.no_grad()
    def _val_accuracy(self) -> float:
        """Share of the val images (of train classes) whose first-branch logits rank their class first."""
        state, data = self.state, self.state.data
        classes = {name: i for i, name in enumerate(data.class_names)}
        labels = [classes.get(identity_key(s, data.identity_mode), -1) for s in data.val]
        indices = [i for i, label in zip(data.val_indices, labels) if label >= 0]
        known = torch.tensor([label for label in labels if label >= 0])
        predicted = []
        size = self.config.train.eval_batch_size
        for start in range(0, len(indices), size):
            images = state.dataset.batch(indices[start:start + size]).to(state.device)
            with autocast(state.device, self.config.train.amp):
                predicted.append(state.model(state.encoder.transform(images))["logits"][0].argmax(1).cpu())
        return float((torch.cat(predicted) == known).float().mean()) if indices else 0.0

    def _eval_dataset(self) -> ImageDataset:
        """Train and val images stored at the model's input size, the pixels ``evaluate`` and
        ``Encoder.encode`` see (the training cache is larger, for the random crops)."""
        state = self.state
        if state.dataset.size == state.model.image_size:
            return state.dataset
        if self.eval_dataset is None:
            self.eval_dataset = ImageDataset(state.data.samples, size=state.model.image_size,
                                             cache=self.config.data.cache, progress=not self.quiet)
        return self.eval_dataset

    # ---- the run folder -----------------------------------------------------------------------
    def record_epoch(self, epoch: int, row: dict) -> None:
        """History first, then checkpoints: a kill in between leaves last.pt one epoch behind, so
        resume replays this epoch and cuts the history back to last.pt's epoch first — every
        epoch appears exactly once."""
        state = self.state
        improved = improves(self.config.train, state.best_metrics, epoch, row)
        if improved:
            state.best_metrics = {"epoch": epoch + 1, **{k: row[k] for k in VAL_COLUMNS if k in row}}
        self.run.append_history(row)
        if improved:
            self.run.save(self.run.best, state, epoch=epoch, metrics=row)
        self.run.save(self.run.last, state, epoch=epoch, metrics=row, training_state=state.training_state(epoch))

    def finish(self) -> None:
        epochs = self.config.train.epochs
        if not self.run.best.exists() and self.run.last.exists():
            # no validation ever ran (e.g. no val images): the last weights are the best we have
            self.run.save(self.run.best, self.state, epoch=epochs - 1)
        if self.run.history.exists():
            from handclip.report.plots import plot_history

            plot_history(self.run.history, self.run.plots)


def improves(train: TrainConfig, best_metrics: dict, epoch: int, row: dict) -> bool:
    """Whether this epoch's weights become best.pt (``train.best_metric``; ties go to the later epoch)."""
    if train.best_metric == "last":
        return epoch + 1 == train.epochs
    return train.best_metric in row and row[train.best_metric] >= best_metrics.get(train.best_metric, -1.0)
