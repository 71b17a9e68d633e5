from __future__ import annotations

import uuid

from django.db import models


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


class Ticket(models.Model):
    """A model with a UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    subject = models.CharField(max_length=100)


class Record(models.Model):
    """Written by a test handler wherever it runs (request process or worker)."""

    handler = models.CharField(max_length=200)
    call = models.JSONField()
    pid = models.IntegerField()
    ran_at = models.FloatField()


class Attempt(models.Model):
    key = models.CharField(max_length=100, unique=True)
    count = models.IntegerField(default=0)
