"""The demo's report says only what its rows show, and its GIF plays at a visible speed."""

import torch
from PIL import Image

from tmd.eval.report import FRAME_MS, findings, write_report


def row(method, outer, inner, total, latency, teacher_ms=100):
    return {
        "method": method,
        "outer_steps": outer,
        "inner_steps": inner,
        "effective_nfe": 1.0,
        "latency_ms": latency,
        "speedup_vs_teacher": teacher_ms / latency,
        "total": total,
        "quality": total,
        "semantic": total,
        "frechet": total,
        "diversity": total,
    }


def test_report_describes_the_rows_it_has_and_the_gif_has_a_frame_delay(tmp_path):
    rows = [row("teacher", 50, None, 0.9, 100), row("dmd2", 2, None, 0.8, 5), row("tmd", 2, 4, 0.82, 6)]
    report = {"preset": "micro", "guidance": 3.5, "shift": 3.0, "videos_scored": 3, "rows": rows, "timings_s": {"tmd": 1.0}}
    samples = {name: torch.rand(2, 3, 4, 8, 8) * 2 - 1 for name in ("teacher 50", "tmd 2x4")}
    write_report(tmp_path, report, samples, ["a", "b"])
    text = (tmp_path / "report.md").read_text()
    assert "`tmd_stage1`" not in text and "`linvideo_tmd`" not in text
    rows.append(row("linvideo_tmd", 2, 4, 0.8, 5))
    write_report(tmp_path, report, samples, ["a", "b"])
    assert "`linvideo_tmd` rows are TMD" in (tmp_path / "report.md").read_text()

    gif = Image.open(tmp_path / "samples.gif")
    assert gif.n_frames == 4 and FRAME_MS == 250 and gif.info["duration"] == FRAME_MS


def test_findings_state_the_target_honestly():
    rows = [
        row("teacher", 50, None, 0.90, 1000, teacher_ms=1000),
        row("dmd2", 2, None, 0.80, 40, teacher_ms=1000),
        row("tmd", 2, 4, 0.89, 45, teacher_ms=1000),
    ]
    assert findings(rows)[-1].endswith("met.")
    rows[-1]["total"] = 0.7
    assert "NOT met" in findings(rows)[-1] and "below DMD2 2-step" in findings(rows)[1]
