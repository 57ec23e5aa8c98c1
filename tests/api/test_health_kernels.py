"""`amber serve` tells which kernels it chose for each loaded model: in /health and in its log."""
from __future__ import annotations

import httpx


def test_health_and_the_log_show_the_kernels_chosen(bare_server):
    """On the second server (conftest.py), whose default is the tiny model in int4, logging at info."""
    kernels = httpx.get(f"{bare_server.url}/health").json()["kernels"]["tiny4"]
    # the tiny model: int4 projections (64 wide) and its int8 LM head, each with a choice
    assert any(shape.startswith("int4/g32") for shape in kernels)
    assert any(shape.startswith("int8/x1 49152x64") for shape in kernels)
    dense = ("bf16", "fp32", "bf16 made per product", "fp32 made per product")
    assert all(path == "fused" or path.split(",")[-1] in dense for path in kernels.values())
    log = (bare_server.home / "server.log").read_text()
    line = next(line for line in log.splitlines() if "model tiny4 kernels" in line)
    assert "int4/g32" in line and "threads" in line
