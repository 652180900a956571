"""`salon eval personalization` end to end on the shipped fake that ignores style settings:
what the model wrote fails them, what the user got (after enforcement) follows them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_style_suite_scores_the_model_and_the_enforced_answers(tmp_path: Path) -> None:
    out = tmp_path / "style.md"
    env = {**os.environ, "SALON_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "salon"),
            "eval",
            "personalization",
            "--suite",
            "style",
            "--model",
            "fake:styled",
            "--depths",
            "0,4",
            "--per-setting",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = out.read_text()
    overall = re.search(r"\| all \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \|", report)
    assert overall is not None, report
    constraints, raw, enforced = int(overall[1]), float(overall[2]), float(overall[3])
    assert constraints >= 28  # 14 settings, at least one rule each, at two depths
    # The fake writes emoji, a heading and a list in English: settings against those fail
    # raw and are repaired; "in French" and the word limit need revisions it cannot satisfy.
    assert raw < 70.0 < enforced
    for setting in ("emoji-less", "lists-less", "nickname", "combined"):
        assert re.search(rf"\| {setting} \| \d+% \| 100% \|", report), setting
    assert re.search(r"\| french \| 0% \| 0% \| [1-9]", report)  # revised, still English
