"""benchmarks/kernel_report.py: SASS analysis on a synthetic listing, and one real compile (slow)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_report.py"


def _load_report_module():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# A grid-stride loop (0x0010..0x0090) with a wide fast path and a byte path that
# loops, as nvdisasm writes it (labels) -- the shape of chacha20_xor.
LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0030*/                   LDG.E.U8 R4, desc[UR4][R4.64] ;
        /*0040*/                   STG.E.U8 desc[UR4][R6.64], R4 ;
        /*0050*/               @P1 BRA `(.L_x_2) ;
        /*0060*/                   BRA `(.L_x_3) ;
.L_x_1:
        /*0070*/                   LDG.E.128 R8, desc[UR4][R4.64] ;
        /*0080*/                   STG.E.128 desc[UR4][R6.64], R8 ;
.L_x_3:
        /*0090*/               @!P2 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_listing_analysis():
    kr = _load_report_module()
    instrs = kr.parse_sass(LISTING)
    assert len(instrs) == 12
    assert instrs[2].target == 0x70 and instrs[5].target == 0x30 and instrs[9].target == 0x10
    loop = kr.analyse_main_loop(instrs)
    assert loop.loop_found
    assert loop.loop_body == 9  # 0x10 .. 0x90
    assert loop.hot_path == 5  # LDG.64, BRA, LDG.128, STG.128, back edge
    assert loop.inner_loops_in_body == 1 and loop.inner_loops_on_hot_path == 0
    assert kr._is_wide(kr._width_counts(loop.hot_path_ops, "LDG")) is True
    assert kr._is_wide({"LDG.E.U8": 1, "LDG.E.128": 1}) is False


@pytest.mark.slow
def test_report_compiles_chacha20(tmp_path):
    """Compile chacha20_xor for sm_90 without a GPU and check the measured fields."""
    kr = _load_report_module()
    missing = [t for t in ("ptxas", "nvdisasm") if kr.find_tool(t) is None]
    if missing:
        pytest.skip(f"CUDA tools not found: {missing} (pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--only", "chacha20", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.exists(), run.stdout + run.stderr
    (res,) = json.loads(out.read_text())["results"]
    assert res["error"] is None, res["error"]
    assert res["registers"] > 0
    assert res["spill_store_bytes"] == 0 and res["spill_load_bytes"] == 0 and res["ldl_stl_instructions"] == 0
    assert res["wide_global_loads"] and res["wide_global_stores"]
    assert res["instructions_per_byte"] <= 17.0
    assert res["verdict"] == "PASS" and run.returncode == 0
