"""``handclip export``: onnxruntime gives ``load_model().encode``'s features for every head, from uint8
images, at any batch size; the metadata is true; bad input exits 2 and leaves earlier files alone."""
import hashlib
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import handclip
from handclip.cli import main
from handclip.config import config_from_dict
from handclip.engine.checkpoint import save_checkpoint
from handclip.models.reid import build_reid_model


def make_checkpoint(path, arch: str, head: str):
    """A random-init checkpoint whose every branch matters: attention residuals switched on and
    BNNeck statistics away from their (0, 1) start."""
    torch.manual_seed(0)
    config = config_from_dict({"model": {"arch": arch, "pretrained": "none", "head": head, "parts": 2,
                                         "neck": "bnneck"}})
    model = build_reid_model(config.model, num_classes=3)
    for name, tensor in model.state_dict().items():
        if name.endswith("gamma"):
            tensor.fill_(0.5)
        elif name.startswith("necks.") and name.endswith("running_mean"):
            tensor.normal_(0, 0.1)
        elif name.startswith("necks.") and name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
    save_checkpoint(path, model=model, config=config, class_names=["a", "b", "c"], epoch=0)
    return path


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("head", ["global", "pcb", "attention"])
def test_onnxruntime_features_equal_encode(arch, head, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "model.pt", arch, head)
    out = tmp_path / "export" / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    encoder = handclip.load_model(checkpoint)
    size = encoder.image_size

    metadata = json.loads((tmp_path / "export" / "model.onnx.json").read_text())
    assert metadata["input_size"] == size and metadata["feature_size"] == encoder.dim
    assert metadata["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert metadata["handclip_version"] == handclip.__version__
    graph = onnx.load(str(out))
    assert metadata["opset"] == next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    embedded = {entry.key: entry.value for entry in graph.metadata_props}
    assert embedded["handclip.checkpoint_sha256"] == metadata["checkpoint_sha256"]
    assert embedded["handclip.input_size"] == str(size)

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert graph_input.type == "tensor(uint8)" and graph_input.shape[1:] == [3, size, size]
    assert isinstance(graph_input.shape[0], str)  # the batch is dynamic
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        images = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
        (features,) = session.run([graph_output.name], {graph_input.name: images})
        expected = encoder.encode(torch.from_numpy(images)).numpy()
        assert features.shape == expected.shape == (batch, encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
        assert (features * expected).sum(axis=1).min() >= 0.9999


@pytest.mark.parametrize("case", ["not-a-checkpoint", "missing", "out-is-a-folder"])
def test_bad_input_exits_2_with_one_line_and_keeps_earlier_files(case, tmp_path, capsys):
    checkpoint, out = tmp_path / "model.pt", tmp_path / "model.onnx"
    if case == "not-a-checkpoint":
        checkpoint.write_text("not a model")
    elif case == "out-is-a-folder":
        make_checkpoint(checkpoint, "tiny-rn", "global")
        out = tmp_path / "folder"
        out.mkdir()
    if case != "out-is-a-folder":
        out.write_bytes(b"an earlier export")
        (tmp_path / "model.onnx.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    err = capsys.readouterr().err
    expected = "folder" if case == "out-is-a-folder" else "model.pt"
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
