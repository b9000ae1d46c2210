"""A model's features never depend on how it was loaded.

For each weight format (an OpenAI TorchScript archive, an open_clip state dict, .safetensors) a
tiny CLIP is saved in that format and a run "trains" from it with lr 0 and no neck: an identity.
Every way of loading that run (handclip.load_model, evaluate --checkpoint, the trainer's own
encoder) must encode what the zero-shot encoder of the same weights encodes, and the validation
metrics in history.csv must equal an independent evaluation of the same images.
"""
import csv
import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

import handclip
from handclip.cli import main
from handclip.config import load_config
from handclip.data.manifests import load_split
from handclip.engine.checkpoint import load_checkpoint
from handclip.engine.evaluation import EvaluateOptions, build_encoders
from handclip.engine.run import RunFolder
from handclip.engine.trainer import Trainer
from handclip.errors import UserError
from handclip.metrics import evaluate_ranking, pairwise_distance
from handclip.models import backbones  # noqa: F401  (registers tiny-vit with open_clip)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIN_COSINE = 0.9999
# (format, model.quick_gelu, what it resolves to): an archive says it is OpenAI's (QuickGELU);
# a state dict cannot say, so auto means GELU; OpenAI weights in .safetensors need true.
FORMATS = [("torchscript", "auto", True), ("state_dict", "auto", False), ("safetensors", True, True)]
IDS = [f[0] for f in FORMATS]


def tiny_clip() -> torch.nn.Module:
    """A tiny CLIP in OpenAI's layout (text keys at the top level, ``visual.*``) whose MLPs dominate
    the residual stream: with a random init's near-linear MLPs, GELU and QuickGELU features agree to
    1e-5 and the QuickGELU checks below could not fail."""
    torch.manual_seed(2)
    clip = open_clip.create_model("tiny-vit", force_quick_gelu=True).eval()
    with torch.no_grad():
        for block in clip.visual.transformer.resblocks:
            block.mlp.c_proj.weight.mul_(100)
    return clip


def save_weights(clip: torch.nn.Module, kind: str, folder: Path) -> Path:
    if kind == "torchscript":
        path = folder / "tiny-openai.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's files are not
            torch.jit.script(clip).save(str(path))
    elif kind == "state_dict":
        path = folder / "tiny-open_clip.pt"
        torch.save(clip.state_dict(), path)
    else:
        from safetensors.torch import save_file

        path = folder / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def identity_run(synth_root, splits_dir, tmp_path_factory):
    """``identity_run(kind)`` → (weights file, quick_gelu setting, trainer, best.pt), trained once."""
    runs = {}

    def run(kind: str):
        if kind not in runs:
            folder = tmp_path_factory.mktemp(kind)
            setting = {f[0]: f[1] for f in FORMATS}[kind]
            weights = save_weights(tiny_clip(), kind, folder)
            config = load_config(CONFIGS / "tiny-cpu.yaml", {
                "model.arch": "tiny-vit", "model.pretrained": str(weights), "model.quick_gelu": setting,
                "model.neck": "none", "model.embedding": "proj", "model.head": "global",
                "optim.lr": 0.0, "train.epochs": 1, "train.device": "cpu"})
            trainer = Trainer.for_run(config, RunFolder(folder / "run"),
                                      {"data_root": str(synth_root), "splits": str(splits_dir)}, quiet=True)
            trainer.fit()
            runs[kind] = weights, setting, trainer, folder / "run" / "checkpoints" / "best.pt"
        return runs[kind]

    return run


def query_paths(synth_root, splits_dir) -> list[Path]:
    return [s.path for s in load_split(synth_root, splits_dir, "dorsal_r", "query_0")[:8]]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


@pytest.mark.parametrize("kind, setting, quick", FORMATS, ids=IDS)
def test_every_load_path_encodes_what_the_zero_shot_encoder_encodes(kind, setting, quick, identity_run, synth_root,
                                                                     splits_dir, tmp_path):
    weights, setting, trainer, best = identity_run(kind)
    paths = query_paths(synth_root, splits_dir)
    zero_shot = handclip.load_model("tiny-vit", pretrained=str(weights), quick_gelu=setting)
    expected = zero_shot.encode(paths)
    options = EvaluateOptions(data_root=synth_root, splits=splits_dir, out=tmp_path, checkpoints=[best], device="cpu")
    loaded = {"load_model": handclip.load_model(best), "evaluate": build_encoders(options)[0],
              "trainer": trainer.state.encoder}
    for name, encoder in loaded.items():
        features = encoder.encode(paths)
        assert torch.allclose(features.norm(dim=1), torch.ones(len(paths)), atol=1e-5), name
        assert cosines(features, expected).min() >= MIN_COSINE, name

    # The run really used the weights' activation, and the other one would have been caught.
    assert zero_shot.trained_subjects == {} and zero_shot.model.backbone.quick_gelu is quick
    rebuilt = loaded["load_model"].model
    assert any(isinstance(m, QuickGELU) for m in rebuilt.modules()) is quick
    other = handclip.load_model("tiny-vit", pretrained=str(weights), quick_gelu=not quick)
    assert cosines(other.encode(paths), expected).min() < MIN_COSINE


@pytest.mark.parametrize("kind, setting, quick", FORMATS, ids=IDS)
def test_the_checkpoint_records_every_architecture_choice(kind, setting, quick, identity_run):
    _, _, trainer, best = identity_run(kind)
    payload = load_checkpoint(best)
    assert payload["config"]["model"]["quick_gelu"] is quick  # "auto" resolved
    backbone = trainer.state.model.backbone
    assert payload["architecture"] == {"quick_gelu": quick, "image_size": 112,
                                       "preprocess": {"mean": list(backbone.mean), "std": list(backbone.std)}}
    run_config = load_config(best.parent.parent / "config.yaml")
    assert run_config.model.quick_gelu is quick


@pytest.mark.parametrize("kind, setting, quick", FORMATS, ids=IDS)
def test_validation_metrics_equal_an_independent_evaluation(kind, setting, quick, identity_run, synth_root,
                                                            splits_dir):
    _, _, _, best = identity_run(kind)
    with open(best.parent.parent / "history.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    val = load_split(synth_root, splits_dir, "dorsal_r", "val")
    train = load_split(synth_root, splits_dir, "dorsal_r", "train")
    encoder = handclip.load_model(best)
    dist = pairwise_distance(encoder.encode([s.path for s in val]), encoder.encode([s.path for s in train]))
    expected = evaluate_ranking(dist, [s.identity for s in val], [s.identity for s in train])
    assert float(last["val_rank1"]) == pytest.approx(expected["rank1"], abs=1e-9)
    assert float(last["val_mAP"]) == pytest.approx(expected["mAP"], abs=1e-9)


@pytest.mark.parametrize("kind, setting, quick", FORMATS, ids=IDS)
def test_evaluate_checkpoint_equals_evaluate_zero_shot(kind, setting, quick, identity_run, synth_root, splits_dir,
                                                       tmp_path):
    weights, setting, _, best = identity_run(kind)
    common = ["evaluate", "--data", str(synth_root), "--splits", str(splits_dir), "--aspect", "dorsal_r",
              "--num-splits", "1", "--device", "cpu", "--quiet"]
    flag = "auto" if setting == "auto" else str(setting).lower()
    assert main([*common, "--out", str(tmp_path / "ckpt"), "--checkpoint", str(best)]) == 0
    assert main([*common, "--out", str(tmp_path / "zero"), "--zero-shot", "--arch", "tiny-vit",
                 "--pretrained", str(weights), "--quick-gelu", flag]) == 0
    fine_tuned, zero_shot = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("ckpt", "zero"))
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert fine_tuned["splits"][0][key] == pytest.approx(zero_shot["splits"][0][key], abs=1e-9), key


def test_older_checkpoint_without_records_rebuilds_from_its_archive(identity_run, synth_root, splits_dir, tmp_path):
    """A checkpoint of an older handclip records neither the architecture nor a resolved
    quick_gelu; its config's pretrained archive (still on disk) implies QuickGELU."""
    weights, _, _, best = identity_run("torchscript")
    payload = load_checkpoint(best)
    del payload["architecture"], payload["trained_subjects"], payload["config"]["model"]["quick_gelu"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    paths = query_paths(synth_root, splits_dir)
    encoder = handclip.load_model(old)
    assert encoder.model.backbone.quick_gelu and encoder.trained_subjects is None
    expected = handclip.load_model("tiny-vit", pretrained=str(weights)).encode(paths)
    assert cosines(encoder.encode(paths), expected).min() >= MIN_COSINE


def test_a_state_dict_loaded_with_auto_says_once_that_openai_weights_need_quick_gelu(tmp_path, capsys):
    weights = save_weights(tiny_clip(), "state_dict", tmp_path)
    for _ in range(2):
        assert not handclip.load_model("tiny-vit", pretrained=str(weights)).model.backbone.quick_gelu
    err = capsys.readouterr().err
    assert err.count("model.quick_gelu=true") == 1 and str(weights) in err
    handclip.load_model("tiny-vit", pretrained=str(weights), quick_gelu=True)
    assert capsys.readouterr().err == ""  # an explicit choice needs no note


def test_quick_gelu_false_on_a_quickgelu_arch_is_a_user_error():
    with pytest.raises(UserError, match="ViT-B-16-quickgelu always uses QuickGELU"):
        handclip.load_model("ViT-B-16-quickgelu", pretrained="none", quick_gelu=False)


def test_load_model_names_what_it_cannot_load(tmp_path, identity_run):
    with pytest.raises(UserError, match="neither a checkpoint file nor a known architecture"):
        handclip.load_model(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="neither a checkpoint file nor a known architecture"):
        handclip.load_model("ViT-B-61")
    _, _, _, best = identity_run("state_dict")
    with pytest.raises(UserError, match="holds its own weights"):
        handclip.load_model(best, pretrained="openai")
