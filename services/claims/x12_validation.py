"""X12 validation with pyx12 (its Python API: a bool, and the 999 it writes), maps kept loaded.

pyx12's ``x12valid`` command exits 1 even on success (REFERENCE.md), so its API is used.
``pyx12.x12n_document.x12n_document`` parses its XML maps (the control map, the map index and
the 837 map) on **every** call, ≈0.45 s, which made drafting one claim cost half a second.
:func:`validate_x12` runs the same walk as ``x12n_document`` (pyx12 4.0.0, BSD licence; only
its 999 output is kept) with the maps loaded once per process: :func:`_map` and
:func:`_map_index` are cached. Sharing them is safe because a walk never writes to a map — the
loop and segment counts live in the ``walk_tree`` made per call (``map_if``'s own
``cur_count`` setters are not called anywhere in pyx12 4.0.0; a test validates interleaved
valid and broken interchanges to keep that true).

pyx12 logs each error it finds, with the segment's text (PHI), on the ``pyx12`` logger: it is
capped at CRITICAL here, and the errors are read from the 999's IK3/IK4 codes instead, which
carry segment ids and positions, never values.
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass

import pyx12.error_999
import pyx12.error_handler
import pyx12.errors
import pyx12.map_if
import pyx12.map_index
import pyx12.params
import pyx12.x12file
from pyx12.map_if._segment import apply_segment_errors
from pyx12.map_walker import apply_walk_errors, walk_tree


@dataclass(frozen=True, slots=True)
class X12Result:
    """pyx12's verdict on an interchange, its 999, and the error lines of that 999."""

    valid: bool
    ack: str
    errors: tuple[str, ...]


@functools.cache
def _params() -> pyx12.params.ParamsBase:
    return pyx12.params.params()


@functools.cache
def _map(name: str) -> pyx12.map_if.map_if:
    """A pyx12 map, parsed once per process (read-only during walks: module docstring)."""
    return pyx12.map_if.load_map_file(name, _params())


@functools.cache
def _map_index() -> pyx12.map_index.map_index:
    return pyx12.map_index.map_index(None)


def _walk(text: str, ack: io.StringIO) -> bool:
    """``x12n_document`` without its HTML/XML/JSON outputs and with cached maps."""
    errh = pyx12.error_handler.err_handler()
    try:
        src = pyx12.x12file.X12Reader(io.StringIO(text))
    except pyx12.errors.X12Error:
        return False
    map_file = "x12.control.00501.xml" if src.icvn == "00501" else "x12.control.00401.xml"
    control_map = _map(map_file)
    node = control_map.getnodebypath("/ISA_LOOP/ISA")
    walker = walk_tree()
    icvn = fic = vriic = None
    cur_map = None
    valid = True
    for seg in src:
        orig_node = node
        seg_id = seg.get_seg_id()
        if seg_id == "ISA":
            node = control_map.getnodebypath("/ISA_LOOP/ISA")
            walker.forceWalkCounterToLoopStart("/ISA_LOOP", "/ISA_LOOP/ISA")
        elif seg_id == "GS":
            node = control_map.getnodebypath("/ISA_LOOP/GS_LOOP/GS")
            walker.forceWalkCounterToLoopStart("/ISA_LOOP/GS_LOOP", "/ISA_LOOP/GS_LOOP/GS")
        else:
            node, _pop, _push, walk_errors = walker.walk_errors(
                node, seg, src.get_seg_count(), src.get_cur_line(), src.get_ls_id()
            )
            apply_walk_errors(errh, walk_errors)
        if node is None:
            node = orig_node
            continue
        if seg_id == "ISA":
            errh.add_isa_loop(seg, src)
            icvn = seg.get_value("ISA12")
            errh.handle_errors(src.pop_errors())
        elif seg_id == "IEA":
            errh.handle_errors(src.pop_errors())
            errh.close_isa_loop(node, seg, src)
        elif seg_id == "GS":
            fic, vriic = seg.get_value("GS01"), seg.get_value("GS08")
            map_file_new = _map_index().get_filename(icvn, vriic, fic)
            if map_file_new is None:
                raise pyx12.errors.EngineError(
                    f"Map not found.  icvn={icvn}, fic={fic}, vriic={vriic}"
                )
            if map_file != map_file_new or cur_map is None:
                map_file = map_file_new
                cur_map = _map(map_file)
                src.check_837_lx = cur_map.id == "837"
            node = cur_map.getnodebypath("/ISA_LOOP/GS_LOOP/GS")
            errh.add_gs_loop(seg, src)
            errh.handle_errors(src.pop_errors())
        elif seg_id == "GE":
            errh.handle_errors(src.pop_errors())
            errh.close_gs_loop(node, seg, src)
        elif seg_id == "ST":
            errh.add_st_loop(seg, src)
            errh.handle_errors(src.pop_errors())
        elif seg_id == "SE":
            errh.handle_errors(src.pop_errors())
            errh.close_st_loop(node, seg, src)
        else:
            errh.add_seg(node, seg, src.get_seg_count(), src.get_cur_line(), src.get_ls_id())
            errh.handle_errors(src.pop_errors())
        assert isinstance(node, pyx12.map_if.segment_if)
        valid &= apply_segment_errors(node, seg, errh)
    src.cleanup()  # catches skipped loop trailers
    errh.handle_errors(src.pop_errors())
    if fic != "FA" and vriic and vriic[:6] == "005010":
        errh.accept(pyx12.error_999.error_999_visitor(ack, src.get_term()))
    src.close()
    return bool(valid) and errh.get_error_count() == 0


def _quiet() -> None:
    logging.getLogger("pyx12").setLevel(logging.CRITICAL)


def validate_x12(text: str) -> X12Result:
    """Validate an interchange; ``errors`` are the 999's IK3/IK4/IK5/AK9 segments."""
    _quiet()
    ack = io.StringIO()
    try:
        valid = _walk(text, ack)
    except pyx12.errors.EngineError:
        valid = False
    ack_text = ack.getvalue()
    errors = tuple(
        seg.strip()
        for seg in ack_text.replace("\n", "").split("~")
        if seg.strip().startswith(("IK3", "IK4"))
        or (seg.strip().startswith(("IK5", "AK9")) and not seg.strip()[4:].startswith("A"))
    )
    return X12Result(valid, ack_text, errors)
