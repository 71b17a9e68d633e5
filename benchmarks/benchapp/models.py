"""A typical small business row: a few scalar columns, a decimal and a timestamp."""

from __future__ import annotations

from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)
    quantity = models.IntegerField(default=0)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField(auto_now_add=True)

    objects: models.Manager[Item] = models.Manager()

    class Meta:
        app_label = "benchapp"

    def __str__(self) -> str:
        return self.name
