"""Every fine-tuning strategy end to end on tiny models: each ViT-B/16 preset trains one epoch
with tiny-vit, saves, reloads and evaluates; part and attention branch shapes; CLIP-ReID prompt
learning; sequential stages chaining checkpoints; cross-aspect evaluation; fusion of two models."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import handclip
from handclip.cli import main
from handclip.config import load_config, stage_config
from handclip.data.datasets import ImageDataset
from handclip.data.manifests import load_split
from handclip.engine import evaluation
from handclip.engine.checkpoint import load_checkpoint
from handclip.engine.prompts import (LOGIT_SCALE, PromptLearner, image_features, image_to_text_logits,
                                     learn_identity_texts, train_prompts)
from handclip.engine.run import RunFolder
from handclip.engine.trainer import Trainer
from handclip.errors import UserError
from handclip.metrics import distance_matrix, evaluate_ranking, pairwise_distance
from handclip.models.reid import build_reid_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--set", "model.arch=tiny-vit", "--set", "model.pretrained=none", "--set", "model.image_size=64",
        "--epochs", "1", "--device", "cpu", "--quiet"]
# Per preset: what fits the tiny model (a 4 x 4 patch grid at 64 px holds no 6 stripes).
EXTRA = {
    "pcb": ["--set", "model.image_size=96"],
    "clipreid": ["--set", "prompt.stage1_epochs=2"],
}
TINY_WIDTH, TINY_EMBED = 128, 64  # tiny-vit: transformer width (patch map channels), CLIP embedding


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(synth_root, splits_dir, tmp_path_factory):
    """``trained(name)``: the run folder of configs/vitb16-<name>.yaml trained once with tiny-vit."""
    runs = {}
    root = tmp_path_factory.mktemp("strategies")

    def train(name: str) -> Path:
        if name not in runs:
            out = root / name
            code = main(["train", "--config", str(CONFIGS / f"vitb16-{name}.yaml"), "--data", str(synth_root),
                         "--splits", str(splits_dir), "--out", str(out), *TINY, *EXTRA.get(name, [])])
            assert code == 0
            runs[name] = out
        return runs[name]

    return train


def evaluate(out: Path, synth_root, splits_dir, *args) -> dict:
    code = main(["evaluate", "--data", str(synth_root), "--splits", str(splits_dir), "--out", str(out),
                 "--num-splits", "1", "--device", "cpu", "--quiet", *map(str, args)])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def assert_metrics_valid(result: dict) -> None:
    """Every split ranked some queries, the mean row is the splits' mean, and CMC points rise."""
    splits = result["splits"]
    assert splits and all(split["num_queries"] > 0 for split in splits)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert result["mean"][key] == pytest.approx(np.mean([split[key] for split in splits])), key
    assert all(split["rank1"] <= split["rank5"] <= split["rank10"] for split in splits)


# (preset, the config values that make it that strategy, test feature size of the tiny model)
PRESETS = [
    ("pcb", {"head": "pcb", "parts": 6}, TINY_EMBED + 6 * TINY_WIDTH),
    ("attention", {"head": "attention"}, TINY_EMBED + 2 * TINY_WIDTH),
    ("clipreid", {"head": "global"}, TINY_EMBED),
    ("cross-aspect", {"head": "global"}, TINY_EMBED),
]


@pytest.mark.parametrize("name, model_values, dim", PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_trains_saves_reloads_and_evaluates(name, model_values, dim, trained, synth_root, splits_dir,
                                                   tmp_path):
    best = trained(name) / "checkpoints" / "best.pt"
    payload = load_checkpoint(best)
    assert {k: payload["config"]["model"][k] for k in model_values} == model_values
    assert payload["config"]["model"]["arch"] == "tiny-vit"
    encoder = handclip.load_model(best)
    paths = [s.path for s in load_split(synth_root, splits_dir, "dorsal_r", "query_0")[:3]]
    features = encoder.encode(paths)
    assert features.shape == (3, dim)
    assert torch.allclose(features, handclip.load_model(best).encode(paths))  # reloads to the same model
    assert_metrics_valid(evaluate(tmp_path, synth_root, splits_dir, "--checkpoint", best, "--aspect", "dorsal_r"))


@pytest.mark.parametrize("name, branch_dims", [
    ("pcb", [TINY_EMBED] + [TINY_WIDTH] * 6),
    ("attention", [TINY_EMBED, TINY_WIDTH, TINY_WIDTH]),
])
def test_part_and_attention_branch_shapes(name, branch_dims):
    config = load_config(CONFIGS / f"vitb16-{name}.yaml",
                         {"model.arch": "tiny-vit", "model.pretrained": "none", "model.image_size": 96})
    model = build_reid_model(config.model, num_classes=5).train()
    outputs = model(torch.randn(4, 3, 96, 96), torch.arange(4))
    assert [tuple(f.shape) for f in outputs["metric"]] == [(4, d) for d in branch_dims]
    assert [tuple(x.shape) for x in outputs["logits"]] == [(4, 5)] * len(branch_dims)
    assert outputs["embedding"].shape == (4, sum(branch_dims))


def test_clipreid_stage_two_trains_with_the_image_to_text_loss(trained):
    run = trained("clipreid")
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss_ce", "loss_triplet", "loss_i2t"} <= set(header)
    state = load_checkpoint(run / "checkpoints" / "last.pt")["training_state"]
    texts = state["text_features"]
    classes = json.loads((run / "classes.json").read_text())
    assert texts.shape == (len(classes), TINY_EMBED)
    assert torch.allclose(texts.norm(dim=1), torch.ones(len(classes)), atol=1e-5)
    assert not any(k.startswith("backbone.text.") for k in load_checkpoint(run / "checkpoints" / "best.pt")["model"])


def test_cross_aspect_run_learns_people_and_ranks_across_aspects(trained, synth_root, splits_dir, tmp_path):
    run = trained("cross-aspect")
    classes = json.loads((run / "classes.json").read_text())
    train = [s for a in ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l")
             for s in load_split(synth_root, splits_dir, a, "train")]
    assert classes == sorted({s.identity for s in train})  # one class per person, all four aspects
    best = run / "checkpoints" / "best.pt"
    across = evaluate(tmp_path / "across", synth_root, splits_dir, "--checkpoint", best,
                      "--query-aspect", "dorsal_r", "--gallery-aspect", "palmar_r")
    assert across["aspect"] == "dorsal_r->palmar_r" and across["protocol"] == "cross-aspect"
    assert_metrics_valid(across)
    joint = evaluate(tmp_path / "all", synth_root, splits_dir, "--checkpoint", best, "--aspect", "dorsal_r",
                     "--gallery-all")
    assert joint["protocol"] == "gallery-all"
    assert_metrics_valid(joint)


def test_cross_aspect_batches_balance_the_aspects(synth_root, splits_dir, tmp_path):
    config = load_config(CONFIGS / "vitb16-cross-aspect.yaml",
                         {"model.arch": "tiny-vit", "model.pretrained": "none", "model.image_size": 64,
                          "train.device": "cpu"})
    trainer = Trainer.for_run(config, RunFolder(tmp_path), {"data_root": str(synth_root), "splits": str(splits_dir)},
                              quiet=True)
    trainer.state.sampler.set_epoch(0)
    batches = list(trainer.state.sampler)
    assert batches
    for batch in batches:
        counts = {a: 0 for a in config.data.aspects}
        for index in batch:
            counts[trainer.state.data.train[index].aspect] += 1
        assert set(counts.values()) == {len(batch) // 4}, counts


def test_sequential_stages_chain_checkpoints(trained):
    run = trained("sequential")
    summary = json.loads((run / "stages.json").read_text())
    aspects = ["dorsal_r", "dorsal_l", "palmar_r", "palmar_l"]
    assert [s["aspects"] for s in summary] == [[a] for a in aspects]
    for index, aspect in enumerate(aspects, start=1):
        stage = run / f"stage_{index}"
        assert load_checkpoint(stage / "checkpoints" / "best.pt")["config"]["data"]["aspects"] == [aspect]
        init_from = json.loads((stage / "run.json").read_text())["init_from"]
        previous = run / f"stage_{index - 1}" / "checkpoints" / "best.pt"
        assert init_from == (str(previous) if index > 1 else None)


def test_a_sequential_stage_starts_from_the_previous_best(trained):
    run = trained("sequential")
    config = load_config(run / "config.yaml")
    invocation = json.loads((run / "stage_2" / "run.json").read_text())
    trainer = Trainer.for_run(stage_config(config, 1), RunFolder(run / "probe"), invocation, quiet=True)
    previous = load_checkpoint(run / "stage_1" / "checkpoints" / "best.pt")["model"]
    own = trainer.state.model.state_dict()
    backbone = [k for k in previous if k.startswith("backbone.")]
    assert backbone and all(torch.equal(own[k], previous[k]) for k in backbone)
    finished = load_checkpoint(run / "stage_2" / "checkpoints" / "best.pt")["model"]
    assert any(not torch.equal(finished[k], previous[k]) for k in backbone)  # and stage 2 trained on


def test_fusion_of_two_checkpoints_by_score_and_feature(trained, synth_root, splits_dir, tmp_path, monkeypatch):
    checkpoints = [trained(name) / "checkpoints" / "best.pt" for name in ("pcb", "attention")]
    args = [a for c in checkpoints for a in ("--checkpoint", c)] + ["--aspect", "dorsal_r"]
    by_score = evaluate(tmp_path / "score", synth_root, splits_dir, *args, "--fusion", "score")
    widths = []
    monkeypatch.setattr(evaluation, "distance_matrix",
                        lambda q, g, metric="cosine": widths.append(q.shape[1]) or distance_matrix(q, g, metric))
    by_feature = evaluate(tmp_path / "feature", synth_root, splits_dir, *args, "--fusion", "feature")
    assert by_score["protocol"] == "single-aspect+fusion-score"
    assert by_feature["protocol"] == "single-aspect+fusion-feature"
    assert set(widths) == {(TINY_EMBED + 6 * TINY_WIDTH) + (TINY_EMBED + 2 * TINY_WIDTH)}

    # Score fusion is the mean of the two models' cosine distances, computed here independently
    # (from the same stored pixels the evaluation reads).
    query = load_split(synth_root, splits_dir, "dorsal_r", "query_0")
    gallery = load_split(synth_root, splits_dir, "dorsal_r", "gallery_0")

    def features(encoder, samples):
        return encoder.encode(ImageDataset(samples, size=encoder.image_size).batch(range(len(samples))))

    encoders = [handclip.load_model(c) for c in checkpoints]
    dist = np.mean([pairwise_distance(features(e, query), features(e, gallery)) for e in encoders], axis=0)
    expected = evaluate_ranking(dist, [s.identity for s in query], [s.identity for s in gallery])
    for key in ("rank1", "mAP", "mINP"):
        assert by_score["splits"][0][key] == pytest.approx(expected[key], abs=1e-6), key
        # Unit features concatenated and renormalised: cosine of the concatenation = mean cosine.
        assert by_feature["splits"][0][key] == pytest.approx(expected[key], abs=1e-6), key


# ---- CLIP-ReID stage 1 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_setup(synth_root, splits_dir):
    """A tiny-vit model with its text tower, the dorsal_r train images and their labels."""
    config = load_config(CONFIGS / "vitb16-clipreid.yaml",
                         {"model.arch": "tiny-vit", "model.pretrained": "none", "model.image_size": 64,
                          "prompt.stage1_epochs": 12, "prompt.batch_size": 16, "prompt.lr": 3e-3,
                          "train.device": "cpu"})
    train = load_split(synth_root, splits_dir, "dorsal_r", "train")
    classes = sorted({s.identity for s in train})
    labels = torch.tensor([classes.index(s.identity) for s in train])
    torch.manual_seed(0)
    model = build_reid_model(config.model, num_classes=len(classes), keep_text=True)
    return config, model, ImageDataset(train, size=72), labels


def test_prompt_learning_lowers_its_loss_and_leaves_both_encoders_unchanged(prompt_setup):
    config, model, dataset, labels = prompt_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    features = image_features(model, dataset, range(len(labels)), torch.device("cpu"), batch_size=32)
    texts, losses = train_prompts(model.backbone, features, labels, model.num_classes, config, torch.device("cpu"))
    assert len(losses) == 12 and losses[-1] < 0.75 * losses[0], losses
    assert model.training  # the mode it was in
    after = model.state_dict()
    assert any(k.startswith("backbone.text.") for k in after) and any(k.startswith("backbone.visual.") for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert texts.shape == (model.num_classes, TINY_EMBED) and not texts.requires_grad
    assert torch.allclose(texts.norm(dim=1), torch.ones(model.num_classes), atol=1e-5)
    # Trained texts sit closer to their own identity's images than the images of other identities do.
    logits = image_to_text_logits(features, texts)
    own = logits[torch.arange(len(labels)), labels]
    assert own.mean() > logits.mean()

    # The trainer's entry point: the same features and prompts, so the same texts.
    assert torch.allclose(learn_identity_texts(model, dataset, labels, config, torch.device("cpu"), quiet=True),
                          texts, atol=1e-5)


def test_prompts_fill_the_template_with_learned_tokens(prompt_setup):
    config, model, _, _ = prompt_setup
    backbone = model.backbone
    learner = PromptLearner(backbone, num_classes=3, n_ctx=4, template="A photo of a {} hand.")
    words = "A photo of a X X X X hand."
    tokens = backbone.tokenizer([words])
    with torch.no_grad():
        # With every learned token set to the embedding of the word X, the prompt is that sentence.
        learner.class_context[:] = backbone.token_embedding(tokens[0, 5])
        learned = learner.text_features(backbone, torch.tensor([0, 2]))
        sentence = backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens.argmax(dim=-1))
    assert torch.allclose(learned, sentence.expand(2, -1), atol=1e-5)


@pytest.mark.parametrize("n_ctx, template, message", [
    (12, "A photo of a {} hand.", "more than the 16"),
    (4, "A photo of a hand.", "exactly one {}"),
    (4, "An X-ray of a {} hand.", "must not contain"),
])
def test_bad_prompt_template_is_a_user_error(prompt_setup, n_ctx, template, message):
    backbone = prompt_setup[1].backbone
    with pytest.raises(UserError, match="prompt.template") as error:
        PromptLearner(backbone, num_classes=3, n_ctx=n_ctx, template=template)
    assert message in str(error.value)


def test_image_to_text_logits_are_scaled_cosines():
    images, texts = torch.randn(5, 8) * 3, F.normalize(torch.randn(4, 8), dim=1)
    expected = LOGIT_SCALE * F.cosine_similarity(images[:, None], texts[None], dim=2)
    assert torch.allclose(image_to_text_logits(images, texts), expected, atol=1e-4)
