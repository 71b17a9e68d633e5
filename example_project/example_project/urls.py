from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="accounts:register")),
    path("accounts/", include("accounts.urls")),
    # Dead letters (with their Replay action) and the pending outbox, under "Deferred signals".
    path("admin/", admin.site.urls),
]
