from __future__ import annotations

from django.contrib import admin

from .models import AuditLog


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """What the receivers did, where and when: a record, read-only."""

    list_display = ("created_at", "username", "handler", "event", "detail", "pid")
    list_filter = ("event", "handler")
    search_fields = ("=username",)

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False
