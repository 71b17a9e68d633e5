from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from .forms import RegistrationForm
from .models import AuditLog
from .services import register_user


def register(request: HttpRequest) -> HttpResponse:
    form = RegistrationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        user = register_user(data["username"], data["email"], source="web")
        # The response goes out at once: the email, audit and CRM sync run on the worker.
        return redirect("accounts:activity", username=user.username)
    return render(request, "accounts/register.html", {"form": form})


def activity(request: HttpRequest, username: str) -> HttpResponse:
    entries = AuditLog.objects.filter(username=username)
    return render(request, "accounts/activity.html", {"username": username, "entries": entries})
