"""No subject is ever both trained on and tested.

The synthetic set is re-labelled so that, as in the real 11k set, two subjects (1040, 1045) fall
between the aspects' thresholds: train subjects of dorsal_r (<= 1050) and test subjects of dorsal_l
(> 1037). A sequential run must not train on them; checkpoints record their subjects through stages
and --init-from; evaluate refuses to test a model on people it was trained on. Two other subjects
lose one aspect's photos, so that each of the two stages trains someone the other does not.
"""
import json
from pathlib import Path

import pytest
import torch

from handclip.cli import main
from handclip.data.manifests import Sample, load_split
from handclip.data.subjects import overlapping_subjects, subject_id
from handclip.engine.checkpoint import load_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BETWEEN = {"0000973": "0001040", "0000908": "0001045"}  # synthetic train subjects → ids 1038-1050
ONE_DORSAL = {"0000000": "dorsal right", "0000064": "dorsal left"}  # subject → the aspect it loses
TINY = ["--set", "model.arch=tiny-vit", "--set", "model.pretrained=none", "--set", "model.image_size=64",
        "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--quiet"]
TWO_STAGES = "stages=[{data: {aspects: [dorsal_r]}}, {data: {aspects: [dorsal_l]}}]"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straddling(synth_root, tmp_path_factory):
    """(data root, splits) of the synthetic photos with two subjects re-labelled 1040 and 1045."""
    from handclip.data.prepare import prepare_11k

    root = tmp_path_factory.mktemp("straddling")
    (root / "Hands").symlink_to(synth_root / "Hands")
    rows = [line.split(",") for line in (synth_root / "HandInfo.csv").read_text().splitlines()]
    assert set(BETWEEN) | set(ONE_DORSAL) <= {row[0] for row in rows}
    kept = [[BETWEEN.get(row[0], row[0]), *row[1:]] for row in rows if ONE_DORSAL.get(row[0]) != row[6]]
    (root / "HandInfo.csv").write_text("".join(",".join(row) + "\n" for row in kept))
    prepare_11k(root=root, out=root / "splits", seed=0, num_splits=2)
    return root, root / "splits"


def subjects(data, aspect: str, *names: str) -> set[str]:
    root, splits = data
    return {subject_id(s.identity) for name in names for s in load_split(root, splits, aspect, name)}


def trained(checkpoint: Path) -> set[str]:
    return set(load_checkpoint(checkpoint)["trained_subjects"]["11k"])


def train(data, out: Path, *args) -> Path:
    root, splits = data
    code = main(["train", "--config", str(CONFIGS / "vitb16-sequential.yaml"), "--data", str(root),
                 "--splits", str(splits), "--out", str(out), *TINY, *map(str, args)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(straddling, tmp_path_factory):
    """A two-stage sequential run (dorsal_r, then dorsal_l), and a palmar_r run --init-from its end."""
    root = tmp_path_factory.mktemp("overlap-runs")
    sequential = train(straddling, root / "sequential", "--set", TWO_STAGES)
    best = sequential / "stage_2" / "checkpoints" / "best.pt"
    follow_up = train(straddling, root / "follow-up", "--set", "stages=[]", "--aspect", "palmar_r", "--init-from", best)
    return sequential, follow_up / "checkpoints" / "best.pt"


def evaluate(data, out: Path, *args) -> int:
    root, splits = data
    return main(["evaluate", "--data", str(root), "--splits", str(splits), "--out", str(out), "--device", "cpu",
                 "--num-splits", "1", "--quiet", *map(str, args)])


def test_a_sequential_run_never_trains_on_a_subject_any_stage_tests(straddling, runs):
    sequential, _ = runs
    tested = subjects(straddling, "dorsal_r", "test") | subjects(straddling, "dorsal_l", "test")
    assert {"1040", "1045"} <= subjects(straddling, "dorsal_r", "train", "val") & tested  # the leak to avoid
    for stage in ("stage_1", "stage_2"):
        classes = {subject_id(c) for c in json.loads((sequential / stage / "classes.json").read_text())}
        assert classes and not classes & tested, stage
        assert not trained(sequential / stage / "checkpoints" / "best.pt") & tested, stage


def test_checkpoint_records_accumulate_through_stages_and_init_from(straddling, runs):
    sequential, follow_up = runs
    tested = subjects(straddling, "dorsal_r", "test") | subjects(straddling, "dorsal_l", "test")
    stage_1 = subjects(straddling, "dorsal_r", "train", "val") - tested
    stage_2 = subjects(straddling, "dorsal_l", "train", "val") - tested
    assert stage_1 - stage_2 == {"64"} and stage_2 - stage_1 == {"0"}  # each stage has someone of its own
    assert trained(sequential / "stage_1" / "checkpoints" / "best.pt") == stage_1
    assert trained(sequential / "stage_2" / "checkpoints" / "best.pt") == stage_1 | stage_2
    palmar_r = subjects(straddling, "palmar_r", "train", "val")
    assert {"1040", "1045"} <= palmar_r  # a run of palmar_r alone trains on them
    assert trained(follow_up) == stage_1 | stage_2 | palmar_r
    assert load_checkpoint(follow_up)["trained_subjects"].keys() == {"11k"}


def test_evaluate_refuses_a_model_trained_on_its_test_subjects(straddling, runs, tmp_path, capsys):
    sequential, follow_up = runs
    clean = sequential / "stage_2" / "checkpoints" / "best.pt"
    assert evaluate(straddling, tmp_path / "clean", "--checkpoint", clean, "--aspect", "dorsal_l") == 0
    assert "subject_overlap" not in json.loads((tmp_path / "clean" / "results.json").read_text())
    capsys.readouterr()

    assert evaluate(straddling, tmp_path / "refused", "--checkpoint", follow_up, "--aspect", "dorsal_l") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(follow_up) in err and "2 test subject(s) of dorsal_l (11k 1040, 11k 1045)" in err
    assert "--allow-overlap" in err and not (tmp_path / "refused").exists()

    fused = ["--checkpoint", clean, "--checkpoint", follow_up, "--aspect", "dorsal_l"]
    assert evaluate(straddling, tmp_path / "fused", *fused) == 2
    err = capsys.readouterr().err
    assert str(follow_up) in err and str(clean) not in err

    assert evaluate(straddling, tmp_path / "allowed", *fused, "--allow-overlap") == 0
    result = json.loads((tmp_path / "allowed" / "results.json").read_text())
    assert result["subject_overlap"] == {"allowed": True, "subjects": 2}


def test_other_aspects_in_the_gallery_all_are_distractors_not_test_subjects(straddling, runs, tmp_path):
    """palmar_r's gallery_all holds 1040's dorsal-left and 1045's palmar-left images, as other
    identities: the published protocol itself pairs a palmar_r model (trained on 1040) with them."""
    _, follow_up = runs
    root, splits = straddling
    distractors = {subject_id(s.identity) for s in load_split(root, splits, "palmar_r", "gallery_0_all")
                   if s.aspect != "palmar_r"}
    assert {"1040", "1045"} <= distractors
    assert evaluate(straddling, tmp_path, "--checkpoint", follow_up, "--aspect", "palmar_r", "--gallery-all") == 0
    assert "subject_overlap" not in json.loads((tmp_path / "results.json").read_text())


def test_a_checkpoint_without_records_warns_once_and_proceeds(straddling, runs, tmp_path, capsys):
    sequential, _ = runs
    payload = load_checkpoint(sequential / "stage_1" / "checkpoints" / "best.pt")
    del payload["trained_subjects"]  # as an older handclip wrote it
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert evaluate(straddling, tmp_path / "eval", "--checkpoint", old, "--all-aspects") == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and str(old) in err and "Traceback" not in err
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["subject_overlap"] for r in result["aspects"]] == [{"unchecked": [str(old)]}] * 4

    follow_up = train(straddling, tmp_path / "follow-up", "--set", "stages=[]", "--aspect", "dorsal_r",
                      "--init-from", old)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and str(old) in err
    assert trained(follow_up / "checkpoints" / "best.pt") == subjects(straddling, "dorsal_r", "train", "val")


def test_zero_shot_models_have_no_records_to_check(straddling, tmp_path, capsys):
    args = ["--zero-shot", "--arch", "tiny-vit", "--pretrained", "none", "--aspect", "dorsal_l"]
    assert evaluate(straddling, tmp_path, *args) == 0
    assert "warning" not in capsys.readouterr().err
    assert "subject_overlap" not in json.loads((tmp_path / "results.json").read_text())


def test_subjects_are_told_apart_per_dataset():
    record = {"11k": ["1040"]}
    eleven_k = Sample("Hands/a.jpg", "0001040", "dorsal_l", Path("a.jpg"))
    hd = Sample("Original Images/1-501/1040_1.jpg", "1040", "hd", Path("b.jpg"))
    assert overlapping_subjects(record, [eleven_k, hd]) == [("11k", "1040")]
    assert overlapping_subjects({"hd": ["1040"]}, [eleven_k]) == []
