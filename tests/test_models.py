"""Models: backbones and their weights, freezing, heads, necks, classifiers, the re-ID model."""
import dataclasses
import math
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

from handclip.config import ModelConfig, OptimConfig
from handclip.errors import UserError
from handclip.models import backbones
from handclip.models.backbones import create_backbone
from handclip.models.classifiers import make_classifier
from handclip.models.freezing import apply_freezing
from handclip.models.reid import build_reid_model


def tiny_cfg(arch="tiny-vit", **changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig(arch=arch, pretrained="none"), **changes)


def images(model, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, model.image_size, model.image_size, generator=generator)


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def clip_file(request, tmp_path_factory):
    """A random tiny open_clip CLIP (OpenAI layout: text keys at top level) and its saved state dict."""
    torch.manual_seed(1)
    clip = open_clip.create_model(request.param).eval()
    path = tmp_path_factory.mktemp("weights") / f"{request.param}.pt"
    torch.save(clip.state_dict(), path)
    return request.param, clip, path


# ---- backbones ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, kind", [("tiny-vit", "vit"), ("tiny-rn", "rn")])
def test_tiny_presets_are_small_fast_inputs(arch, kind):
    backbone = create_backbone(arch)
    assert backbone.kind == kind
    assert 64 <= backbone.image_size <= 112
    assert sum(p.numel() for p in backbone.visual.parameters()) < 2_000_000


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_backbone_features_and_their_relations(arch):
    backbone = create_backbone(arch).eval()
    x = images(backbone)
    with torch.no_grad():
        out = backbone(x)
        clip_feature = backbone.visual(x)
    rows, columns = backbone.map_size
    assert out["proj"].shape == (2, backbone.dims["proj"])
    assert out["pre_proj"].shape == (2, backbone.dims["pre_proj"])
    assert out["map"].shape == (2, backbone.dims["map"], rows, columns)
    torch.testing.assert_close(out["proj"], clip_feature)
    if arch == "tiny-vit":  # the projection's input is the class token after ln_post
        torch.testing.assert_close(out["pre_proj"] @ backbone.visual.proj, out["proj"])
    else:
        torch.testing.assert_close(out["pre_proj"], out["map"].mean(dim=(2, 3)))


@pytest.mark.parametrize("arch, width", [("ViT-B-16", 768), ("RN50", 2048)])
def test_full_size_architectures_forward_once(arch, width):
    backbone = create_backbone(arch, pretrained="none").eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, 224, 224))
    assert out["pre_proj"].shape == (1, width)
    assert out["map"].shape[:2] == (1, width)
    assert torch.isfinite(out["proj"]).all()


def test_image_size_override_changes_the_feature_map():
    assert create_backbone("tiny-vit", image_size=64).map_size == (4, 4)
    assert create_backbone("tiny-rn", image_size=128).map_size == (4, 4)


def test_text_tower_is_dropped_unless_kept():
    backbone = create_backbone("tiny-vit")
    assert backbone.text is None
    assert not any(key.startswith("text.") for key in backbone.state_dict())


def test_unknown_arch_is_a_user_error_with_suggestions():
    with pytest.raises(UserError, match="'ViT-B-61'.*did you mean.*ViT-B-16"):
        create_backbone("ViT-B-61")


# ---- weights ---------------------------------------------------------------------------------------
def test_zero_shot_embedding_is_exactly_the_clip_image_feature(clip_file):
    arch, clip, path = clip_file
    model = build_reid_model(tiny_cfg(arch, pretrained=str(path), neck="none", embedding="proj"), num_classes=0).eval()
    x = images(model)
    with torch.no_grad():
        out = model(x)
        expected = clip.encode_image(x)
    assert out["logits"] == []
    assert torch.equal(out["embedding"], expected)


def test_safetensors_file_gives_the_same_model(clip_file, tmp_path):
    from safetensors.torch import save_file

    arch, clip, path = clip_file
    safe = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(safe))
    pt_backbone = create_backbone(arch, str(path)).eval()
    x = images(pt_backbone)
    with torch.no_grad():
        from_pt = pt_backbone(x)["proj"]
        from_safetensors = create_backbone(arch, str(safe)).eval()(x)["proj"]
    assert torch.equal(from_pt, from_safetensors)


def test_kept_text_tower_is_frozen_and_matches_clip(clip_file):
    arch, clip, path = clip_file
    backbone = create_backbone(arch, str(path), keep_text=True)
    tokens = backbone.tokenizer(["a photo of a hand", "a photo of a dorsal right hand"])
    with torch.no_grad():
        from_embeddings = backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens.argmax(dim=-1))
        expected = clip.encode_text(tokens)
    torch.testing.assert_close(from_embeddings, expected)
    assert not any(p.requires_grad for p in backbone.text.parameters())


def test_weights_load_at_another_image_size(clip_file):
    arch, clip, path = clip_file
    size = {"tiny-vit": 64, "tiny-rn": 128}[arch]
    backbone = create_backbone(arch, str(path), image_size=size).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, size, size))
    assert backbone.image_size == size
    assert torch.isfinite(out["proj"]).all()
    # the stem was loaded, not left random
    torch.testing.assert_close(backbone.visual.conv1.weight, clip.visual.conv1.weight)


def test_openai_torchscript_archive_loads_with_quick_gelu(tmp_path):
    torch.manual_seed(2)
    clip = open_clip.create_model("tiny-vit", force_quick_gelu=True).eval()
    path = tmp_path / "tiny-vit-openai.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's files are not
        torch.jit.script(clip).save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading it warns about nothing
        backbone = create_backbone("tiny-vit", str(path)).eval()
    x = images(backbone)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["proj"], clip.encode_image(x))


def test_weights_of_another_architecture_are_one_line_user_error(clip_file):
    arch, _, path = clip_file
    other = "tiny-rn" if arch == "tiny-vit" else "tiny-vit"
    with pytest.raises(UserError) as error:
        create_backbone(other, str(path))
    message = str(error.value)
    assert str(path) in message and "do not fit tiny-" in message and "\n" not in message


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return exec, ("raise SystemExit('unpickling ran code')",)


def test_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": RunsCodeWhenUnpickled()}, path)
    with pytest.raises(UserError, match="pickled Python objects"):
        create_backbone("tiny-vit", str(path))


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "ViT-B-16.pt"
    with pytest.raises(UserError, match=f"weights file {missing} not found"):
        create_backbone("tiny-vit", str(missing))


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(UserError, match="neither a weights file nor an open_clip tag of ViT-B-16.*openai"):
        create_backbone("ViT-B-16", "opeani")


@pytest.fixture
def hub_calls(monkeypatch):
    """Record each weights request to the Hugging Face hub as its local_files_only flag; none is cached."""
    import huggingface_hub

    calls = []

    def cache_only(repo, filename, local_files_only=False, **_):
        calls.append(local_files_only)
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo}/{filename} is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    return calls


OFFLINE_MESSAGE = ("pretrained tag 'openai' for ViT-B-16 needs a download, and this machine is offline; "
                   "pass a local weights file instead: --pretrained /path/to/ViT-B-16.pt")


def test_tag_with_hf_hub_offline_fails_at_once(hub_calls, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        create_backbone("ViT-B-16", "openai")
    assert str(error.value) == OFFLINE_MESSAGE
    assert hub_calls and all(hub_calls)  # the cache was asked, the network never


def test_tag_without_network_fails_at_once(hub_calls, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(address, timeout):
        assert timeout <= backbones.HUB_PROBE_TIMEOUT_S
        raise OSError("Name or service not known")

    monkeypatch.setattr(backbones.socket, "create_connection", unreachable)
    with pytest.raises(UserError) as error:
        create_backbone("ViT-B-16", "openai")
    assert str(error.value) == OFFLINE_MESSAGE
    assert hub_calls and all(hub_calls)


def test_tag_found_in_the_hub_cache_is_used_offline(clip_file, monkeypatch):
    arch, clip, path = clip_file
    import huggingface_hub

    monkeypatch.setattr(backbones, "get_pretrained_cfg", lambda a, tag: {"hf_hub": "org/tiny/"} if tag == "cached" else {})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, local_files_only=False: str(path) if local_files_only else None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = create_backbone(arch, "cached")
    torch.testing.assert_close(backbone.visual.conv1.weight, clip.visual.conv1.weight)


# ---- freezing and optimiser groups -----------------------------------------------------------------
def _train_step(model, optim_cfg):
    optimizer = torch.optim.AdamW(model.param_groups(optim_cfg))
    model.train()
    out = model(images(model, batch=4), torch.tensor([0, 1, 2, 0]))
    loss = sum(F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])) for logits in out["logits"])
    loss = loss + sum(feature.pow(2).mean() for feature in out["metric"])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("arch, unfreeze", [("tiny-vit", 1), ("tiny-rn", 1), ("tiny-rn", "none")])
def test_frozen_weights_stay_identical_after_a_step(arch, unfreeze):
    torch.manual_seed(0)
    model = build_reid_model(tiny_cfg(arch, unfreeze=unfreeze), num_classes=3)
    groups = model.backbone.layer_groups()
    trainable_groups = [] if unfreeze == "none" else groups[-1 - unfreeze:]
    trainable = {id(p) for group in trainable_groups for m in group for p in m.parameters()}
    before = {k: v.clone() for k, v in model.backbone.visual.state_dict().items()}
    names = dict(model.backbone.visual.named_parameters())
    _train_step(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    after = model.backbone.visual.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_params = {k for k, p in names.items() if id(p) not in trainable}
    assert frozen_params and not (frozen_params & changed)
    if arch == "tiny-rn":  # frozen stages keep their BatchNorm statistics
        frozen_stats = {k for k in before if k.startswith("layer1.") and "running_" in k}
        assert frozen_stats and not (frozen_stats & changed)
    trainable_names = {k for k, p in names.items() if id(p) in trainable}
    assert bool(trainable_names & changed) == (unfreeze != "none")


def test_bn_policy_frozen_keeps_rn_statistics_and_affine_weights():
    torch.manual_seed(0)
    model = build_reid_model(tiny_cfg("tiny-rn", unfreeze="all", bn_policy="frozen"), num_classes=3)
    batch_norms = [name for name, m in model.backbone.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_state = {k: v.clone() for k, v in model.backbone.visual.state_dict().items() if k.rsplit(".", 1)[0] in batch_norms}
    conv = model.backbone.visual.layer4[0].conv2.weight.clone()
    _train_step(model, OptimConfig(lr=1e-2))
    after = model.backbone.visual.state_dict()
    assert len(bn_state) == 5 * len(batch_norms) and all(torch.equal(bn_state[k], after[k]) for k in bn_state)
    assert not torch.equal(conv, model.backbone.visual.layer4[0].conv2.weight)
    assert not model.backbone.visual.bn1.training and model.training


def test_unfreezing_more_blocks_than_exist_is_a_user_error():
    backbone = create_backbone("tiny-vit")
    with pytest.raises(UserError, match="model.unfreeze.*tiny-vit has 4 transformer blocks"):
        apply_freezing(backbone, 5, "train")


def test_param_groups_apply_layer_decay_and_head_multiplier():
    model = build_reid_model(tiny_cfg("tiny-vit", unfreeze=2, layer_decay=0.5), num_classes=3)
    groups = model.param_groups(OptimConfig(lr=1.0, head_lr_mult=10.0, weight_decay=0.01))
    lrs = {group["name"]: group["lr"] for group in groups}
    assert lrs == {"backbone.final": 1.0, "backbone.block4": 0.5, "backbone.block3": 0.25, "head": 10.0}
    in_groups = [p for group in groups for p in group["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups})
    assert {id(p) for p in in_groups} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(group["weight_decay"] == 0.01 for group in groups)
    assert not model.necks[0].bias.requires_grad  # BNNeck's shift stays at zero


# ---- heads, necks and outputs ----------------------------------------------------------------------
@pytest.mark.parametrize("direction, branches", [("horizontal", 5), ("vertical", 5), ("both", 9)])
def test_pcb_head_branch_shapes(direction, branches):
    model = build_reid_model(tiny_cfg("tiny-vit", head="pcb", parts=4, part_direction=direction), num_classes=3)
    out = model.eval()(images(model))
    assert [f.shape for f in out["metric"]] == [(2, 64)] + [(2, 128)] * (branches - 1)
    assert [logits.shape for logits in out["logits"]] == [(2, 3)] * branches
    assert out["embedding"].shape == (2, 64 + 128 * (branches - 1)) == (2, model.embedding_dim)


def test_pcb_stripes_are_means_of_map_rows():
    model = build_reid_model(tiny_cfg("tiny-rn", head="pcb", parts=2, neck="none", embedding="pre_proj"), 0).eval()
    x = images(model)
    with torch.no_grad():
        feature_map = model.backbone(x)["map"]
        out = model(x)
    torch.testing.assert_close(out["metric"][1], feature_map[:, :, 0].mean(dim=2))
    torch.testing.assert_close(out["metric"][2], feature_map[:, :, 1].mean(dim=2))


def test_pcb_with_more_stripes_than_rows_is_a_user_error():
    with pytest.raises(UserError, match="model.parts.*2×2 feature map of tiny-rn"):
        build_reid_model(tiny_cfg("tiny-rn", head="pcb", parts=4), num_classes=3)


@pytest.mark.parametrize("arch, channels", [("tiny-vit", 128), ("tiny-rn", 512)])
def test_attention_head_branch_shapes_and_gradients(arch, channels):
    model = build_reid_model(tiny_cfg(arch, head="attention"), num_classes=3)
    out = model.train()(images(model, batch=3), torch.tensor([0, 1, 2]))
    assert [f.shape for f in out["metric"]] == [(3, 64), (3, channels), (3, channels)]
    assert out["embedding"].shape == (3, 64 + 2 * channels)
    sum(logits.logsumexp(1).sum() for logits in out["logits"]).backward()
    assert model.head.spatial_attention.gamma.grad.abs() > 0
    assert model.head.channel_attention.gamma.grad.abs() > 0


def test_spatial_attention_uses_relative_positions():
    """With content attention removed, moving a pixel changes the output: positions matter."""
    from handclip.models.heads import SpatialAttention

    torch.manual_seed(0)
    attention = SpatialAttention(16, (3, 3)).eval()
    attention.gamma.data.fill_(1.0)
    x = torch.zeros(1, 16, 3, 3)
    x[0, :, 0, 0] = 1.0
    shifted = torch.roll(x, shifts=1, dims=3)
    with torch.no_grad():
        a, b = attention(x), attention(shifted)
    assert not torch.allclose(torch.roll(a, shifts=1, dims=3), b)


@pytest.mark.parametrize("metric_feature, test_feature", [("before_bn", "after_bn"), ("after_bn", "before_bn")])
def test_bnneck_sides_feed_metric_and_test_features(metric_feature, test_feature):
    model = build_reid_model(tiny_cfg(metric_feature=metric_feature, test_feature=test_feature), num_classes=3)
    model.eval()
    x = images(model)
    with torch.no_grad():
        raw = model.backbone(x)["proj"]
        out = model(x)
        normed = model.necks[0](raw)
    expected = {"before_bn": raw, "after_bn": normed}
    torch.testing.assert_close(out["metric"][0], expected[metric_feature])
    torch.testing.assert_close(out["embedding"], expected[test_feature])
    torch.testing.assert_close(out["global"], raw)


def test_model_carries_preprocessing():
    model = build_reid_model(tiny_cfg(), num_classes=0)
    assert (model.image_size, model.mean, model.std) == (112, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


# ---- classifiers -----------------------------------------------------------------------------------
def _cosines(classifier, features):
    return F.normalize(features) @ F.normalize(classifier.weight).T


def test_linear_classifier_has_no_bias():
    classifier = make_classifier("linear", 8, 5)
    features = torch.randn(4, 8)
    assert classifier.bias is None
    torch.testing.assert_close(classifier(features), features @ classifier.weight.T)


@pytest.mark.parametrize("kind", ["cosine", "arcface", "cosface"])
def test_cosine_classifiers_without_margin_in_eval(kind):
    classifier = make_classifier(kind, 8, 5, scale=16.0, margin=0.4).eval()
    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(classifier(features, labels), 16.0 * _cosines(classifier, features))


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_applies_to_the_true_class_in_training(kind):
    torch.manual_seed(0)
    classifier = make_classifier(kind, 8, 5, scale=16.0, margin=0.4).train()
    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    cosines = _cosines(classifier, features)
    logits = classifier(features, labels)
    rows = torch.arange(4)
    theta = torch.acos(cosines[rows, labels])
    target = torch.where(theta + 0.4 < math.pi, torch.cos(theta + 0.4), cosines[rows, labels] - 0.4 * math.sin(0.4)) \
        if kind == "arcface" else cosines[rows, labels] - 0.4
    torch.testing.assert_close(logits[rows, labels], 16.0 * target)
    others = torch.ones_like(logits, dtype=torch.bool)
    others[rows, labels] = False
    torch.testing.assert_close(logits[others], 16.0 * cosines[others])
    torch.testing.assert_close(classifier(features), 16.0 * cosines)  # no labels: no margin


@pytest.mark.parametrize("kind", ["cosine", "arcface", "cosface"])
def test_cosine_classifiers_stay_float32_under_bf16_autocast(kind):
    classifier = make_classifier(kind, 8, 5, scale=16.0, margin=0.4).train()
    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = classifier(features, labels)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, classifier(features, labels))
