from __future__ import annotations

import uuid
from typing import Any

from django.db import models


class Color:
    """A value type no codec knows: snapshots fall back to the field's own text form."""

    def __init__(self, red: int, green: int, blue: int) -> None:
        self.rgb = (red, green, blue)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Color) and other.rgb == self.rgb

    def __hash__(self) -> int:
        return hash(self.rgb)


class ColorField(models.CharField):  # type: ignore[type-arg]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 11)
        super().__init__(*args, **kwargs)

    def from_db_value(self, value: str | None, *args: Any) -> Color | None:
        return self.to_python(value)

    def to_python(self, value: Any) -> Color | None:
        if value is None or isinstance(value, Color):
            return value
        return Color(*map(int, value.split(",")))

    def get_prep_value(self, value: Any) -> str | None:
        color = self.to_python(value)
        return None if color is None else ",".join(map(str, color.rgb))

    def value_to_string(self, obj: models.Model) -> str:
        return self.get_prep_value(self.value_from_object(obj)) or ""


class Author(models.Model):
    name = models.CharField(max_length=100)


class Tag(models.Model):
    name = models.CharField(max_length=50)


class Article(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, null=True, blank=True, on_delete=models.SET_NULL)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    published = models.DateTimeField(null=True, blank=True)
    day = models.DateField(null=True, blank=True)
    duration = models.DurationField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)
    attachment = models.FileField(blank=True)
    tags = models.ManyToManyField(Tag, blank=True)
    blob = models.BinaryField(null=True, blank=True)


class Ticket(models.Model):
    """A model with a UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    subject = models.CharField(max_length=100)
    color = ColorField(null=True, blank=True)


class Record(models.Model):
    """Written by a test handler wherever it runs (request process or worker)."""

    handler = models.CharField(max_length=200)
    call = models.JSONField()
    pid = models.IntegerField()
    ran_at = models.FloatField()


class Attempt(models.Model):
    key = models.CharField(max_length=100, unique=True)
    count = models.IntegerField(default=0)
