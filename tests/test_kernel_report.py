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


# A grid-stride loop (0x0010..0x00c0) whose data work sits in a rolled inner loop
# behind a zero-trip guard -- the shape of aes_ctr_xor's round loop: the shortest
# path jumps over it, so counting the shortest path alone flatters the kernel.
ROUND_LOOP_LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
        /*0020*/               @P0 BRA `(.L_x_2) ;
.L_x_1:
        /*0030*/                   LDG.E.128 R8, desc[UR4][R10.64] ;
        /*0040*/                   LDS R4, [R5] ;
        /*0050*/                   LOP3.LUT R4, R4, R8, RZ, 0x3c, !PT ;
        /*0060*/                   LDS R6, [R7] ;
        /*0070*/                   LOP3.LUT R6, R6, R9, RZ, 0x3c, !PT ;
        /*0080*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0090*/                   LDG.E.128 R12, desc[UR4][R14.64] ;
        /*00a0*/                   LOP3.LUT R12, R12, R4, RZ, 0x3c, !PT ;
        /*00b0*/                   STG.E.128 desc[UR4][R16.64], R12 ;
        /*00c0*/               @!P2 BRA `(.L_x_0) ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0;
"""


def test_inner_loop_on_data_path_counts_its_trips():
    """A round loop behind a zero-trip guard is counted trips times, not skipped."""
    from gpucrypt.kernels._launch import InnerLoop

    kr = _load_report_module()
    instrs = kr.parse_sass(ROUND_LOOP_LISTING)
    # The plain shortest path (no declaration) skips the loop: LDG.64, BRA, LDG.128, LOP3, STG, back edge.
    assert kr.analyse_main_loop(instrs).hot_path == 6
    loop = kr.analyse_main_loop(instrs, (InnerLoop("rounds", trips=9, ops=("LDS", "LDG.E.128")),))
    (rounds,) = loop.inner_loops
    assert rounds.cycle == 6 and rounds.trips == 9  # 0x30 .. 0x80
    assert loop.path == 12  # 0x10, 0x20, the round body once (6), 0x90 .. 0xc0
    assert loop.hot_path == 12 + 8 * 6
    assert loop.inner_loops_on_hot_path == 0
    assert loop.hot_path_ops.count("LDS") == 18
    assert loop.hot_path_ops.count("LDG.E.128") == 10  # one round key per round + the data load


def test_inner_loop_declarations_are_checked():
    from gpucrypt.kernels._launch import InnerLoop

    kr = _load_report_module()
    instrs = kr.parse_sass(ROUND_LOOP_LISTING)
    with pytest.raises(kr.LoopDeclarationError, match="declares 0"):
        kr.analyse_main_loop(instrs, ())  # the loop must be declared, even as off the data path
    with pytest.raises(kr.LoopDeclarationError, match="declares 2"):
        kr.analyse_main_loop(instrs, (InnerLoop("a"), InnerLoop("b", trips=3)))
    with pytest.raises(kr.LoopDeclarationError, match="IMAD.WIDE"):
        kr.analyse_main_loop(instrs, (InnerLoop("rounds", trips=9, ops=("IMAD.WIDE",)),))
    # A byte loop declared off the data path stays off it (LISTING: the wide path is shorter).
    loop = kr.analyse_main_loop(kr.parse_sass(LISTING), (InnerLoop("byte path"),))
    assert loop.hot_path == 5 and loop.inner_loops_on_hot_path == 0


def test_loop_declared_off_path_but_unavoidable_is_flagged():
    """A do-while loop with no guard cannot be skipped: declaring it 0 trips is caught."""
    from gpucrypt.kernels._launch import InnerLoop

    kr = _load_report_module()
    unguarded = ROUND_LOOP_LISTING.replace("@P0 BRA `(.L_x_2)", "NOP")
    loop = kr.analyse_main_loop(kr.parse_sass(unguarded), (InnerLoop("rounds"),))
    assert loop.inner_loops_on_hot_path == 1


# A kernel with no grid-stride loop (one unit per thread: ghash_blocks): an early exit, a
# loop that does the data work, a store, the exit.
ONE_PASS_LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 EXIT ;
.L_x_1:
        /*0020*/                   LDG.E.128 R8, desc[UR4][R10.64] ;
        /*0030*/                   LDS R4, [R5] ;
        /*0040*/                   LOP3.LUT R4, R4, R8, RZ, 0x3c, !PT ;
        /*0050*/               @P1 BRA `(.L_x_1) ;
        /*0060*/                   STG.E.128 desc[UR4][R16.64], R12 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_one_pass_kernel_counts_the_whole_kernel():
    """grid_stride=False: the pass runs from the first instruction to the last EXIT and every
    loop is an inner loop (in grid-stride mode the data loop would pass for the main loop)."""
    from gpucrypt.kernels._launch import InnerLoop

    kr = _load_report_module()
    instrs = kr.parse_sass(ONE_PASS_LISTING)
    assert kr.analyse_main_loop(instrs).loop_body == 4  # mistaken for a grid-stride loop
    loop = kr.analyse_main_loop(instrs, (InnerLoop("blocks", trips=4, ops=("LDS",)),), grid_stride=False)
    assert loop.loop_body == 8 and loop.path == 8  # S2R, EXIT?, the body once (4), STG, EXIT
    assert loop.hot_path == 8 + 3 * 4
    with pytest.raises(kr.LoopDeclarationError, match="declares 0"):
        kr.analyse_main_loop(instrs, (), grid_stride=False)


def test_every_kernel_declares_its_inner_loops():
    """Each KERNEL_REPORT entry says which inner loops carry data (at least none, explicitly)."""
    import importlib

    for name in ("chacha20", "aes", "poly1305", "ghash"):
        mod = importlib.import_module(f"gpucrypt.kernels.{name}")
        for entry in mod.KERNEL_REPORT:
            assert entry.inner_loops, f"{name}.{entry.name}: no inner loops declared"
            assert all(loop.trips >= 0 for loop in entry.inner_loops)
    variants = {e.variant: e for e in importlib.import_module("gpucrypt.kernels.aes").KERNEL_REPORT}
    assert [lp.trips for lp in variants["AES-128"].inner_loops if lp.trips] == [9]
    assert [lp.trips for lp in variants["AES-256"].inner_loops if lp.trips] == [13]


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
