"""A reduced `handclip demo`: the README's main command, end to end on built-in data."""
import json
import re

from handclip.cli import main


def test_quick_demo_learns_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    keys = {"rank1", "rank5", "rank10", "mAP", "mINP", "num_queries"}
    assert keys <= set(summary["untrained"]) and keys <= set(summary["trained"])
    assert summary["untrained"]["num_queries"] == summary["trained"]["num_queries"] > 0
    assert summary["trained"]["mAP"] > summary["untrained"]["mAP"] + 0.1
    assert summary["trained"]["rank1"] > summary["untrained"]["rank1"] + 0.1
    html = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert "trained/worst_queries.png" in sources and any(s.startswith("run/plots/") for s in sources)
    assert all((out / s).is_file() for s in sources)
    assert str(out / "report.html") in capsys.readouterr().out
