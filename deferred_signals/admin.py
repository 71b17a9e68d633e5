"""The Django admin for dead letters (with a "Replay" action) and pending outbox calls.

Both are read-only records of what happened: nobody edits a message by hand. Replaying
needs the change permission on dead letters.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import DeadLetter, OutboxCall
from .replay import replay


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = ("call_id", "handler", "exception", "attempts", "last_failed_at", "replayed_at")
    list_filter = ("handler", "exception", ("replayed_at", admin.EmptyFieldListFilter))
    search_fields = ("=call_id", "handler")
    date_hierarchy = "last_failed_at"
    actions = ("replay_selected",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A letter's page is a view: saving it would write the row back as loaded, over a
        # failure the worker recorded meanwhile. The change permission (asked without an
        # object) is what the Replay action needs.
        return obj is None and super().has_change_permission(request)

    @admin.action(description="Replay the selected dead letters", permissions=["change"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        # The selection is read now, not when the operator's page was: a letter another
        # operator replayed since would be claimed (as read) and published again. Publishing
        # a replayed letter again is the command's, by its id.
        letters = list(queryset.order_by("id"))
        for letter in letters:
            if letter.replayed_at is not None:
                self.message_user(
                    request,
                    f"Skipped {letter.call_id}: replayed already, at {letter.replayed_at}; to "
                    f"publish it again: manage.py deferred_signals replay {letter.pk}.",
                    messages.WARNING,
                )
        replayed, skipped = replay(letter for letter in letters if letter.replayed_at is None)
        if replayed:
            self.message_user(
                request,
                f"Replayed {len(replayed)} dead letter(s) with their call ids.",
                messages.SUCCESS,
            )
        for skip in skipped:
            self.message_user(
                request, f"Skipped {skip.letter.call_id}: {skip.reason}.", messages.WARNING
            )


@admin.register(OutboxCall)
class OutboxCallAdmin(ReadOnlyAdmin):
    list_display = ("id", "handler", "created", "attempts", "next_attempt_at", "last_error")
    list_filter = ("handler",)
    search_fields = ("=id", "handler")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A row is a committed call not yet published: deleting it loses the call, with no
        # log line or signal. A row the relay cannot publish becomes a dead letter.
        return False
