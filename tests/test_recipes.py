"""The reference recipes (configs/ref-*.yaml) and the options they need: CLIP-ReID's stage-1
contrastive loss against its own formula, both references' learning-rate schedules against
their code's, Adam with coupled L2, two-branch features, the penultimate metric feature, RN50
with last stride 1, loss branch sums, the best-checkpoint rule, and each preset end to end on
tiny models."""
import bisect
import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import handclip
from handclip.cli import main
from handclip.config import LossConfig, ModelConfig, OptimConfig, PromptConfig, load_config
from handclip.data.datasets import ImageDataset
from handclip.data.manifests import load_split
from handclip.engine.checkpoint import load_checkpoint
from handclip.engine.prompts import LOGIT_SCALE, contrastive_loss, image_to_text_logits, prompt_lr
from handclip.engine.schedule import build_optimizer, build_scheduler, lr_factor
from handclip.engine.trainer import improves
from handclip.errors import UserError
from handclip.losses.combined import ReIDLoss
from handclip.models.backbones import create_backbone
from handclip.models.reid import build_reid_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REFERENCES = {"ref-clip-handid-vitb16": "tiny-vit", "ref-clip-handid-rn50": "tiny-rn",
              "ref-clip-reid-vitb16": "tiny-vit"}
TINY_VIT = {"proj": 64, "pre_proj": 128}  # tiny-vit: CLIP embedding, transformer width
TINY_RN = {"proj": 64, "pre_proj": 512, "penultimate": 256}  # tiny-rn: embedding, layer4 / layer3 channels


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- CLIP-ReID stage 1: its SupConLoss -----------------------------------------------------------
def clip_reid_supcon(anchors, others, anchor_labels, other_labels):
    """loss/supcontrast.py of Syliz517/CLIP-ReID, step by step (temperature 1)."""
    b, n = len(anchors), len(others)
    mask = torch.eq(anchor_labels.unsqueeze(1).expand(b, n), other_labels.unsqueeze(0).expand(b, n)).float()
    logits = anchors @ others.T
    logits = logits - logits.max(dim=1, keepdim=True).values
    log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_stage_one_terms_equal_clip_reids_formula(similarity):
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # identities 1 and 3 appear once
    images = torch.randn(7, 16, generator=generator) * 3
    texts = (torch.randn(4, 16, generator=generator) * 2)[labels]  # each image's identity text, as stage 1 has it
    if similarity == "cosine":  # CLIP-ReID's formula on normalised features at the logit scale
        a, b = LOGIT_SCALE ** 0.5 * F.normalize(images, dim=1), LOGIT_SCALE ** 0.5 * F.normalize(texts, dim=1)
    else:
        a, b = images, texts
    i2t = contrastive_loss(images, labels, texts, labels, similarity)
    t2i = contrastive_loss(texts, labels, images, labels, similarity)
    assert i2t == pytest.approx(float(clip_reid_supcon(a, b, labels, labels)), rel=1e-5)
    assert t2i == pytest.approx(float(clip_reid_supcon(b, a, labels, labels)), rel=1e-5)


def test_an_identity_seen_once_is_pulled_towards_its_own_text():
    # All identities distinct: every anchor's only positive is its own counterpart, so the loss is
    # CLIP's cross-entropy with the diagonal as targets (pytorch-metric-learning's SupConLoss with
    # the same labels tensor on both sides gave 0 here: it dropped the diagonal).
    generator = torch.Generator().manual_seed(1)
    images, texts = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    labels = torch.tensor([4, 0, 3, 1, 2])
    expected = F.cross_entropy(images @ texts.T, torch.arange(5))
    loss = contrastive_loss(images, labels, texts, labels, "dot")
    assert loss > 0 and loss == pytest.approx(float(expected), rel=1e-5)


def test_image_to_text_logits_with_dot_similarity_are_raw_products():
    images, texts = torch.randn(5, 8) * 3, torch.randn(4, 8) * 2
    assert torch.allclose(image_to_text_logits(images, texts, "dot"), images @ texts.T, atol=1e-5)


def test_stage_one_lr_follows_clip_reids_cosine_scheduler():
    def timm_cosine(t, base=3.5e-4, lr_min=1e-6, warmup_lr_init=1e-5, warmup_t=5, t_initial=120):
        """solver/cosine_lr.py CosineLRScheduler._get_lr with the arguments of scheduler_factory.py."""
        if t < warmup_t:
            return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
        if t // t_initial >= 1:  # cycle_limit 1
            return lr_min
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))

    prompt = load_config(CONFIGS / "ref-clip-reid-vitb16.yaml").prompt
    # processor_clipreid_stage1.py: scheduler.step(epoch) with epoch = 1..120, before each epoch trains
    assert [prompt_lr(e, prompt, 120) for e in range(120)] == pytest.approx(
        [timm_cosine(t) for t in range(1, 121)], rel=1e-9)
    assert prompt_lr(119, PromptConfig(), 120) == pytest.approx(1e-6)


# ---- stage-2 / fine-tuning schedules against the references' code --------------------------------
def lrs(config_name: str, epochs: int) -> list[float]:
    """The lr of the first parameter group in each epoch, from handclip's optimiser and scheduler."""
    optim = load_config(CONFIGS / f"{config_name}.yaml").optim
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": optim.lr}], optim)
    scheduler = build_scheduler(optimizer, optim, epochs)
    values = []
    for _ in range(epochs):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_clip_handid_schedule_is_its_lr_scheduler():
    def update(num_epoch, base_lr=5e-6):  # lr_scheduler.py LRScheduler.update, as train_finetune.py builds it
        begin = 0.01 * base_lr
        if num_epoch < 10:
            return begin + (base_lr - begin) * num_epoch / 10
        return base_lr * 0.5 ** sum(1 for s in [40, 60] if s <= num_epoch)

    for name in ("ref-clip-handid-vitb16", "ref-clip-handid-rn50"):
        assert lrs(name, 70) == pytest.approx([update(e) for e in range(70)], rel=1e-9)


def test_clip_reid_stage_two_schedule_is_warmup_multistep_stepped_before_each_epoch():
    def warmup_multistep(last_epoch, base_lr=5e-6):  # solver/lr_scheduler.py WarmupMultiStepLR.get_lr
        factor = 1.0
        if last_epoch < 10:
            alpha = last_epoch / 10
            factor = 0.1 * (1 - alpha) + alpha
        return base_lr * factor * 0.1 ** bisect.bisect_right([30, 50], last_epoch)

    # processor_clipreid_stage2.py calls scheduler.step() first in epoch k = 1..60: last_epoch = k
    assert lrs("ref-clip-reid-vitb16", 60) == pytest.approx([warmup_multistep(k) for k in range(1, 61)], rel=1e-9)


def test_warmup_starts_at_the_start_factor_and_rises_linearly():
    optim = OptimConfig(warmup_epochs=4, warmup_start_factor=0.25, schedule="constant")
    assert [lr_factor(e, optim, 10) for e in range(6)] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0])
    shifted = OptimConfig(warmup_epochs=4, warmup_start_factor=0.25, schedule="step", milestones=[6], gamma=0.5,
                          schedule_offset=1)
    assert [lr_factor(e, shifted, 10) for e in range(7)] == pytest.approx([0.4375, 0.625, 0.8125, 1, 1, 0.5, 0.5])


@pytest.mark.parametrize("key, value", [("optim.warmup_start_factor", 1.5), ("model.last_stride", True),
                                        ("model.last_stride", 3), ("optim.optimizer", "adamx")])
def test_bad_recipe_values_are_user_errors(key, value):
    with pytest.raises(UserError, match=key):
        load_config(None, {key: value})


# ---- Adam with coupled L2 ------------------------------------------------------------------------
def test_adam_adds_the_decay_to_the_gradient_and_adamw_decays_the_weight():
    lr, decay, eps = 0.1, 0.5, 1e-8
    weight, grad = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1e-3, 0.0, -3e-3])

    def one_step(optimizer_name):
        parameter = torch.nn.Parameter(weight.clone())
        parameter.grad = grad.clone()
        config = OptimConfig(optimizer=optimizer_name, lr=lr, weight_decay=decay)
        build_optimizer([{"params": [parameter], "lr": lr, "weight_decay": decay}], config).step()
        return parameter.detach()

    # First step of Adam: bias-corrected m / sqrt(v) = g / |g|, on whatever gradient the rule uses.
    coupled = grad + decay * weight
    assert torch.allclose(one_step("adam"), weight - lr * coupled / (coupled.abs() + eps), atol=1e-6)
    assert torch.allclose(one_step("adamw"), weight * (1 - lr * decay) - lr * grad / (grad.abs() + eps), atol=1e-6)


def test_bias_parameters_get_their_own_lr_and_decay():
    config = load_config(CONFIGS / "ref-clip-reid-vitb16.yaml", {"model.arch": "tiny-vit", "model.pretrained": "none",
                                                                 "optim.bias_weight_decay": 3e-4})
    model = build_reid_model(config.model, num_classes=5)
    groups = model.param_groups(config.optim)
    names = {id(p): name for name, p in model.named_parameters()}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    for group in groups:
        is_bias = group["name"].endswith(".bias")
        assert all(("bias" in names[id(p)]) == is_bias for p in group["params"])
        plain = next(g for g in groups if g["name"] == group["name"].removesuffix(".bias"))
        assert group["lr"] == pytest.approx(plain["lr"] * (2 if is_bias else 1))
        assert group["weight_decay"] == (3e-4 if is_bias else 1e-4)
    assert any(g["name"].endswith(".bias") for g in groups)


# ---- model options -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, dims", [("tiny-vit", TINY_VIT), ("tiny-rn", TINY_RN)])
def test_two_branch_embedding_concatenates_both_branches(arch, dims):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, pretrained="none", image_size=64, embedding="both")
    model = build_reid_model(config, num_classes=5).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
        proj, pre_proj = model.backbone.visual(images), _pre_projection(model.backbone, images)
    assert [x.shape[1] for x in outputs["logits"]] == [5, 5]
    assert outputs["embedding"].shape == (3, dims["proj"] + dims["pre_proj"])
    expected = torch.cat([model.necks[0](proj), model.necks[1](pre_proj)], dim=1)  # after BN, both branches
    assert torch.allclose(outputs["embedding"], expected, atol=1e-5)
    model.test_feature = "before_bn"
    with torch.no_grad():
        assert torch.allclose(model(images)["embedding"], torch.cat([proj, pre_proj], dim=1), atol=1e-5)


def _pre_projection(backbone, images):
    """ViT: ln_post of the final class token; RN: the average of the last stage's map."""
    v = backbone.visual
    if backbone.kind == "vit":
        tokens = _blocks(v.transformer, v._embeds(images), len(v.transformer.resblocks))
        return v.ln_post(tokens[:, 0])
    return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images))))).mean(dim=(2, 3))


def _blocks(transformer, tokens, count):
    """(B, L, D) tokens through the first ``count`` blocks."""
    x = tokens if transformer.batch_first else tokens.transpose(0, 1)
    for block in list(transformer.resblocks)[:count]:
        x = block(x)
    return x if transformer.batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_penultimate_metric_feature_is_the_penultimate_layers_output(arch):
    torch.manual_seed(0)
    model = build_reid_model(ModelConfig(arch=arch, pretrained="none", image_size=64, embedding="both",
                                         penultimate_metric=True), num_classes=5).eval()
    images = torch.randn(2, 3, 64, 64)
    v = model.backbone.visual
    with torch.no_grad():
        metric = model(images)["metric"]
        if arch == "tiny-vit":  # the class token after all blocks but the last, no norm
            expected = _blocks(v.transformer, v._embeds(images), len(v.transformer.resblocks) - 1)[:, 0]
        else:  # the pooled layer3 map
            expected = v.layer3(v.layer2(v.layer1(v.stem(images)))).mean(dim=(2, 3))
    assert len(metric) == 3 and len(model.feature_dims) == 3
    assert torch.allclose(metric[2], expected, atol=1e-5)
    assert model.feature_dims[2] == metric[2].shape[1] and model.embedding_dim == sum(model.feature_dims[:2])


def test_last_stride_one_doubles_the_rn_map_and_interpolates_the_attention_grid(tmp_path):
    torch.manual_seed(0)
    native = create_backbone("tiny-rn", "none", image_size=64)
    weights = tmp_path / "tiny-rn.pt"
    torch.save({f"visual.{k}": v for k, v in native.visual.state_dict().items()}, weights)
    stride_one = create_backbone("tiny-rn", str(weights), image_size=64, last_stride=1).eval()
    assert native.map_size == (2, 2) and stride_one.map_size == (4, 4)

    # Every weight as loaded; the 2 x 2 grid of the attention pool interpolated to 4 x 4.
    own, loaded = stride_one.visual.state_dict(), native.visual.state_dict()
    key = "attnpool.positional_embedding"
    assert all(torch.equal(own[k], loaded[k]) for k in own if k != key)
    grid = loaded[key][1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, -1)
    assert torch.allclose(own[key], torch.cat([loaded[key][:1], grid]))

    # The output, computed here with layer4's first block convolving at stride 1 (no pooling).
    v, images = stride_one.visual, torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = v.layer3(v.layer2(v.layer1(v.stem(images))))
        first = v.layer4[0]
        out = first.act2(first.bn2(first.conv2(first.act1(first.bn1(first.conv1(x))))))
        shortcut = first.downsample[2](first.downsample[1](x))
        x = v.layer4[1:](first.act3(first.bn3(first.conv3(out)) + shortcut))
        features = stride_one(images)
    assert x.shape[-2:] == (4, 4)
    assert torch.allclose(features["map"], x, atol=1e-5)
    assert torch.allclose(features["proj"], v.attnpool(x), atol=1e-5)


def test_last_stride_on_a_vit_is_a_user_error():
    with pytest.raises(UserError, match="model.last_stride"):
        create_backbone("tiny-vit", "none", last_stride=1)


def test_pixel_stats_set_the_models_normalisation():
    model = build_reid_model(ModelConfig(arch="tiny-vit", pretrained="none", pixel_stats="imagenet"), 0)
    assert model.mean == pytest.approx((0.485, 0.456, 0.406)) and model.std == pytest.approx((0.229, 0.224, 0.225))
    half = build_reid_model(ModelConfig(arch="tiny-vit", pretrained="none", pixel_stats="half"), 0)
    assert half.mean == (0.5, 0.5, 0.5) and half.std == (0.5, 0.5, 0.5)


def test_branch_sum_adds_the_branches_terms():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)]
    features = [torch.randn(8, 6, generator=generator) for _ in range(3)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    outputs = {"logits": logits, "metric": features}
    per_branch = [F.cross_entropy(x, labels, label_smoothing=0.1) for x in logits]
    summed = ReIDLoss(LossConfig(ce=0.25, triplet=1.0, branch_reduction="sum"), 4, [6, 6, 6])
    averaged = ReIDLoss(LossConfig(ce=0.25, triplet=1.0), 4, [6, 6, 6])
    total_sum, terms_sum = summed(outputs, labels)
    total_mean, terms_mean = averaged(outputs, labels)
    assert float(terms_sum["ce"]) == pytest.approx(float(sum(per_branch)), rel=1e-6)
    assert float(terms_sum["triplet"]) == pytest.approx(3 * float(terms_mean["triplet"]), rel=1e-6)
    assert float(total_sum) == pytest.approx(0.25 * float(sum(per_branch)) + float(terms_sum["triplet"]), rel=1e-6)


# ---- best checkpoint rule ------------------------------------------------------------------------
@pytest.mark.parametrize("metric, picked", [("val_mAP", 2), ("val_acc", 3), ("last", 4)])
def test_best_checkpoint_follows_the_configured_metric(metric, picked, synth_root, splits_dir, tmp_path):
    config = load_config(None, {"model.arch": "tiny-vit", "model.pretrained": "none", "train.epochs": 4,
                                "train.best_metric": metric, "train.device": "cpu"})
    rows = [{"val_mAP": 0.5, "val_acc": 0.2}, {"val_mAP": 0.7, "val_acc": 0.1},
            {"val_mAP": 0.6, "val_acc": 0.4}, {"val_mAP": 0.1, "val_acc": 0.3}]
    best, best_metrics = None, {}
    for epoch, row in enumerate(rows):
        if improves(config.train, best_metrics, epoch, row):
            best_metrics = {"epoch": epoch + 1, **row}
            best = epoch + 1
    assert best == picked


# ---- the presets end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_runs(synth_root, splits_dir, tmp_path_factory):
    """Each reference preset trained for one epoch with its tiny architecture (64 px; the resize
    before the random crop scaled like the preset's 256 for 224)."""
    root = tmp_path_factory.mktemp("references")
    runs = {}
    for name, arch in REFERENCES.items():
        out = root / name
        code = main(["train", "--config", str(CONFIGS / f"{name}.yaml"), "--data", str(synth_root),
                     "--splits", str(splits_dir), "--out", str(out), "--arch", arch, "--pretrained", "none",
                     "--image-size", "64", "--epochs", "1", "--device", "cpu", "--quiet",
                     "--set", "data.cache_size=73", "--set", "data.augment.resize=73",
                     "--set", "prompt.stage1_epochs=2"])
        assert code == 0, name
        runs[name] = out
    return runs


@pytest.mark.parametrize("name, dims", [("ref-clip-handid-vitb16", TINY_VIT), ("ref-clip-handid-rn50", TINY_RN),
                                        ("ref-clip-reid-vitb16", TINY_VIT)])
def test_reference_preset_trains_reloads_and_evaluates(name, dims, reference_runs, synth_root, splits_dir, tmp_path):
    run = reference_runs[name]
    best = run / "checkpoints" / "best.pt"
    model_config = load_checkpoint(best)["config"]["model"]
    assert model_config["embedding"] == "both"
    encoder = handclip.load_model(best)  # rebuilt from the checkpoint's config: last stride, statistics
    paths = [s.path for s in load_split(synth_root, splits_dir, "dorsal_r", "query_0")[:3]]
    assert encoder.encode(paths).shape == (3, dims["proj"] + dims["pre_proj"])
    code = main(["evaluate", "--checkpoint", str(best), "--data", str(synth_root), "--splits", str(splits_dir),
                 "--aspect", "dorsal_r", "--num-splits", "1", "--out", str(tmp_path), "--device", "cpu", "--quiet"])
    assert code == 0 and (tmp_path / "results.json").exists()


def test_rn50_reference_keeps_last_stride_one_through_the_checkpoint(reference_runs):
    encoder = handclip.load_model(reference_runs["ref-clip-handid-rn50"] / "checkpoints" / "best.pt")
    assert encoder.model.backbone.map_size == (4, 4)  # tiny-rn at 64 px: 2 x 2 with stride 2
    assert encoder.model.mean == pytest.approx((0.485, 0.456, 0.406))


def test_val_accuracy_in_the_history_is_the_classifiers_accuracy(reference_runs, synth_root, splits_dir):
    run = reference_runs["ref-clip-handid-vitb16"]
    row = next(csv.DictReader((run / "history.csv").open()))
    payload = load_checkpoint(run / "checkpoints" / "best.pt")  # one epoch: the weights validated
    encoder = handclip.load_model(run / "checkpoints" / "best.pt")
    classes = payload["class_names"]
    val = [s for s in load_split(synth_root, splits_dir, "dorsal_r", "val") if s.identity in classes]
    images = ImageDataset(val, size=73).batch(range(len(val)))  # the stored training pixels
    with torch.no_grad():
        logits = encoder.model(encoder.transform(images))["logits"][0]
    expected = (logits.argmax(1) == torch.tensor([classes.index(s.identity) for s in val])).float().mean()
    assert float(row["val_acc"]) == pytest.approx(float(expected), abs=1e-6)


def test_clip_reid_reference_learns_raw_texts_and_trains_every_term(reference_runs):
    run = reference_runs["ref-clip-reid-vitb16"]
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss_ce", "loss_triplet", "loss_i2t", "val_acc"} <= set(header)
    texts = load_checkpoint(run / "checkpoints" / "last.pt")["training_state"]["text_features"]
    assert not torch.allclose(texts.norm(dim=1), torch.ones(len(texts)))  # similarity dot: raw features


def test_last_stride_on_a_vit_preset_exits_2_with_one_line(synth_root, splits_dir, tmp_path, capsys):
    code = main(["train", "--config", str(CONFIGS / "ref-clip-handid-rn50.yaml"), "--data", str(synth_root),
                 "--splits", str(splits_dir), "--out", str(tmp_path / "run"), "--arch", "tiny-vit",
                 "--pretrained", "none", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model.last_stride" in err
    assert not (tmp_path / "run").exists()
