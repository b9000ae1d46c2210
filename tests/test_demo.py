"""The demo, reduced: the README's first command end to end on built-in data; and the pretrained
backbone it ships, loaded through the public ``--pretrained FILE`` path."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from handclip.cli import main
from handclip.data.images import RESAMPLE
from handclip.models.backbones import MODEL_CONFIGS, create_backbone
from handclip.weights import DEMO_BACKBONE, DEMO_BACKBONE_ARCH

ROOT = Path(__file__).resolve().parents[1]
# The features of one fixed synthetic photo, through the public --pretrained FILE path (handclip.load_model).
FEATURES_SCRIPT = """
import json
import numpy as np
from handclip.data.synth import make_person, render_photo
import handclip
from handclip.weights import DEMO_BACKBONE, DEMO_BACKBONE_ARCH

photo = render_photo(make_person(0, 0), "dorsal right", (160, 120), np.random.default_rng(0))
encoder = handclip.load_model(DEMO_BACKBONE_ARCH, pretrained=str(DEMO_BACKBONE))
print(json.dumps(encoder.encode([photo])[0].tolist()))
"""


def test_quick_demo_ranks_random_init_below_zero_shot_below_fine_tuned(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    keys = {"rank1", "rank5", "rank10", "mAP", "mINP", "num_queries"}
    untrained, zero_shot, trained = (summary[name] for name in ("untrained", "zero_shot", "trained"))
    assert all(keys <= set(result) for result in (untrained, zero_shot, trained))
    assert untrained["num_queries"] == zero_shot["num_queries"] == trained["num_queries"] > 0
    assert summary["protocols"]["single-aspect"]["trained"] == trained
    for metric in ("rank1", "mAP"):
        assert zero_shot[metric] > untrained[metric] + 0.07, metric
        assert trained[metric] > zero_shot[metric] + 0.10, metric
    published = summary["protocols"]["published"]  # the papers' protocol: harder, the same order
    for metric in ("rank1", "mAP_trapezoid"):
        assert published["untrained"][metric] + 0.03 < published["zero_shot"][metric] < published["trained"][metric] - 0.03

    html = (out / "report.html").read_text()
    results_table = html.split("<h2>Results</h2>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td>", results_table)
    models = ["random init", "pretrained, zero-shot", "fine-tuned"]
    assert rows == [(model, protocol) for protocol in ("single-aspect", "published") for model in models]
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert {"cmc.png", "untrained/chosen_queries.png", "zero_shot/chosen_queries.png",
            "trained/chosen_queries.png"} <= set(sources)
    assert any(s.startswith("run/plots/") for s in sources) and all((out / s).is_file() for s in sources)
    assert str(out / "report.html") in capsys.readouterr().out


def test_the_shipped_backbone_is_an_open_clip_image_tower_that_create_backbone_loads_unchanged():
    assert DEMO_BACKBONE.stat().st_size < 10e6  # a few MB
    tensors = load_file(DEMO_BACKBONE)
    assert tensors and all(key.startswith("visual.") for key in tensors)
    with safe_open(DEMO_BACKBONE, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["arch"] == DEMO_BACKBONE_ARCH and "not_clip" in metadata

    loaded = create_backbone(DEMO_BACKBONE_ARCH, str(DEMO_BACKBONE)).visual.state_dict()
    assert set(loaded) == {key.removeprefix("visual.") for key in tensors}
    assert all(torch.equal(loaded[key.removeprefix("visual.")], value) for key, value in tensors.items())
    assert not torch.equal(create_backbone(DEMO_BACKBONE_ARCH, "none").visual.conv1.weight, loaded["conv1.weight"])


def test_the_shipped_backbone_gives_the_same_features_in_fresh_processes_as_open_clip_computes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    runs = [subprocess.run([sys.executable, "-c", FEATURES_SCRIPT], capture_output=True, text=True, env=env,
                           cwd=tmp_path, check=True) for _ in range(2)]
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first == second  # bit for bit

    # Independently: open_clip's own model and CLIP preprocessing, the weights read straight from the file.
    from handclip.data.synth import make_person, render_photo

    open_clip.add_model_config(MODEL_CONFIGS)
    clip = open_clip.create_model(DEMO_BACKBONE_ARCH, pretrained=None).eval()
    clip.visual.load_state_dict({k.removeprefix("visual."): v for k, v in load_file(DEMO_BACKBONE).items()})
    side = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    photo = render_photo(make_person(0, 0), "dorsal right", (160, 120), np.random.default_rng(0))
    pixels = torch.from_numpy(np.asarray(photo.resize((side, side), RESAMPLE), dtype=np.float32) / 255)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))
    with torch.no_grad():
        expected = clip.encode_image(((pixels.permute(2, 0, 1) - mean) / std)[None], normalize=True)[0]
    assert torch.allclose(torch.tensor(first), expected, atol=1e-5)


def test_the_pretraining_script_writes_a_backbone_that_loads_through_pretrained(tmp_path):
    out = tmp_path / "backbone.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain_demo_backbone.py"), "--quick", "--out", str(out),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {out}" in run.stdout
    backbone = create_backbone(DEMO_BACKBONE_ARCH, str(out))
    written = load_file(out)
    assert all(torch.equal(backbone.visual.state_dict()[k.removeprefix("visual.")], v) for k, v in written.items())

    # the same --work again holds a run: one line, exit 2, the backbone written before untouched
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain_demo_backbone.py"), "--quick", "--out",
                            str(out), "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith(f"pretrain_demo_backbone: error: {tmp_path / 'work' / 'run'}")
    assert load_file(out).keys() == written.keys()
    assert all(torch.equal(load_file(out)[k], v) for k, v in written.items())
