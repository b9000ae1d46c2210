"""Explanations: the score is the encoder's cosine, the maps follow the gradient of every head,
a ResNet map equals its closed form, greying the hottest patches hurts more than greying random
ones (faithfulness, on a trained tiny ViT), and ``handclip explain`` writes its files or fails cleanly."""
import collections
import copy
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import handclip
from handclip.cli import main
from handclip.config import config_from_dict
from handclip.data.manifests import load_split
from handclip.engine.encoder import Encoder
from handclip.explain import explain_pair, overlay
from handclip.explain.relevance import _explained_activation, relevance_grids
from handclip.models.reid import build_reid_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
GREY_FRACTION = 0.2
RANDOM_DRAWS = 5


@pytest.fixture(scope="module")
def trained_vit(synth_root, splits_dir, tmp_path_factory):
    """tiny-vit (7×7 patches at 112 px) trained 6 epochs on dorsal_r: its features separate identities."""
    from handclip.engine.train import run_training

    os.environ["HANDCLIP_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "image-cache")
    out = tmp_path_factory.mktemp("explain-run") / "vit"
    run_training(config_path=CONFIG, overrides={"train.epochs": 6, "train.device": "cpu"},
                 data_root=synth_root, splits=splits_dir, out=out, quiet=True)
    return out / "checkpoints" / "best.pt"


def random_init_encoder(arch: str, head: str, **model) -> Encoder:
    torch.manual_seed(0)
    config = config_from_dict({"model": {"arch": arch, "pretrained": "none", "head": head, "parts": 2, **model}})
    reid = build_reid_model(config.model, num_classes=4)
    for name, parameter in reid.named_parameters():
        if name.endswith("gamma"):
            parameter.data.fill_(0.5)  # the attention branches start as identities; make them count
    encoder = Encoder(reid)
    fit_batchnorm_statistics(encoder)
    return encoder


def fit_batchnorm_statistics(encoder: Encoder) -> None:
    """Set every BatchNorm's statistics to those of a batch of photos, as training would: untrained
    features all share one large positive component, which would make every pair's cosine ≈ 1."""
    batchnorms = [m for m in encoder.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for module in batchnorms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average: one batch sets the statistics
    encoder.model.train()
    with torch.no_grad():
        encoder.model(encoder.transform(encoder.to_uint8([random_photo(100 + i) for i in range(8)])))
    encoder.model.eval()


def random_photo(seed: int, size=(90, 70)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return Image.fromarray(pixels).resize((size[0] * 2, size[1] * 2), Image.Resampling.BILINEAR)


def finite_difference_grid(encoder: Encoder, pixels: torch.Tensor, step: float = 1e-3) -> torch.Tensor:
    """The relevance of image 0 of the pair measured without autograd: for each position of the
    explained activation (ViT: the tokens entering the last block; ResNet: the last map), the
    central difference of the score when that position's activation is scaled by 1 ± step, which
    tends to Σ_c gradient · activation. Positive part, over its maximum. In float64: one token moves
    a global ViT score by less than float32 resolves."""
    model = copy.deepcopy(encoder.model).double()
    backbone = model.backbone
    rows, columns = backbone.map_size
    positions = rows * columns
    scale = torch.ones(2 * positions, positions, dtype=torch.float64)
    scale[torch.arange(positions), torch.arange(positions)] += step
    scale[positions + torch.arange(positions), torch.arange(positions)] -= step
    if backbone.kind == "vit":
        class_token = torch.ones(2 * positions, 1, dtype=torch.float64)
        hook = backbone.visual.transformer.resblocks[-1].register_forward_pre_hook(
            lambda module, args: (args[0] * torch.cat([class_token, scale], 1)[:, :, None], *args[1:]))
    else:
        hook = backbone.visual.layer4.register_forward_hook(
            lambda module, args, output: output * scale.view(-1, 1, rows, columns))
    inputs = encoder.transform(pixels).double()
    with torch.no_grad():
        scaled = F.normalize(model(inputs[:1].expand(2 * positions, -1, -1, -1))["embedding"], dim=1)
        hook.remove()
        other = F.normalize(model(inputs[1:])["embedding"], dim=1)[0]
    scores = scaled @ other
    contribution = ((scores[:positions] - scores[positions:]) / (2 * step)).clamp(min=0).view(rows, columns)
    return (contribution / contribution.max() if contribution.max() > 0 else contribution).float()


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("head", ["global", "pcb", "attention"])
def test_every_head_gets_the_encoders_score_and_the_gradient_of_its_embedding(arch, head):
    encoder = random_init_encoder(arch, head, neck="bnneck")
    a, b = random_photo(1, (90, 70)), random_photo(2, (50, 80))
    result = explain_pair(encoder, a, b)
    features = encoder.encode([a, b])
    assert result["score"] == pytest.approx(float(features[0] @ features[1]), abs=1e-5)
    for heatmap, image in ((result["heatmap_a"], a), (result["heatmap_b"], b)):
        assert heatmap.shape == (image.height, image.width) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0 and heatmap.max() <= 1
    pixels = encoder.to_uint8([a, b])
    _, grids = relevance_grids(encoder, pixels)
    expected = finite_difference_grid(encoder, pixels)
    assert expected.max() == 1  # some position raises the score, so the comparison means something
    # float32 autograd against a float64 reference: a global ViT's per-token terms nearly cancel
    torch.testing.assert_close(grids[0], expected, atol=0.05, rtol=0)
    assert (grids[0] - expected).abs().mean() < 0.01
    assert all(p.grad is None for p in encoder.model.parameters())  # the model is left as it was


def test_paths_give_the_scores_of_encode_paths(tmp_path):
    encoder = random_init_encoder("tiny-vit", "global")
    paths = [tmp_path / "q.jpg", tmp_path / "c.png"]
    random_photo(3).save(paths[0])
    random_photo(4, (60, 60)).save(paths[1])
    result = explain_pair(encoder, *paths)
    features = encoder.encode(paths)
    assert result["score"] == pytest.approx(float(features[0] @ features[1]), abs=1e-5)
    assert result["heatmap_a"].shape == (140, 180) and result["heatmap_b"].shape == (120, 120)


def test_encode_in_another_thread_passes_the_hooks_untouched():
    """A web server may encode a query while an explanation holds its hooks on the same model."""
    encoder = random_init_encoder("tiny-vit", "attention")
    photos = [random_photo(7), random_photo(8)]
    before = encoder.encode(photos)
    with _explained_activation(encoder.model.backbone) as captured:
        during = encoder.encode(photos)  # no gradients: as encode() runs in any thread
    assert captured == [] and torch.equal(before, during)


def test_resnet_map_equals_its_closed_form():
    """Embedding = the mean of the last map, so d cos(f_a, f_b) / d map_a[c, y, x] =
    (f̂_b - cos · f̂_a)[c] / (|f_a| · hw): the map is Σ_c map · that, positive part, over its maximum."""
    encoder = random_init_encoder("tiny-rn", "global", embedding="pre_proj", neck="none", image_size=128)
    pixels = encoder.to_uint8([random_photo(5), random_photo(6)])
    score, grids = relevance_grids(encoder, pixels)
    with torch.no_grad():
        maps = encoder.model.backbone(encoder.transform(pixels))["map"]
    pooled = maps.mean(dim=(2, 3))
    unit = F.normalize(pooled, dim=1)
    cosine = float(unit[0] @ unit[1])
    expected = []
    for i, j in ((0, 1), (1, 0)):
        gradient = (unit[j] - cosine * unit[i]) / (pooled[i].norm() * maps[i, 0].numel())
        contribution = torch.einsum("chw,c->hw", maps[i], gradient).clamp(min=0)
        expected.append(contribution / contribution.max())
    assert grids.shape == (2, 4, 4)
    assert score == pytest.approx(cosine, abs=1e-5)
    torch.testing.assert_close(grids, torch.stack(expected), atol=1e-4, rtol=1e-3)


def grey_cells(pixels: torch.Tensor, cells, grid: tuple[int, int], grey: torch.Tensor) -> torch.Tensor:
    """A copy of ``pixels`` (3, S, S) with the given cells of the ``grid`` set to ``grey``."""
    rows, columns = grid
    height, width = pixels.shape[1] // rows, pixels.shape[2] // columns
    pixels = pixels.clone()
    for cell in cells:
        row, column = divmod(int(cell), columns)
        pixels[:, row * height:(row + 1) * height, column * width:(column + 1) * width] = grey
    return pixels


def test_greying_the_hottest_patches_lowers_the_similarity_more_than_random_patches(trained_vit, synth_root,
                                                                                      splits_dir):
    encoder = handclip.load_model(trained_vit)
    by_identity = collections.defaultdict(list)
    for sample in load_split(synth_root, splits_dir, "dorsal_r", "test"):
        by_identity[sample.identity].append(sample.path)
    pairs = [pair for paths in by_identity.values() for pair in itertools.combinations(paths, 2)]
    # the model's mean colour: 0 once normalised, the least informative pixel
    grey = torch.tensor([round(m * 255) for m in encoder.model.mean], dtype=torch.uint8)[:, None, None]
    rng = np.random.default_rng(0)
    drops = {"hottest": [], "random": []}
    for pair in pairs:
        pixels = encoder.to_uint8(pair)
        score, grids = relevance_grids(encoder, pixels)
        grid = tuple(grids.shape[1:])
        cells = grid[0] * grid[1]
        count = round(GREY_FRACTION * cells)
        for side in (0, 1):
            hottest = torch.argsort(grids[side].flatten(), descending=True)[:count]
            chosen = [hottest] + [rng.choice(cells, count, replace=False) for _ in range(RANDOM_DRAWS)]
            greyed = torch.stack([grey_cells(pixels[side], c, grid, grey) for c in chosen])
            similarity = encoder.encode(greyed) @ encoder.encode(pixels[1 - side][None])[0]
            drops["hottest"].append(score - float(similarity[0]))
            drops["random"].append(score - float(similarity[1:].mean()))
    means = {kind: float(np.mean(values)) for kind, values in drops.items()}
    print(f"\nfaithfulness over {len(pairs)} same-identity pairs × 2 sides, {count} of {cells} patches greyed: "
          f"mean similarity drop hottest {means['hottest']:.4f}, random {means['random']:.4f}")
    assert len(pairs) >= 20
    assert means["hottest"] > means["random"], means


def test_overlay_tints_by_heat_and_fits_any_map():
    image = Image.new("RGB", (40, 30), (200, 200, 200))
    heat = np.zeros((30, 40), np.float32)
    heat[:, 20:] = 1.0
    drawn = np.asarray(overlay(image, heat))
    assert drawn.shape == (30, 40, 3)
    assert (drawn[:, :20] == 200).all() and (drawn[:, 25:] != 200).any(axis=2).all()
    coarse = overlay(image, np.array([[0.0, 1.0]], np.float32))  # a 1×2 grid stretched over the photo
    assert coarse.size == image.size and (np.asarray(coarse)[:, 0] == 200).all()


def test_cli_writes_the_overlays_maps_and_score(trained_vit, synth_root, tmp_path, capsys):
    query, candidate = sorted((synth_root / "Hands").glob("*.jpg"))[:2]
    out = tmp_path / "explained"
    assert main(["explain", "--checkpoint", str(trained_vit), str(query), str(candidate), "--out", str(out)]) == 0
    assert "score" in capsys.readouterr().out
    summary = json.loads((out / "explanation.json").read_text())
    features = handclip.load_model(trained_vit).encode([query, candidate])
    assert summary["score"] == pytest.approx(float(features[0] @ features[1]), abs=1e-5)
    assert summary["checkpoint_sha256"] == hashlib.sha256(trained_vit.read_bytes()).hexdigest()
    for role, path in (("query", query), ("candidate", candidate)):
        with Image.open(path) as photo:
            size = photo.size
        heatmap = np.load(out / f"{role}_heatmap.npy")
        assert heatmap.shape == (size[1], size[0]) and 0 <= heatmap.min() and heatmap.max() <= 1
        with Image.open(out / f"{role}_overlay.png") as drawn:
            assert drawn.size == size and drawn.mode == "RGB"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["explanation.json", "query_overlay.png", "query_heatmap.npy", "candidate_overlay.png",
         "candidate_heatmap.npy"])


@pytest.mark.parametrize("case", ["not-an-image", "missing-image", "not-a-checkpoint"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, trained_vit, synth_root, tmp_path, capsys):
    query, candidate = sorted((synth_root / "Hands").glob("*.jpg"))[:2]
    checkpoint = trained_vit
    if case == "not-an-image":
        query = tmp_path / "notes.jpg"
        query.write_text("not a photo")
    elif case == "missing-image":
        candidate = tmp_path / "gone.jpg"
    else:
        checkpoint = tmp_path / "model.pt"
        checkpoint.write_bytes(b"junk")
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    code = main(["explain", "--checkpoint", str(checkpoint), str(query), str(candidate), "--out", str(out)])
    err = capsys.readouterr().err
    expected = {"not-an-image": "notes.jpg", "missing-image": "gone.jpg", "not-a-checkpoint": "model.pt"}[case]
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
