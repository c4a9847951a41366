"""The README's five-minute walkthrough, run as written: its first bash block starts
`promptstore serve`, its second one is the curl session. Only the port and the demo folder
are swapped for free ones; everything else is the README's own text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from procs import free_port, settings_env, started

README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Five-minute walkthrough", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = walkthrough_blocks()
    assert len(blocks) == 2, "expected a serve block and a client block"
    demo = tmp_path / "demo"
    port = str(free_port())

    def adapt(block: str) -> str:
        assert "8000" in block and "/tmp/promptstore-demo" in block
        return block.replace("/tmp/promptstore-demo", str(demo)).replace("8000", port)

    env = settings_env(None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the active venv
    with started(["bash", "-e", "-c", adapt(blocks[0])], env=env, cwd=tmp_path, name="serve", raw=True) as serve:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert serve.proc.poll() is None and time.monotonic() < deadline, serve.tail()
            time.sleep(0.2)
        run = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", adapt(blocks[1])],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, f"{out}\n{run.stderr}"
    assert '"weights":"random"' in out
    assert '"name":"demo-2"' in out and '"api_key":"' in out
    assert re.search(r"^ready 1\.0", out, re.M), out
    assert out.count('"predictions"') == 2
    assert "'method': 'coop'" in out and "'version': '1'" in out
    assert "\n204\n" in out and out.rstrip().endswith("404")
    assert (demo / "colours.zip").is_file() and (demo / "colours.safetensors").is_file()
