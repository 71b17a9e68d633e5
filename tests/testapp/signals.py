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
