from __future__ import annotations

from django.dispatch import Signal

user_registered = Signal()
user_invited = Signal()
flaky_signal = Signal()
slow_signal = Signal()
renamed_signal = Signal()
killable_signal = Signal()
counted_signal = Signal()
db_flaky_signal = Signal()
#: Handlers past their time limits, and handlers whose worker child is killed, without
#: redelivery (tests/test_worker_lost.py).
overrun_signal = Signal()
soft_overrun_signal = Signal()
lossy_signal = Signal()
#: Sent like post_save (instance, created, update_fields) to a coalescing handler.
row_touched = Signal()
