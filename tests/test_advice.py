"""Every value seqtrain suggests in an error is accepted when followed: each test takes the suggestion out of
the message and feeds it back through the same checks."""

from __future__ import annotations

import dataclasses
import re

import pytest

from seqtrain.config import Config
from seqtrain.errors import UserError
from seqtrain.job import resolve

TINY = dict(arch="resnet20", width=4, batch_size=32, stages="auto")


def refusal(cfg: Config) -> str:
    with pytest.raises(UserError) as e:
        resolve(cfg.validate())
    return str(e.value)


@pytest.mark.parametrize("budget,batch", [("1MB", 32), ("0.2MB", 4), ("3MB", 128), ("1.5MB", 16)])
def test_memory_budget_advice_is_accepted(budget, batch):
    cfg = Config(**{**TINY, "batch_size": batch, "memory_budget": budget})
    message = refusal(cfg)
    least = re.search(r"a budget of at least ([\d,]+) MB", message)
    assert least, message
    resolve(dataclasses.replace(cfg, memory_budget=least.group(1).replace(",", "") + "MB").validate())
    suggested = re.search(r"--batch-size of (\d+) or less", message)
    if suggested:
        resolve(dataclasses.replace(cfg, batch_size=int(suggested.group(1))).validate())
    if "add --checkpoint" in message:
        resolve(dataclasses.replace(cfg, checkpoint=True).validate())
    # every option offered is one that works: a batch size is offered exactly when one fits
    fits_smaller = any(_accepted(dataclasses.replace(cfg, batch_size=b)) for b in (2, 4, 8, 16) if b < batch)
    assert bool(suggested) == fits_smaller, message


def _accepted(cfg: Config) -> bool:
    try:
        resolve(cfg.validate())
    except UserError:
        return False
    return True


def test_image_size_advice_is_accepted():
    cfg = Config(arch="vgg16", width=4, image_size=8)  # five max-pools: 8x8 images end below one pixel
    message = refusal(cfg)
    side = int(re.search(r"--image-size (\d+) or more", message).group(1))
    resolve(dataclasses.replace(cfg, image_size=side).validate())
