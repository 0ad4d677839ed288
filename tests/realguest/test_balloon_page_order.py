"""Which free pages a real guest's balloon takes, measured through the host RAM behind
the guest (the Rss of QEMU's RAM mapping). The simulator's rule rests on it (sim.memory.guest:
last freed, first taken; tests/test_balloon_page_order.py is its twin): the first inflate
takes touched pages the guest freed, a deflate gives pages back at the head of the free
list, so the next inflate by the same amount re-takes them and gains the host nothing,
and the guest's next allocation takes them first, costing the host fresh pages."""

from __future__ import annotations

import time
from typing import Any

import libvirt

from tests.realguest.conftest import Guests
from tests.realguest.harness import GuestSpec, guest_ram_rss_kib, wait_for

MIB = 1024
RAM_MIB = 1024
SLACK_MIB = 24  # page tables, the stats work, the workload's own pages


def balloon_to(guests: Guests, dom: Any, target_mib: int) -> int:
    """Set the balloon, wait until ``actual`` meets it, return the RAM's host Rss in MiB."""
    dom.setMemoryFlags(target_mib * MIB, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    wait_for(lambda: abs(guests.actual_kib(dom) - target_mib * MIB) < MIB, 120, f"actual at {target_mib} MiB")
    time.sleep(2)  # QEMU discards each request before the guest counts it: a margin only
    return guest_ram_rss_kib(dom.name(), RAM_MIB) // MIB


def test_the_balloon_retakes_its_own_pages_and_the_guest_reuses_them_first(guests: Guests) -> None:
    # 400 MiB touched and freed at 15 s; 150 MiB allocated again at 90 s.
    spec = GuestSpec("order", memory_mib=RAM_MIB, work="400@0,0@15,150@90")
    (dom,) = guests.boot(spec)
    wait_for(lambda: "RG-WORK 0" in guests.console("order"), 300, "the burst to be freed")
    time.sleep(2)
    start = guest_ram_rss_kib("order", RAM_MIB) // MIB
    first_in = balloon_to(guests, dom, RAM_MIB - 100)
    first_out = balloon_to(guests, dom, RAM_MIB)
    cycles = [(balloon_to(guests, dom, RAM_MIB - 100), balloon_to(guests, dom, RAM_MIB)) for _ in range(2)]
    deep = balloon_to(guests, dom, RAM_MIB - 300)
    before_alloc = balloon_to(guests, dom, RAM_MIB)
    assert "RG-WORK 150" not in guests.console("order"), "the guest allocated before the balloon was done"
    wait_for(lambda: "RG-WORK 150" in guests.console("order"), 300, "the guest to allocate 150 MiB")
    time.sleep(2)
    after_alloc = guest_ram_rss_kib("order", RAM_MIB) // MIB
    figures = f"start {start}, cycle 1 {first_in}/{first_out}, then {cycles}, -300: {deep}, alloc {before_alloc}->{after_alloc}"
    assert start - first_in > 100 - SLACK_MIB, figures  # touched free pages went first
    assert abs(first_out - first_in) < SLACK_MIB, figures  # a deflate touches nothing
    for inflated, deflated in cycles:  # the same 100 MiB again: nothing more
        assert first_in - inflated < SLACK_MIB and abs(deflated - inflated) < SLACK_MIB, figures
    assert abs((cycles[-1][1] - deep) - 200) < SLACK_MIB, figures  # 100 re-taken, then 200 touched
    # All 150 MiB came from the 300 deflated (unbacked) pages, none from the 100 touched.
    assert abs((after_alloc - before_alloc) - 150) < SLACK_MIB, figures
