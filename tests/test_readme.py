"""README.md: the research-script block runs as written, and the README links only inside the repo."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# README research script (run by tests/test_readme.py)"


def research_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    marked = [b for b in blocks if b.startswith(MARKER)]
    assert len(marked) == 1, f"expected one python block starting with {MARKER!r}"
    return marked[0]


def test_research_script_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes U.jsonl and optimizer.pt
    namespace: dict = {}
    exec(compile(research_block(), str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([8, 4, 15])" in out and "nats/token" in out
    res, r, s = namespace["res"], namespace["r"], namespace["s"]
    assert res.se > 0 and r.n == 8 and tuple(s.shape) == (2, 8)
    # the by-name reading gives the preconditioner of the live optimizer
    live = namespace["fp"].AdamPreconditioner.from_optimizer(namespace["optimizer"], namespace["params"])
    pre = namespace["pre"]
    assert all(bool((pre.denom[k] == live.denom[k]).all()) for k in live.denom)


def test_links_stay_inside_the_repository():
    root = README.parent
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text(encoding="utf-8")):
        if target.startswith("http"):
            continue
        path = (root / target).resolve()
        assert path.is_relative_to(root) and path.exists(), target
